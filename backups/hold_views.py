"""Legal holds and deleting a backup by hand on the run page, and the change requests page where a
second DBA or Sysadmin approves a destructive change or rejects it. Never its requester."""

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from backupportal import journal, twofactor
from backupportal.roles import require_perm
from backups.changes import delete_problem
from backups.models import BackupHold, BackupRun, ChangeRequest


@require_POST
@require_perm("backups.hold_backup")
def hold_run(request, run_id):
    run = get_object_or_404(BackupRun.objects.select_related("server"), pk=run_id)
    try:
        BackupHold.place(run, request.user, request.POST.get("reason", ""))
    except ValidationError as e:
        messages.error(request, e.messages[0])
    else:
        messages.success(request, f"Backup #{run.pk} is held: retention keeps it until a release is approved.")
    return redirect(run)


@require_POST
@require_perm("backups.request_change")
def request_release(request, run_id):
    run = get_object_or_404(BackupRun, pk=run_id)
    hold = run.holds.active().first()
    if hold is None:
        messages.error(request, f"Backup #{run.pk} is not held: there is nothing to release.")
        return redirect(run)
    try:
        hold.request_release(request.user, request.POST.get("reason", ""))
    except ValidationError as e:
        messages.error(request, e.messages[0])
    else:
        messages.success(request, "Release requested: the hold stays until another DBA or Sysadmin approves it.")
    return redirect(run)


@require_POST
@require_perm("backups.request_change")
def request_delete(request, run_id):
    """Deleting a backup by hand: a change request; the backup stays until it is approved."""
    run = get_object_or_404(BackupRun.objects.select_related("server"), pk=run_id)
    problem = delete_problem(run)
    if problem:
        messages.error(request, problem)
        return redirect(run)
    try:
        ChangeRequest.open(ChangeRequest.Kind.DELETE_BACKUP, run, request.user, request.POST.get("reason", ""))
    except ValidationError as e:
        messages.error(request, e.messages[0])
    else:
        messages.success(request, f"Deletion requested: backup #{run.pk} stays until another DBA or Sysadmin approves.")
    return redirect(run)


def change_requests(request):
    """Pending change requests first, then the last decided ones."""
    pending = ChangeRequest.objects.pending().select_related("requested_by")
    decided = ChangeRequest.objects.exclude(state=ChangeRequest.State.PENDING).select_related(
        "requested_by", "decided_by"
    )[:20]
    pending = list(pending)
    for change in pending:
        change.can_decide = change.awaits_decision_by(request.user)
        change.now_named = change.renamed_to()  # a few pending rows: one query each
        change.address = change.target_address()
    asks_code = any(c.can_decide for c in pending) and twofactor.asks_code(request)
    return render(request, "backups/changes.html", {"pending": pending, "decided": decided, "asks_code": asks_code})


@require_POST
@require_perm("backups.approve_change")
def change_approve(request, pk):
    return _decide(request, pk, "approve")


@require_POST
@require_perm("backups.approve_change")
def change_reject(request, pk):
    return _decide(request, pk, "reject")


def _decide(request, pk, decision):
    change = get_object_or_404(ChangeRequest, pk=pk)
    refusal = ""
    if decision == "approve" and change.awaits_decision_by(request.user):
        # A destructive change needs a fresh second factor, as a restore does (DESIGN.md).
        refusal = twofactor.refused_approval(request, change)
    if refusal:
        messages.error(request, refusal)
        return redirect(reverse("changes"))
    try:
        getattr(change, decision)(request.user)
    except PermissionDenied as e:
        journal.record(
            "change_decision_refused",
            actor=request.user.get_username(),
            obj=change,
            outcome="refused",
            reason=str(e),
        )
        raise
    except ValidationError as e:
        messages.error(request, e.messages[0])
    else:
        messages.success(request, f"Change request #{change.pk} {change.state}.")
    return redirect(reverse("changes"))
