from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from backupportal import journal, twofactor
from backupportal.roles import require_perm
from backups.models import BackupRun, Server
from restores import sandbox
from restores.forms import DecisionForm, RestoreRequestForm
from restores.models import RestoreRequest, RestoreRun, RestoreTest
from restores.tasks import enqueue

# The journal's reason for a sandbox removed from its request's page (expiry gives its own).
SANDBOX_REMOVAL_REASON = "asked for on the request's page"


def restore_requests(request):
    qs = RestoreRequest.objects.select_related("server", "into_server", "requested_by", "decided_by").order_by(
        "-requested_at"
    )
    page = Paginator(qs, 50).get_page(request.GET.get("page"))
    return render(request, "restores/requests.html", {"page": page})


@require_perm("restores.request_restore")
def restore_request_new(request):
    form = RestoreRequestForm(request.POST or None, initial=request.GET.dict())
    if request.method == "POST" and form.is_valid():
        req = form.save(commit=False)
        req.requested_by = request.user
        req.save()
        journal.record(
            "restore_requested",
            actor=request.user.get_username(),
            obj=req,
            server=req.server.name,
            destination=req.destination,
            into=req.into_destination,
            run=req.backup_run_id,
            reason=req.reason,
        )
        messages.success(request, f"Restore request #{req.pk} sent: another DBA must approve it.")
        return redirect(req)
    return render(request, "restores/request_form.html", {"form": form})


def restore_request_detail(request, pk):
    req = get_object_or_404(
        RestoreRequest.objects.select_related("server", "backup_run", "into_server", "requested_by", "decided_by"),
        pk=pk,
    )
    runs = list(req.runs.order_by("-created_at"))
    for run in runs:
        run.sandbox_state = None
        if sandbox.is_sandbox(run):
            run.request = req  # its requester and approver, already fetched
            # Asked of the filesystem and pg_ctl, not recorded: a sandbox stopped by hand shows stopped.
            run.sandbox_state, run.sandbox_said = sandbox.look(run)
            run.sandbox_where = sandbox.where(run)
            run.sandbox_expires_at = sandbox.expires_at(run)
            run.sandbox_may_remove = sandbox.may_remove(run, request.user)
    can_decide = req.awaits_decision_by(request.user)  # the dashboard's "waiting for you" asks the same
    asks_code = can_decide and twofactor.asks_code(request)
    return render(
        request,
        "restores/request_detail.html",
        {"req": req, "runs": runs, "form": DecisionForm(), "can_decide": can_decide, "asks_code": asks_code},
    )


@require_POST
@require_perm("restores.request_restore")
def sandbox_remove(request, pk):
    """The DBA who asked for a request's sandbox, or the one who approved it, is done with it: its
    postmaster stopped, its directory removed, here or on the restore worker's host."""
    restore = get_object_or_404(
        RestoreRun.objects.select_related("server", "request__requested_by", "request__decided_by"), pk=pk
    )
    back = restore.request or restore.server
    if not sandbox.is_sandbox(restore):
        messages.error(request, f"Restore #{restore.pk} left no sandbox cluster: there is nothing to remove.")
    elif not sandbox.may_remove(restore, request.user):
        req = restore.request
        messages.error(
            request,
            f"Only {req.requested_by.get_username()} (who asked for request #{req.pk}) or "
            f"{req.decided_by.get_username()} (who approved it) may stop and remove its sandbox.",
        )
    elif request.POST.get("confirm") != "remove":
        messages.error(request, "Tick the box to confirm: the sandbox and everything done in it are deleted.")
    elif not sandbox.on_this_host(restore):
        if sandbox.journal_says_removed(restore):
            messages.success(
                request, f"The sandbox of restore #{restore.pk} was removed already (the journal says by whom)."
            )
        else:
            _queue_sandbox_removal(request, restore)
    else:
        try:
            removed = sandbox.stop_and_remove(restore, request.user.get_username(), SANDBOX_REMOVAL_REASON)
        except OSError as e:
            messages.error(request, str(e))
        else:
            done = "stopped and removed" if removed else "already gone"
            messages.success(request, f"The sandbox of restore #{restore.pk} ({restore.into_datadir}) is {done}.")
    return redirect(back)


