"""The admin's side of destructive changes (backups.changes): a save or a delete that would
shorten retention, turn a schedule down, retire or remove a location opens a change request
instead, and says so. Legal holds and change requests themselves are read-only here: they are
placed, asked for and decided on the run page and the Changes page."""

from django import forms
from django.contrib import admin, messages
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.html import format_html

from backupportal.lib.admin import ReadOnlyAdmin
from backups.changes import remove_problem, request_problem
from backups.models import BackupHold, ChangeRequest

Kind = ChangeRequest.Kind


def reason_field(what):
    """The form field asked only when the save is a destructive change."""
    return forms.CharField(
        label="Reason (for a second approval)",
        required=False,
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text=f"{what} waits for another DBA or Sysadmin to approve it on the Changes page: say why. "
        "Other changes apply at once.",
    )


def check_request(form, kind, target):
    """In a form's clean(): the reason given and no request of the kind already waiting."""
    problem = request_problem(kind, target, form.cleaned_data.get("change_reason"))
    if problem:
        form.add_error("change_reason", problem)


def open_request(model_admin, request, kind, target, reason, changes=None, what="This change"):
    """Open the request (the form checked it can be) and tell the user where it waits."""
    change = ChangeRequest.open(kind, target, request.user, reason, changes)
    model_admin.message_user(
        request,
        format_html(
            '{} waits for another DBA or Sysadmin: <a href="{}">change request #{}</a>. '
            "Nothing of it is applied until it is approved.",
            what,
            reverse("changes"),
            change.pk,
        ),
        messages.WARNING,
    )
    return change


class RemovalAsRequestAdmin(admin.ModelAdmin):
    """Deleting a row (a storage location) asks for its removal instead: the confirmation page
    takes the reason, and nothing is deleted until another DBA or Sysadmin approves."""

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # a bulk delete would delete at once
        return actions

    def delete_view(self, request, object_id, extra_context=None):
        obj = self.get_object(request, object_id)
        if request.method == "POST" and obj is not None and self.has_delete_permission(request, obj):
            problem = remove_problem(obj) or request_problem(
                Kind.REMOVE_LOCATION, obj, request.POST.get("change_reason")
            )
            if problem:
                self.message_user(request, problem, messages.ERROR)
                return redirect(reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk]))
        return super().delete_view(request, object_id, extra_context)

    def log_deletions(self, request, queryset):
        """Nothing is deleted here: the journal has the request."""

    def delete_model(self, request, obj):
        open_request(
            self, request, Kind.REMOVE_LOCATION, obj, request.POST.get("change_reason"), what=f"Removing {obj}"
        )

    def response_delete(self, request, obj_display, obj_id):
        return redirect(reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[obj_id]))


@admin.register(BackupHold)
class BackupHoldAdmin(ReadOnlyAdmin):
    list_display = ["run", "reason", "held_by", "held_at", "released_at"]
    list_filter = [("released_at", admin.EmptyFieldListFilter)]
    list_select_related = ["run", "held_by"]


@admin.register(ChangeRequest)
class ChangeRequestAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "target_repr", "changes_text", "state", "requested_by", "requested_at", "decided_by"]
    list_filter = ["state", "kind"]
    list_select_related = ["requested_by", "decided_by"]
