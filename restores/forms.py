from django import forms

from backups.models import BackupRun, Server
from restores.logical import RestoreFailed, check_database_name
from restores.models import RestoreRequest


class RestoreRequestForm(forms.ModelForm):
    class Meta:
        model = RestoreRequest
        fields = ["server", "backup_run", "destination", "target_database", "into_server", "reason"]
        widgets = {"reason": forms.Textarea(attrs={"rows": 3})}
        help_texts = {
            "target_database": "For a new database: its name (it must not exist yet).",
            "into_server": "For a new database on another registered server; empty: the same server.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["backup_run"].queryset = (
            BackupRun.objects.good().filter(kind=BackupRun.Kind.LOGICAL).select_related("server")
        )
        self.fields["backup_run"].required = True
        self.fields["into_server"].queryset = Server.objects.all()
        # Point-in-time restores into a sandbox cluster are requested once PITR is enabled.
        self.fields["destination"].choices = [
            c for c in RestoreRequest.Destination.choices if c[0] != RestoreRequest.Destination.SANDBOX_CLUSTER
        ]

    def clean(self):
        data = super().clean()
        run, server = data.get("backup_run"), data.get("server")
        if run and server and run.server_id != server.pk:
            self.add_error("backup_run", f"Run #{run.pk} is a backup of {run.server}, not of {server}.")
        if data.get("destination") == RestoreRequest.Destination.NEW_DATABASE:
            try:
                check_database_name(data.get("target_database", ""))
            except RestoreFailed as e:
                self.add_error("target_database", str(e))
        elif data.get("destination") == RestoreRequest.Destination.REPLACE and server:
            data["target_database"] = server.dbname
            data["into_server"] = None
        return data


class DecisionForm(forms.Form):
    note = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    confirm_database = forms.CharField(required=False, help_text="To replace production, type its database name.")
