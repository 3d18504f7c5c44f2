"""The servers and their schedules in the admin. A change that would protect less (shorter
retention, a looser objective, a database left out, a schedule turned down, the server disabled
or its WAL archiving turned off, a sandbox chosen or moved) waits as a change request for a
second person (backups.changes)."""

import psycopg
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import OuterRef, Subquery
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.timesince import timesince

from backupportal import journal
from backupportal.lib.admin import SealedFieldsAdmin
from backupportal.lib.cron import cron_problem, next_run
from backupportal.lib.libpq import DsnError, parse
from backupportal.lib.pgerrors import explain
from backupportal.lib.sealed import SealError
from backupportal.roles import role_may
from backups import binaries, databases, schedules, walspool
from backups.admin_changes import check_request, open_request, reason_field
from backups.changes import (
    RETENTION_FIELDS,
    archiving_stopped,
    backing_up_fewer,
    destination_moved,
    objectives_loosened,
    retention_shortened,
    sandbox_changed,
    schedule_turned_down,
)
from backups.models import (
    BackupRun,
    BackupSchedule,
    ChangeRequest,
    Server,
)


def _may_hold_password(dsn):
    """A password in it, or a DSN that cannot be read (its '@' forgotten, a password reads as a port)."""
    try:
        return bool(parse(dsn).password)
    except DsnError:
        return True