def _queue_sandbox_removal(request, restore):
    """With a restore worker the sandbox is on its host, which this web process cannot reach:
    the removal runs there, and the page says it is queued, not done."""
    enqueue(
        "restores.tasks.remove_sandbox",
        restore.pk,
        request.user.get_username(),
        SANDBOX_REMOVAL_REASON,
        task_name=f"remove sandbox of restore #{restore.pk}",
    )
    messages.success(
        request,
        f"Removal of the sandbox of restore #{restore.pk} ({restore.into_datadir}) queued for the restore "
        f"worker on {sandbox.where(restore)}: the journal records it once done.",
    )


@require_POST
@require_perm("restores.approve_restore")
def restore_request_approve(request, pk):
    req = get_object_or_404(RestoreRequest, pk=pk)
    form = DecisionForm(request.POST)
    form.is_valid()
    # Asked only of someone who could approve: the model's own refusals (one's own request, not a
    # DBA) keep their 403 and their journal line below.
    if req.awaits_decision_by(request.user) and (
        refusal := twofactor.refused_approval(request, req, server=req.server.name)
    ):
        messages.error(request, refusal)
        return redirect(req)
    try:
        req.approve(request.user, form.cleaned_data.get("confirm_database", ""), form.cleaned_data.get("note", ""))
    except PermissionDenied as e:
        journal.record(
            "restore_approval_refused",
            actor=request.user.get_username(),
            obj=req,
            server=req.server.name,
            outcome="refused",
            reason=str(e),
        )
        raise
    except ValidationError as e:
        messages.error(request, e.messages[0])
        return redirect(req)
    journal.record(
        "restore_approved",
        actor=request.user.get_username(),
        obj=req,
        server=req.server.name,
        into=req.into_destination,
        note=req.decision_note,
    )
    enqueue("restores.tasks.run_request", req.pk, task_name=f"restore request #{req.pk}")
    messages.success(request, f"Request #{req.pk} approved; the restore runs on a worker.")
    return redirect(req)


@require_POST
@require_perm("restores.approve_restore")
def restore_request_reject(request, pk):
    req = get_object_or_404(RestoreRequest, pk=pk)
    form = DecisionForm(request.POST)
    form.is_valid()
    try:
        req.reject(request.user, form.cleaned_data.get("note", ""))
    except ValidationError as e:
        messages.error(request, e.messages[0])
        return redirect(req)
    journal.record(
        "restore_rejected", actor=request.user.get_username(), obj=req, server=req.server.name, note=req.decision_note
    )
    messages.success(request, f"Request #{req.pk} rejected; it will never run.")
    return redirect(req)


def restore_progress(request, pk):
    restore = get_object_or_404(RestoreRun, pk=pk)
    return JsonResponse(
        {
            "id": restore.pk,
            "status": restore.status,
            "bytes_done": restore.bytes_done,
            "error": restore.error,
            "elapsed_s": round(restore.duration_s or 0, 1),
            "done": restore.done,
        }
    )


@require_POST
@require_perm("backups.run_backup")
def restore_test_now(request, name):
    """A DBA's click: the test exists (queued) at once, so that its page can follow it."""
    server = get_object_or_404(Server, name=name)
    kind = request.POST.get("kind", BackupRun.Kind.LOGICAL)
    if kind not in (BackupRun.Kind.LOGICAL, BackupRun.Kind.BASE):
        messages.error(request, f"Unknown backup kind {kind!r}: a restore test is of a logical or a base backup.")
        return redirect(server)
    test = RestoreTest.objects.create(server=server, kind=kind, phase="queued")
    actor = request.user.get_username()
    journal.record("restore_test_requested", actor=actor, obj=test, server=server.name, kind=kind)
    enqueue(
        "restores.tasks.run_restore_test", server.name, kind=kind, test_id=test.pk, task_name=f"restore test {server}"
    )
    messages.success(request, f"Restore test #{test.pk} of {server} queued; this page follows it.")
    return redirect(test)


def restore_test_detail(request, pk):
    test = get_object_or_404(RestoreTest.objects.select_related("server", "backup_run"), pk=pk)
    return render(request, "restores/test_detail.html", {"test": test, "restores": test.restores.all()})


def restore_test_progress(request, pk):
    """Polled by the test's page while it runs (static/js/progress.js): no manual reload."""
    return JsonResponse(get_object_or_404(RestoreTest, pk=pk).progress())
