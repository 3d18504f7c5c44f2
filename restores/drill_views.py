"""DR drills: everyone reads them and their reports; DBAs and Sysadmins log them."""

from django.contrib import messages
from django.db import transaction
from django.shortcuts import get_object_or_404, redirect, render

from backupportal import journal
from backupportal.lib.links import url_for
from backupportal.roles import require_perm
from restores.drill_forms import DrillForm, LessonsForm, StepForm
from restores.models import DrDrill


def _drill(drill_id):
    qs = DrDrill.objects.select_related("server", "logged_by").prefetch_related("steps", "restore_runs__server")
    return get_object_or_404(qs, pk=drill_id)


@require_perm("restores.view_drdrill")
def drill_list(request):
    drills = DrDrill.objects.select_related("server").prefetch_related("steps")[:200]
    return render(request, "drills/list.html", {"drills": drills})


def _read_only(request, drill):
    """A redirect to the drill, saying why, when it is complete: its record is evidence now."""
    if not drill.is_complete:
        return None
    messages.error(request, drill.read_only_message())
    return redirect(drill)


@require_perm("restores.view_drdrill")
def drill_detail(request, drill_id):
    drill = _drill(drill_id)
    context = _report_context(drill)
    context["editable"] = request.user.has_perm("restores.log_drill")
    return render(request, "drills/detail.html", context)


@require_perm("restores.view_drdrill")
def drill_report(request, drill_id):
    return render(request, "drills/report.html", _report_context(_drill(drill_id)))


def _report_context(drill):
    runs = [(run, url_for(run)) for run in drill.restore_runs.all()]
    return {"drill": drill, "steps": drill.steps.all(), "times": drill.recovery_times(), "runs": runs}


@require_perm("restores.log_drill")
def drill_new(request):
    form = DrillForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            drill = form.save(commit=False)
            drill.logged_by = request.user
            drill.save()
            form.save_m2m()
            journal.record("drill_logged", actor=request.user.get_username(), obj=drill)
        messages.success(request, f"Drill “{drill}” logged with its eight steps: record each as it happens.")
        return redirect(drill)
    return render(request, "drills/form.html", {"form": form, "title": "Log a DR drill"})


@require_perm("restores.log_drill")
def drill_edit(request, drill_id):
    drill = _drill(drill_id)
    # Complete, a drill is evidence: only its lessons learned may still be written.
    editing = LessonsForm if drill.is_complete else DrillForm
    form = editing(request.POST if request.method == "POST" else None, instance=drill)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            form.save()
            journal.record(
                "drill_changed",
                actor=request.user.get_username(),
                obj=drill,
                fields=form.changed_data,
                restore_runs=[r.pk for r in drill.restore_runs.all()],
            )
        messages.success(request, "Drill saved.")
        return redirect(drill)
    return render(request, "drills/form.html", {"form": form, "drill": drill, "title": f"Edit “{drill}”"})


@require_perm("restores.log_drill")
def drill_step(request, drill_id, step):
    drill = _drill(drill_id)
    if refused := _read_only(request, drill):
        return refused
    instance = drill.step(step)
    if instance is None:
        messages.error(request, f"A drill has no step {step!r}: choose one of its eight steps.")
        return redirect(drill)
    form = StepForm(request.POST if request.method == "POST" else None, instance=instance)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            form.save()
            journal.record(
                "drill_step_recorded",
                actor=request.user.get_username(),
                obj=drill,
                step=step,
                who=instance.who,
                started_at=instance.started_at,
                finished_at=instance.finished_at,
                outcome=instance.outcome,
            )
        messages.success(request, f"{instance.get_step_display()} recorded.")
        return redirect(drill)
    return render(request, "drills/step.html", {"form": form, "drill": drill, "step": instance})