class ServerForm(forms.ModelForm):
    # Write-only: the stored password is never rendered back into the page.
    new_password = forms.CharField(
        label="Password",
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Leave empty to keep the current password.",
    )
    # A choice among PG_BIN_DIRS (read at each page), never a typed path: see backups.binaries.
    pg_bin = forms.ChoiceField(
        label="PostgreSQL bin directory",
        choices=binaries.dir_choices,
        required=False,
        help_text="The directories the operator listed in PG_BIN_DIRS.",
    )
    change_reason = reason_field(
        "Shortening retention or raising an objective (the other way applies at once), disabling the server "
        "or turning its WAL archiving off, "
        "leaving out a database it backs up, choosing its sandbox or sending restore tests to a server's new "
        "host or port (these two a DBA approves)"
    )

    class Meta:
        model = Server
        # Listed, not "__all__": a field added to Server must be chosen to appear here.
        fields = [
            "name",
            "dsn",
            "pg_bin",
            "archiving",
            "enabled",
            "protect_databases",
            "rpo_minutes",
            "rto_critical_minutes",
            "rto_full_minutes",
            *RETENTION_FIELDS,  # lowering any of them waits for a second person
            "shrink_threshold_pct",
            "sandbox_server",  # waits for a DBA: restore tests decrypt production's backups there
        ]

    def clean_dsn(self):
        """A DSN that holds a password, or may (one that cannot be read), is refused (Server.clean_dsn
        says why) and never rendered back into the page: the Sysadmin types it again."""
        dsn = self.cleaned_data.get("dsn", "")
        if _may_hold_password(dsn):
            self.data = self.data.copy()
            self.data[self.add_prefix("dsn")] = ""
        return dsn

    def clean(self):
        # Before _post_clean puts the new values on the instance: it holds the stored ones here.
        cleaned = super().clean()
        self.shortened = retention_shortened(self.instance, cleaned) if self.instance.pk else {}
        if self.shortened:
            check_request(self, ChangeRequest.Kind.SHORTEN_RETENTION, self.instance)
        self.loosened = objectives_loosened(self.instance, cleaned) if self.instance.pk else {}
        if self.loosened:
            check_request(self, ChangeRequest.Kind.LOOSEN_OBJECTIVES, self.instance)
        self.unarchived = archiving_stopped(self.instance, cleaned)
        if self.unarchived:
            check_request(self, ChangeRequest.Kind.STOP_ARCHIVING, self.instance)
        # Disabled, no job of the server runs: as destructive as disabling each schedule.
        self.disables = bool(self.instance.pk and self.instance.enabled and not cleaned.get("enabled"))
        if self.disables:
            check_request(self, ChangeRequest.Kind.DISABLE_SERVER, self.instance)
        # A database left out is no longer dumped: as destructive as disabling the server for it.
        self.fewer = {}
        if "protect_databases" in cleaned and "dsn" in cleaned:
            try:
                self.fewer = backing_up_fewer(self.instance, cleaned["protect_databases"], cleaned["dsn"])
            except ValidationError as e:
                self.add_error("protect_databases", e)
        if self.fewer:
            check_request(self, ChangeRequest.Kind.BACK_UP_FEWER, self.instance)
        self._check_restore_destination(cleaned)
        self._check_rename(cleaned)
        return cleaned

    def _check_rename(self, cleaned):
        """A server that archives WAL does so under its name: production's archive_command writes
        into the spool named after it, pg_receivewal streams from the slot named after it. Renamed,
        the ingest read another spool (and PostgreSQL's segments piled up unread in the old one), the
        old slot pinned production's WAL with no alert, and two swapped names catalogued one
        cluster's WAL as the other's. Renaming waits until archiving is off (which a DBA approves)."""
        new, stored = cleaned.get("name"), self.instance
        if stored.pk and new and new != stored.name and stored.archiving != Server.Archiving.NONE:
            self.add_error(
                "name",
                f"{stored.name} archives WAL under its name (its spool {walspool.spool_dir(stored)}, slot "
                f"{stored.replication_slot}): a new name would cut production off from its archive. Turn its "
                "archiving off first (a DBA approves), rename it, then set archiving up again under the new name",
            )

    def _check_restore_destination(self, cleaned):
        """A new sandbox, or a server restore tests restore into moved: each waits for a DBA."""
        chosen = cleaned.get("sandbox_server")
        self.sandbox_change = sandbox_changed(self.instance, chosen)
        if self.sandbox_change and self.sandbox_change["sandbox_destination"]["to"] is None:
            # Nothing connects with it: there is no HOST:PORT for a DBA to approve.
            self.add_error("sandbox_server", f"The DSN of {chosen or self.instance} cannot be read: fix it first.")
            self.sandbox_change = {}
        if self.sandbox_change:
            check_request(self, ChangeRequest.Kind.SET_SANDBOX, self.instance)
        self.moves = destination_moved(self.instance, cleaned.get("dsn")) if "dsn" in cleaned else {}
        if self.moves:
            check_request(self, ChangeRequest.Kind.MOVE_SANDBOX, self.instance)

    def _post_clean(self):
        super()._post_clean()  # the model's clean(): the DSN's form
        # A missing reason alone still probes the server: the page says all that is wrong at once.
        if set(self.errors) - {"change_reason"}:
            return
        # The new password, else the stored one: the instance (its DSN already the new one) gives
        # it only while the user, host and port are those it was entered for, so a changed port
        # never receives it, even here.
        probe = Server(dsn=self.instance.dsn)
        try:
            probe.password = self.cleaned_data.get("new_password") or self.instance.password
            self.instance.pg_version = probe.probe()
        except SealError as e:
            self.add_error(None, str(e))
        except ValidationError as e:
            self.add_error(None, e.messages[0] + self._withheld_note(probe))

    def _withheld_note(self, probe):
        """Why a password the Sysadmin did not retype was not sent, when that is why it failed."""
        if not self.instance.password_sealed or probe.password_sealed:
            return ""
        stored_for, tls = self.instance.password_target, self.instance.password_tls
        surer = f" with sslmode={tls.replace(' ', ' and sslrootcert=', 1)} or surer" if tls else ""
        return f" (the stored password is only ever sent to {stored_for}{surer}: type it again for the new one)"

    def save(self, commit=True):
        if self.cleaned_data.get("new_password"):
            self.instance.password = self.cleaned_data["new_password"]
        return super().save(commit)


