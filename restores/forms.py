from django import forms

from backupportal.lib.inputs import validate_moment
from backups.models import BackupRun, Server
from restores import pitr, sandbox
from restores.models import RestoreRequest
from restores.targetdb import RestoreFailed, check_database_name, database_exists

SANDBOX = RestoreRequest.Destination.SANDBOX_CLUSTER


class RestoreRequestForm(forms.ModelForm):
    # Text, read by the PITR restore's own parser: it refuses a time without an offset, which a
    # DateTimeField would read silently in the portal's zone.
    target_time = forms.CharField(
        required=False,
        label="Point in time",
        help_text="For a sandbox cluster: the moment to recover to, with its offset, e.g. 2026-11-25 14:30:00+05:00 "
        "(or choose a base backup instead).",
    )

    class Meta:
        model = RestoreRequest
        fields = ["server", "backup_run", "target_time", "destination", "target_database", "into_server", "reason"]
        widgets = {"reason": forms.Textarea(attrs={"rows": 3})}
        help_texts = {
            "backup_run": "A logical backup for a new database or production; a base backup for a sandbox cluster.",
            "target_database": "For a new database: its name (it must not exist yet).",
            "into_server": "For a new database on another registered server; empty: the same server.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["backup_run"].queryset = (
            BackupRun.objects.good()
            .filter(kind__in=[BackupRun.Kind.LOGICAL, BackupRun.Kind.BASE])
            .select_related("server")
        )
        self.fields["backup_run"].required = False
        self.fields["into_server"].queryset = Server.objects.all()

    def clean_target_time(self):
        text = self.cleaned_data.get("target_time", "").strip()
        if not text:
            return None
        try:
            moment = pitr.parse_time(text)
        except pitr.Refused as e:
            raise forms.ValidationError(str(e)) from None
        validate_moment(moment)  # year 1 parses, but shifted to UTC it cannot be saved or shown
        return moment

    def clean(self):
        data = super().clean()
        run, server = data.get("backup_run"), data.get("server")
        if run and server and run.server_id != server.pk:
            self.add_error("backup_run", f"Run #{run.pk} is a backup of {run.server}, not of {server}.")
        if data.get("destination") == SANDBOX:
            self._clean_sandbox(data)
            return data
        if "target_time" not in self.errors and data.get("target_time"):
            self.add_error("target_time", "A point in time restores into a sandbox cluster: choose that destination.")
        if not run:
            self.add_error("backup_run", "Choose the logical backup to restore.")
        elif run.kind != BackupRun.Kind.LOGICAL:
            self.add_error("backup_run", f"Run #{run.pk} is a base backup: it restores into a sandbox cluster only.")
        replace = data.get("destination") == RestoreRequest.Destination.REPLACE
        target = server if replace else data.get("into_server") or server
        if target is not None and target.destination is None:  # the request is held to HOST:PORT
            self.add_error(
                None, f"{target}'s DSN cannot be read: fix it (manage.py checkserver {target.name}) and ask again."
            )
        elif (
            data.get("destination") == RestoreRequest.Destination.NEW_DATABASE and "target_database" not in self.errors
        ):
            self._clean_new_database(data)  # not again for a name the field refused (too long, say)
        elif data.get("destination") == RestoreRequest.Destination.REPLACE and server:
            data["target_database"] = run.database_name if run else server.dbname
            data["into_server"] = None
        return data

    def _clean_new_database(self, data):
        """A valid name that does not exist on the target yet: found out now, not after approval.
        The restore checks again when it runs (a restore never overwrites)."""
        name, target = data.get("target_database", ""), data.get("into_server") or data.get("server")
        try:
            check_database_name(name)
            if target and name == target.dbname:
                raise RestoreFailed(f"{name} is {target}'s own database: a new database needs a new name")
            if target and database_exists(target, name):
                raise RestoreFailed(f"database {name} already exists on {target}: choose a new name")
        except RestoreFailed as e:
            self.add_error("target_database", str(e))

    def _clean_sandbox(self, data):
        """A point in time or a base backup (one of them), that the server's base backups can reach."""
        run, moment, server = data.get("backup_run"), data.get("target_time"), data.get("server")
        data["target_database"], data["into_server"] = "", None
        if self.errors:
            return
        if bool(run) == bool(moment):
            self.add_error(None, "For a sandbox cluster give a point in time or a base backup: one of them.")
        elif run and run.kind != BackupRun.Kind.BASE:
            self.add_error(
                "backup_run", f"Run #{run.pk} is a logical backup: a sandbox cluster starts from a base backup."
            )
        elif server:
            try:
                sandbox.check_target(server, sandbox.target_for(run, moment))
            except pitr.Refused as e:
                self.add_error("target_time" if moment else "backup_run", str(e))


class DecisionForm(forms.Form):
    note = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    confirm_database = forms.CharField(required=False, help_text="To replace production, type its database name.")
