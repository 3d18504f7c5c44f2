"""Forms of the DR drill pages."""

from datetime import timedelta

from django import forms
from django.utils import timezone

from backupportal.lib.inputs import ModelMultipleChoiceField, SaneInputsMixin
from restores.models import DrDrill, DrDrillStep, RestoreRun
from restores.models.drills import restore_run_problem


class LocalDateTimeInput(forms.DateTimeInput):
    input_type = "datetime-local"

    def __init__(self, **kwargs):
        super().__init__(format="%Y-%m-%dT%H:%M", **kwargs)


class DrillForm(SaneInputsMixin, forms.ModelForm):
    class Meta:
        model = DrDrill
        fields = [
            "title",
            "server",
            "scenario",
            "started_at",
            "critical_restored_at",
            "restore_runs",
            "lessons_learned",
        ]
        widgets = {
            "started_at": LocalDateTimeInput(),
            "critical_restored_at": LocalDateTimeInput(),
            "scenario": forms.Textarea(attrs={"rows": 3}),
            "lessons_learned": forms.Textarea(attrs={"rows": 5}),
        }
        field_classes = {"restore_runs": ModelMultipleChoiceField}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The restore runs a drill can have used: this past year's, and any it already names.
        since = timezone.now() - timedelta(days=400)
        runs = RestoreRun.objects.filter(created_at__gte=since)
        if self.instance.pk:
            runs = runs | RestoreRun.objects.filter(drills=self.instance)
        self.fields["restore_runs"].queryset = runs.select_related("server").distinct().order_by("-created_at")
        self.fields["restore_runs"].required = False

    def clean(self):
        cleaned = super().clean()
        check_restore_runs(self, cleaned)
        return cleaned


def check_restore_runs(form, cleaned):
    """A form error on restore_runs for each run newly linked (every run, when the declaration
    moves) that was not run during the drill. Runs linked before this check stand."""
    runs, declared = cleaned.get("restore_runs"), cleaned.get("started_at")
    if runs is None or declared is None:
        return
    drill = form.instance
    linked = set(drill.restore_runs.values_list("pk", flat=True)) if drill.pk else set()
    moved = drill.pk is not None and declared != DrDrill.objects.get(pk=drill.pk).started_at
    for run in runs:
        if moved or run.pk not in linked:
            if problem := restore_run_problem(run, declared):
                form.add_error("restore_runs", problem)


class StepForm(SaneInputsMixin, forms.ModelForm):
    class Meta:
        model = DrDrillStep
        fields = ["who", "started_at", "finished_at", "outcome", "notes"]
        widgets = {
            "started_at": LocalDateTimeInput(),
            "finished_at": LocalDateTimeInput(),
            "notes": forms.Textarea(attrs={"rows": 4}),
        }


class DrillAdminForm(SaneInputsMixin, forms.ModelForm):
    """The admin's drill form: the same checks as the portal's."""

    class Meta:
        field_classes = {"restore_runs": ModelMultipleChoiceField}

    def clean(self):
        cleaned = super().clean()
        if self.instance.pk and "restore_runs" in cleaned:  # the model's clean cannot see a many-to-many
            self.instance.check_editable(restore_runs=[run.pk for run in cleaned["restore_runs"]])
        check_restore_runs(self, cleaned)
        return cleaned


class StepAdminForm(SaneInputsMixin, forms.ModelForm):
    pass


class LessonsForm(forms.ModelForm):
    """A complete drill's only field still open: what was learned, written once it is over."""

    class Meta:
        model = DrDrill
        fields = ["lessons_learned"]
        widgets = {"lessons_learned": forms.Textarea(attrs={"rows": 5})}