@admin.register(Server)
class ServerAdmin(SealedFieldsAdmin):
    form = ServerForm
    list_display = ["name", "dsn", "version", "archiving", "enabled", "rpo_minutes", "last_logical"]
    list_filter = ["archiving", "enabled"]
    search_fields = ["name", "dsn"]
    readonly_fields = ["pg_version", "created_at", "databases_seen", "sandbox_destination"]
    actions = ["back_up_now"]

    @admin.display(description="Databases (as last seen)")
    def databases_seen(self, obj):
        """Kept by backups.databases at registration, on a change of the choice and each logical pass."""
        rows = obj.databases.all() if obj.pk else []
        return (
            format_html_join(
                ", ",
                "{} ({}{})",
                ((db.name, db.get_state_display(), f": {db.problem}" if db.problem else "") for db in rows),
            )
            or "none yet"
        )

    @admin.display(description="PostgreSQL")
    def version(self, obj):
        return obj.version_display

    def get_queryset(self, request):
        # The newest good logical backup in the same query: no query per row.
        newest = BackupRun.objects.good().filter(server=OuterRef("pk"), kind=BackupRun.Kind.LOGICAL)
        newest = newest.order_by("-finished_at").values("finished_at")[:1]
        return super().get_queryset(request).annotate(last_logical_at=Subquery(newest))

    @admin.display(description="Newest good logical backup", ordering="last_logical_at")
    def last_logical(self, obj):
        return f"{timesince(obj.last_logical_at)} ago" if obj.last_logical_at else "never"

    def has_run_backup_permission(self, request):
        # The role's, not has_perm: that gives a superuser without a role every permission.
        return role_may(request.user, "backups.run_backup")

    @admin.action(description="Back up now (logical)", permissions=["run_backup"])
    def back_up_now(self, request, queryset):
        from backups.tasks import enqueue_backup

        for server in queryset:
            result = enqueue_backup(server, BackupRun.Kind.LOGICAL, actor=request.user.get_username())
            level = messages.SUCCESS if result.ok else messages.WARNING
            self.message_user(request, result.message, level)

    def save_model(self, request, obj, form, change):
        shorter, disables = getattr(form, "shortened", {}), getattr(form, "disables", False)
        looser, unarchived = getattr(form, "loosened", {}), getattr(form, "unarchived", {})
        for field, values in (shorter | looser | unarchived).items():
            setattr(obj, field, values["from"])  # kept until another DBA or Sysadmin approves
        if disables:
            obj.enabled = True
        fewer = getattr(form, "fewer", {})
        if fewer:  # the old choice and the new together, until another DBA or Sysadmin approves
            obj.protect_databases = fewer["protect_databases"]["from"]
        held = self._hold_back_destination(obj, form)
        super().save_model(request, obj, form, change)
        self._ask_a_dba(request, obj, form)
        reason = form.cleaned_data.get("change_reason")
        waiting = ["enabled"] if disables else []
        if fewer and obj.protect_databases == form.initial.get("protect_databases"):
            waiting.append("protect_databases")  # nothing of the choice changed yet
        if shorter:
            what = f"Shortening the retention of {obj}"
            open_request(self, request, ChangeRequest.Kind.SHORTEN_RETENTION, obj, reason, shorter, what)
        if looser:
            what = f"Raising the objectives of {obj}"
            open_request(self, request, ChangeRequest.Kind.LOOSEN_OBJECTIVES, obj, reason, looser, what)
        if unarchived:
            what = f"Turning off the WAL archiving of {obj}"
            open_request(self, request, ChangeRequest.Kind.STOP_ARCHIVING, obj, reason, unarchived, what)
        if disables:
            changes = {"enabled": {"from": True, "to": False}}
            open_request(self, request, ChangeRequest.Kind.DISABLE_SERVER, obj, reason, changes, f"Disabling {obj}")
        if fewer:
            left_out = fewer["left out"]["from"]
            what = f"No longer backing up {left_out} on {obj}"
            open_request(self, request, ChangeRequest.Kind.BACK_UP_FEWER, obj, reason, fewer, what)
        journal.record(
            "server_changed" if change else "server_added",
            actor=request.user.get_username(),
            obj=obj,
            fields=sorted(
                set(form.changed_data)
                - {"new_password", "change_reason", *shorter, *looser, *unarchived, *waiting, *held}
            ),
            credentials_changed="new_password" in set(form.changed_data) - set(held),
            credentials_forgotten=getattr(obj, "password_forgotten", False),
        )
        if "protect_databases" in form.changed_data or fewer or not change:
            self._look_at_databases(request, obj)
        if getattr(obj, "password_forgotten", False):
            self.message_user(
                request,
                f"The stored password of {obj} was forgotten: it was for another user, host or port, or a "
                "surer sslmode or another root certificate. "
                "Type it again if the new one needs it.",
                messages.WARNING,
            )

    def _hold_back_destination(self, obj, form):
        """Put back the sandbox that waits for a DBA; returns the fields held back. A move's DSN,
        password and version apply at once: only its restore tests wait (sandbox_destination)."""
        if not getattr(form, "sandbox_change", None):
            return []
        obj.sandbox_server = Server.objects.get(pk=obj.pk).sandbox_server if obj.pk else None
        return ["sandbox_server"]

    def _ask_a_dba(self, request, server, form):
        """Open the requests the form found waiting for a DBA, and say where they wait."""
        kinds, reason = ChangeRequest.Kind, form.cleaned_data.get("change_reason")
        asks = [
            (
                kinds.SET_SANDBOX,
                form.sandbox_change,
                f"Choosing where the restore tests of {server} restore",
                "nothing of it applies until then",
            ),
            (
                kinds.MOVE_SANDBOX,
                form.moves,
                f"Sending restore tests to {server} at {form.moves.get('sandbox_destination', {}).get('to')}",
                "its new DSN applies now (backups go there); restore tests into it fail until then",
            ),
        ]
        for kind, changes, what, meanwhile in asks:
            if changes:
                change = ChangeRequest.open(kind, server, request.user, reason, changes)
                self.message_user(
                    request,
                    format_html(
                        '{} waits for a DBA to approve <a href="{}">change request #{}</a>: {}.',
                        what,
                        reverse("changes"),
                        change.pk,
                        meanwhile,
                    ),
                    messages.WARNING,
                )

    def _look_at_databases(self, request, server):
        try:
            databases.discover(server, actor=request.user.get_username())
        except psycopg.Error as e:
            self.message_user(
                request,
                f"The databases of {server} could not be listed ({explain(e, server)}): the next logical pass looks again.",
                messages.WARNING,
            )


