"""Choosing a database's critical tables: checked against that database, then journaled.

Every table's row count is compared by restore tests whatever is chosen here; a critical
table must also never be empty nor shrink past the server's threshold. DBAs choose them on
the server page, for each database it backs up; `addserver --critical-tables` at registration,
for the DSN's database.
"""

import psycopg
from django import forms
from django.db import transaction

from backupportal import journal
from backupportal.lib.pgerrors import explain
from backups import tables
from backups.models import ChangeRequest


def check_tables(server, names, dbname=None):
    """The qualified names of `names` in the database (default: the DSN's); ValueError with one
    line if one is wrong."""
    if not names:
        return []
    try:
        with server.connect(dbname) as conn:
            return tables.resolve(conn, names)
    except psycopg.Error as e:
        raise ValueError(f"cannot reach {server.name} to check the tables: {explain(e, server)}") from None


def _without(names, off):
    """`names` but those naming a table of `off`, compared as the tables they name (`users`,
    recorded by older versions, is `public.users`)."""
    gone = {tables.key_of(name) for name in off}
    return [name for name in names or [] if tables.key_of(name) not in gone]


def dropped_tables(database, qualified):
    """The critical tables of `database` that the choice `qualified` leaves out."""
    return _without(database.critical_tables, qualified)


def choose_critical_tables(database, qualified, user, reason=""):
    """A DBA's choice: tables added apply at once; one taken off is held to its checks until another
    DBA or Sysadmin approves (its empty or shrunk table would pass the restore test unnoticed, as a
    higher shrink threshold would let it). Returns the change request opened, or None."""
    dropped = dropped_tables(database, qualified)
    if not dropped:
        set_critical_tables(database, qualified, user.get_username())
        return None
    with transaction.atomic():
        change = ChangeRequest.open(
            ChangeRequest.Kind.FEWER_CRITICAL_TABLES,
            database,
            user,
            reason,
            {"critical_tables_taken_off": {"from": [], "to": dropped}},  # the rest stays as it is then
        )
        kept = _without(qualified, dropped)
        if set(kept + dropped) != set(database.critical_tables or []):
            set_critical_tables(database, kept + dropped, user.get_username())
    return change


def take_off(database, names, actor):
    """An approved request: `names` come off the critical tables as they are now (tables added
    since stay)."""
    set_critical_tables(database, _without(database.critical_tables, names), actor)


def set_critical_tables(database, qualified, actor):
    """Record the (checked) choice and journal it with what it replaced."""
    before = list(database.critical_tables or [])
    database.critical_tables = qualified
    database.save(update_fields=["critical_tables"])
    journal.record(
        "critical_tables_changed",
        actor=actor,
        obj=database.server,
        server=database.server.name,
        database=database.name,
        tables=qualified,
        before=before,
    )


class CriticalTablesForm(forms.Form):
    tables = forms.CharField(
        label="Critical tables",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 40}),
        help_text="One a line or comma-separated, as table or schema.table. Empty: none.",
    )

    def __init__(self, database, *args, **kwargs):
        self.database = database
        kwargs.setdefault("initial", {"tables": "\n".join(database.critical_tables or [])})
        kwargs.setdefault("prefix", f"db{database.pk}")
        super().__init__(*args, **kwargs)

    reason = forms.CharField(
        label="Reason",
        required=False,
        max_length=500,
        help_text="Taking a table off waits for another DBA or Sysadmin: say why.",
    )

    def clean_tables(self):
        names = tables.split_list(self.cleaned_data["tables"])
        try:
            return check_tables(self.database.server, names, self.database.name)
        except ValueError as e:
            raise forms.ValidationError(str(e)) from None
