"""The storage locations in the admin: a location is checked when saved (reachable, its S3
Object Lock possible); retiring or removing one, and a shorter lock, wait for a second person.
Where a location's data is (its address) cannot change once it holds copies or anchors."""

from django import forms
from django.contrib import admin, messages
from django.template.defaultfilters import filesizeformat

from backupportal import journal
from backups.admin_changes import RemovalAsRequestAdmin, check_request, open_request, reason_field
from backups.models import ChangeRequest, LockChange, StorageLocation
from backups.storage import StorageError, store_for


class StorageLocationForm(forms.ModelForm):
    class Meta:
        model = StorageLocation
        fields = [
            "name",
            "kind",
            "path",
            "bucket",
            "prefix",
            "endpoint_url",
            "region",
            "sse",
            "storage_class",
            "capacity_bytes",
            "lock_mode",
            "lock_days",
            "enabled",
        ]

    change_reason = reason_field("Retiring a location (unticking enabled)")

    def clean(self):
        cleaned = super().clean()
        stored = self.instance  # its stored values until _post_clean
        self.retires = bool(stored.pk and stored.enabled and not cleaned.get("enabled"))
        if self.retires:
            others = [f for f in self.changed_data if f not in ("enabled", "change_reason", "lock_change_reason")]
            if others:
                self.add_error(None, f"Retire the location alone: save the change of {', '.join(others)} first.")
            check_request(self, ChangeRequest.Kind.RETIRE_LOCATION, stored)
        self.refuse_repoint(stored)
        return cleaned

    def refuse_repoint(self, stored):
        """A location that holds anything is not re-pointed: moving is a new location, copies made
        there by the worker, then this one retired through a change request (four eyes)."""
        moved = [
            StorageLocation._meta.get_field(f).verbose_name for f in StorageLocation.ADDRESS if f in self.changed_data
        ]
        held = stored.pk and moved and stored.holdings()
        if held:
            self.add_error(
                None,
                f"Location {stored} holds {held}: changing its {', '.join(moved)} would leave them out of reach. "
                "To move it, add a new location, let the worker copy the backups there, then retire this one "
                "(untick enabled) through a change request.",
            )

    lock_change_reason = forms.CharField(
        required=False,
        label="Reason for a shorter lock",
        help_text="A shorter or weaker S3 Object Lock waits for another DBA or Sysadmin to approve it.",
    )

    def clean_lock_mode(self):
        # A form posted without the lock fields (a script, an older page) leaves the lock as it is.
        return self.cleaned_data.get("lock_mode") or self.instance.lock_mode

    def clean_lock_days(self):
        days = self.cleaned_data.get("lock_days")
        return self.instance.lock_days if days is None else days

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("lock_mode", "lock_days"):
            if name in self.fields:  # not when the page shows them read-only
                self.fields[name].required = False

    def shortens_lock(self):
        """Does this form lower the lock of an existing location? (The instance holds the new values.)"""
        if not self.instance.pk or "lock_mode" not in self.fields or "lock_mode" not in self.initial:
            return False
        old = StorageLocation(lock_mode=self.initial["lock_mode"], lock_days=self.initial["lock_days"])
        return old.shortens_lock(self.instance.lock_mode, self.instance.lock_days)

    def _post_clean(self):
        super()._post_clean()  # the model's clean(): roots, S3 options, the lock
        if not self.errors and self.shortens_lock() and not self.cleaned_data.get("lock_change_reason", "").strip():
            self.add_error(
                "lock_change_reason",
                "A shorter lock is a destructive change that another DBA or Sysadmin approves: give the reason for it.",
            )
        if self.errors or not self.instance.enabled:
            return
        # Reachable now, with the worker's credentials: a typo in the bucket is caught here,
        # not at two in the morning.
        try:
            store_for(self.instance).check()
        except StorageError as e:
            self.add_error(None, str(e))


@admin.register(StorageLocation)
class StorageLocationAdmin(RemovalAsRequestAdmin):
    form = StorageLocationForm
    list_display = ["name", "kind", "where", "capacity", "lock", "enabled"]
    list_filter = ["kind", "enabled"]

    @admin.display(description="Where")
    def where(self, obj):
        if obj.kind == StorageLocation.Kind.S3:
            return f"s3://{obj.bucket}/{obj.prefix}"
        return obj.path

    @admin.display(description="Object lock")
    def lock(self, obj):
        return f"{obj.get_lock_mode_display()}, {obj.lock_days} days" if obj.locked else "none"

    @admin.display(description="Capacity")
    def capacity(self, obj):
        return filesizeformat(obj.capacity_bytes) if obj.capacity_bytes else "the filesystem"

    def save_model(self, request, obj, form, change):
        if getattr(form, "retires", False):
            reason = form.cleaned_data["change_reason"]
            kind = ChangeRequest.Kind.RETIRE_LOCATION
            open_request(self, request, kind, StorageLocation.objects.get(pk=obj.pk), reason, what=f"Retiring {obj}")
            return
        shorter = form.shortens_lock() and (obj.lock_mode, obj.lock_days)
        if shorter:
            # The rest is saved now; the lock stays as it is until another person approves.
            obj.lock_mode, obj.lock_days = form.initial["lock_mode"], form.initial["lock_days"]
        super().save_model(request, obj, form, change)
        journal.record(
            "location_changed" if change else "location_added",
            actor=request.user.get_username(),
            obj=obj,
            fields=[f for f in form.changed_data if not (shorter and f in ("lock_mode", "lock_days"))],
        )
        if shorter:
            asked = LockChange.request(obj, request.user, *shorter, form.cleaned_data["lock_change_reason"])
            self.message_user(request, f"The shorter lock waits for approval: {asked}.", messages.WARNING)