class BackupScheduleForm(forms.ModelForm):
    change_reason = reason_field(
        "Disabling a schedule, or making it fire less often or leave a longer gap over the next year,"
    )

    class Meta:
        model = BackupSchedule
        fields = ["server", "job", "cron", "enabled"]

    def clean(self):
        cleaned = super().clean()
        stored = self.instance
        self.turned_down = {}
        if stored.pk and "cron" in cleaned:
            self.turned_down = schedule_turned_down(stored, cleaned["cron"], cleaned.get("enabled", False))
        if self.turned_down:
            check_request(self, ChangeRequest.Kind.SCHEDULE_LESS_OFTEN, stored)
        return cleaned


@admin.register(BackupSchedule)
class BackupScheduleAdmin(admin.ModelAdmin):
    form = BackupScheduleForm
    list_display = ["server", "job", "cron", "enabled", "next_run"]
    list_filter = ["job", "enabled", "server"]
    list_select_related = ["server"]

    def get_readonly_fields(self, request, obj=None):
        # django-q2's row is named after the server and the job: a schedule keeps both.
        return ["server", "job"] if obj is not None else []

    @admin.display(description="Next run")
    def next_run(self, obj):
        if not obj.enabled:
            return "disabled"
        # A row saved before crons were checked must not break the page for everyone.
        return next_run(obj.cron) or f"never: {cron_problem(obj.cron)}"

    # Deleting a schedule stops its job: refused, enabled is unticked instead (which waits for
    # approval). Not by has_delete_permission: a server without backups still takes its schedules.
    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def delete_view(self, request, object_id, extra_context=None):
        obj = self.get_object(request, object_id)
        if obj is None or not self.has_delete_permission(request, obj):
            return super().delete_view(request, object_id, extra_context)  # refused as any other
        self.message_user(
            request,
            "A schedule is not deleted: untick enabled instead, which waits for another DBA or Sysadmin's approval.",
            messages.ERROR,
        )
        return redirect(reverse("admin:backups_backupschedule_change", args=[object_id]))

    def save_model(self, request, obj, form, change):
        if getattr(form, "turned_down", None):
            stored = BackupSchedule.objects.select_related("server").get(pk=obj.pk)
            reason = form.cleaned_data["change_reason"]
            kind = ChangeRequest.Kind.SCHEDULE_LESS_OFTEN
            open_request(self, request, kind, stored, reason, form.turned_down, f"The change of {stored}")
            return
        # The form checked the cron (the model's clean); saved, synced and journaled together.
        schedules.change(obj, actor=request.user.get_username())
