"""The maintenance calendar: everyone reads it; DBAs and Sysadmins complete its tasks."""

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone

from backupportal.roles import require_perm
from watching import maintenance
from watching.forms import CompleteTask
from watching.models import MaintenanceTask

RELATED = ["completed_by", "evidence_entry", "evidence_restore_test", "evidence_drill"]


@require_perm("watching.view_maintenancetask")
def calendar(request):
    today = timezone.localdate()
    return render(
        request,
        "maintenance/calendar.html",
        {
            "today": today,
            "open_tasks": MaintenanceTask.objects.filter(completed_at=None).order_by("due_on"),
            "done": MaintenanceTask.objects.exclude(completed_at=None)
            .select_related(*RELATED)
            .order_by("-completed_at")[:50],
        },
    )


@require_perm("watching.complete_maintenance")
def complete(request, task_id):
    task = get_object_or_404(MaintenanceTask, pk=task_id)
    if task.completed_at is not None:
        messages.info(
            request, f"“{task}” was already completed by {task.completed_by} on {task.completed_at:%Y-%m-%d}."
        )
        return redirect(task)
    form = CompleteTask(request.POST if request.method == "POST" else None, task=task)
    if request.method == "POST" and form.is_valid():
        try:
            done, following = maintenance.complete(
                task, by=request.user, evidence=form.cleaned_data["evidence_ref"], notes=form.cleaned_data["notes"]
            )
        except ValidationError as e:
            form.add_error(None, e)
        else:
            messages.success(
                request, f"Completed “{done.get_kind_display()}”; the next one is due {following.due_on:%Y-%m-%d}."
            )
            return redirect(following)
    return render(request, "maintenance/complete.html", {"task": task, "form": form})
