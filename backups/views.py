from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from backupportal.lib.cron import cron_problem
from backupportal.roles import require_perm
from backups import retention
from backups.changes import request_problem, schedule_turned_down
from backups.models import BackupRun, ChangeRequest, Server, Verification


@require_POST
@require_perm("backups.run_backup")
def backup_now(request, name):
    from backups.tasks import enqueue_backup

    server = get_object_or_404(Server, name=name)
    kind = request.POST.get("kind", BackupRun.Kind.LOGICAL)
    if kind not in BackupRun.Kind.values:
        messages.error(request, f"Unknown backup kind {kind!r}: choose logical, base or incremental.")
        return redirect(server)
    result = enqueue_backup(server, kind, actor=request.user.get_username())
    if not result.ok:
        messages.warning(request, result.message)
        return redirect(result.run or server)
    messages.success(request, result.message)
    return redirect(result.run)


def run_detail(request, run_id):
    run = get_object_or_404(BackupRun.objects.select_related("server"), pk=run_id)
    copies = run.copies.select_related("location").order_by("location__name", "artifact")
    verifications = run.verifications.all()[:5]
    holds = run.holds.select_related("held_by").all()
    pending = ChangeRequest.objects.pending().filter(
        kind=ChangeRequest.Kind.RELEASE_HOLD, target_id__in=[h.pk for h in holds if h.released_at is None]
    )
    context = {"run": run, "copies": copies, "verifications": verifications, "holds": holds}
    context |= {"active_hold": next((h for h in holds if h.released_at is None), None), "release": pending.first()}
    context["deletion"] = (
        ChangeRequest.objects.pending().filter(kind=ChangeRequest.Kind.DELETE_BACKUP, target_id=run.pk).first()
    )
    return render(request, "backups/run.html", context)


def run_progress(request, run_id):
    """Polled by the run page while the run is active: no manual reload."""
    run = get_object_or_404(BackupRun, pk=run_id)
    duration = run.duration
    return JsonResponse(
        {
            "id": run.pk,
            "status": run.status,
            "bytes_done": run.bytes_done,
            "size": run.size,
            "elapsed_s": round(duration.total_seconds(), 1) if duration else 0,
            "error": run.error,
            "done": run.status in (BackupRun.Status.SUCCEEDED, BackupRun.Status.FAILED),
        }
    )


@require_POST
@require_perm("backups.run_backup")
def verify_run(request, run_id):
    """A DBA asks for one run's copies to be re-read now, on a worker."""
    from backups.tasks import enqueue_verify

    run = get_object_or_404(BackupRun, pk=run_id)
    result = enqueue_verify(run, actor=request.user.get_username())
    (messages.success if result.ok else messages.warning)(request, result.message)
    # To the new verification, or to the one already running: its page follows it.
    return redirect(run.verifications.first() or run)


def verification_detail(request, pk):
    verification = get_object_or_404(Verification.objects.select_related("run__server"), pk=pk)
    verification.fail_if_stale()  # a dead worker's verification says so, rather than "running" for ever
    return render(request, "backups/verification.html", {"verification": verification})


def verification_progress(request, pk):
    """Polled by the verification page until it is done: no manual reload."""
    verification = get_object_or_404(Verification, pk=pk)
    verification.fail_if_stale()
    return JsonResponse(verification.progress())


@require_POST
@require_perm("backups.change_backupschedule")
def schedule_edit(request, name):
    """DBAs edit a server's cron fields here; django-q2's raw Schedule admin stays superusers-only."""
    from django.core.exceptions import ValidationError

    from backups import schedules
    from backups.models import BackupSchedule

    server = get_object_or_404(Server, name=name)
    job = request.POST.get("job", "")
    if job not in BackupSchedule.Job.values:  # never handed to the database (a NUL is a DataError there)
        raise Http404(f"no job {job[:40]!r}")
    schedule = get_object_or_404(BackupSchedule, server=server, job=job)
    cron, enabled = request.POST.get("cron", "").strip(), request.POST.get("enabled") == "on"
    problem = cron_problem(cron)
    if problem:
        messages.error(request, problem)
        return redirect(server)
    turned_down = schedule_turned_down(schedule, cron, enabled)
    if turned_down:  # disabled, or weakened over a year (backups.changes): another DBA or Sysadmin approves it
        return _request_schedule_change(request, schedule, turned_down)
    schedule.cron, schedule.enabled = cron, enabled
    try:
        schedule.full_clean()
    except ValidationError as e:
        messages.error(request, " ".join(e.messages))
        return redirect(server)
    schedules.change(schedule, actor=request.user.get_username())
    messages.success(
        request,
        f"{schedule.get_job_display()} of {server} now runs at '{schedule.cron}' ({'enabled' if schedule.enabled else 'disabled'}).",
    )
    return redirect(server)


def server_retention(request, name):
    """Every good backup of a server with the rule that keeps it or the day it goes, 100 a page
    (the dry run of `retention`, in the browser)."""
    server = get_object_or_404(Server, name=name)
    now = timezone.now()
    page = Paginator(list(retention.plan(server, now).items()), 100).get_page(request.GET.get("page"))
    page.object_list = retention.rows(server, page.object_list, now)  # this page's rows alone
    return render(request, "backups/retention.html", {"server": server, "page": page})


def _request_schedule_change(request, schedule, changes):
    reason = request.POST.get("change_reason", "")
    problem = request_problem(ChangeRequest.Kind.SCHEDULE_LESS_OFTEN, schedule, reason)
    if problem:
        messages.error(request, problem)
        return redirect(schedule.server)
    change = ChangeRequest.open(ChangeRequest.Kind.SCHEDULE_LESS_OFTEN, schedule, request.user, reason, changes)
    messages.warning(
        request,
        f"{schedule.get_job_display()} of {schedule.server} is unchanged until another DBA or Sysadmin approves "
        f"change request #{change.pk} ({change.changes_text}).",
    )
    return redirect(schedule.server)
