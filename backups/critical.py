"""Choosing a server's critical tables: checked against its database, then journaled.

Every table's row count is compared by restore tests whatever is chosen here; a critical
table must also never be empty nor shrink past the server's threshold. DBAs choose them on
the server page, `addserver --critical-tables` at registration.
"""

import psycopg
from django import forms

from backupportal import journal
from backupportal.lib.pgerrors import explain
from backups import tables


def check_tables(server, names):
    """The qualified names of `names` in the server's database; ValueError with one line if one is wrong."""
    if not names:
        return []
    try:
        with server.connect() as conn:
            return tables.resolve(conn, names)
    except psycopg.Error as e:
        raise ValueError(f"cannot reach {server.name} to check the tables: {explain(e, server)}") from None


def set_critical_tables(server, qualified, actor):
    """Record the (checked) choice and journal it with what it replaced."""
    before = list(server.critical_tables or [])
    server.critical_tables = qualified
    server.save(update_fields=["critical_tables"])
    journal.record(
        "critical_tables_changed", actor=actor, obj=server, server=server.name, tables=qualified, before=before
    )


class CriticalTablesForm(forms.Form):
    tables = forms.CharField(
        label="Critical tables",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 40}),
        help_text="One a line or comma-separated, as table or schema.table. Empty: none.",
    )

    def __init__(self, server, *args, **kwargs):
        self.server = server
        kwargs.setdefault("initial", {"tables": "\n".join(server.critical_tables or [])})
        super().__init__(*args, **kwargs)

    def clean_tables(self):
        try:
            return check_tables(self.server, tables.split_list(self.cleaned_data["tables"]))
        except ValueError as e:
            raise forms.ValidationError(str(e)) from None
