"""DR drills: the strategy's eight steps, timed against the recovery objectives; read-only once complete."""

from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.urls import reverse
from django.utils import timezone

# A time typed up to this far ahead of the portal's clock is a clock's drift or a rounded minute;
# beyond it, a record of what has not happened yet (and, once complete, frozen as evidence).
CLOCK_SLACK = timedelta(minutes=5)

# The strategy's objectives, for a drill that names no server.
DEFAULT_RTO_CRITICAL_MINUTES = 240
DEFAULT_RTO_FULL_MINUTES = 480


class DrDrill(models.Model):
    """A disaster-recovery drill, following the strategy's eight steps.

    The recovery clock starts when the disaster is declared (`started_at`). The full system is
    back when the go-live step ends; critical functions (user authentication, core operations)
    when `critical_restored_at` says, or at go-live when it is not recorded.
    """

    STEPS = [
        ("assessment", "Assessment"),
        ("communication", "Communication"),
        ("recovery_environment", "Recovery environment"),
        ("database_restore", "Database restore"),
        ("application_deployment", "Application deployment"),
        ("validation", "Validation"),
        ("go_live", "Go-live"),
        ("post_recovery", "Post-recovery"),
    ]
    STEP_HELP = {
        "assessment": "Identify scope and nature of disaster",
        "communication": "Notify stakeholders and users",
        "recovery_environment": "Provision replacement infrastructure",
        "database_restore": "Execute appropriate restore procedure",
        "application_deployment": "Deploy application stack",
        "validation": "Comprehensive functionality testing",
        "go_live": "Switch users to recovered system",
        "post_recovery": "Monitor and document lessons learned",
    }

    title = models.CharField(max_length=200)
    server = models.ForeignKey(
        "backups.Server",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="drills",
        help_text="whose RTO objectives the drill is measured against; empty: the strategy's 4 h and 8 h",
    )
    scenario = models.TextField(blank=True)
    started_at = models.DateTimeField(
        default=timezone.now, help_text="when the disaster was declared: the recovery clock starts"
    )
    critical_restored_at = models.DateTimeField(
        null=True, blank=True, help_text="when user authentication and core operations were back"
    )
    restore_runs = models.ManyToManyField("restores.RestoreRun", blank=True, related_name="drills")
    lessons_learned = models.TextField(blank=True)
    logged_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-started_at"]
        permissions = [("log_drill", "Can log a DR drill")]
        verbose_name, verbose_name_plural = "DR drill", "DR drills"

    def __str__(self):
        return self.title

    def save(self, *args, **kwargs):
        adding = self._state.adding
        super().save(*args, **kwargs)
        if adding:
            DrDrillStep.objects.bulk_create(
                DrDrillStep(drill=self, step=step, position=i) for i, (step, _) in enumerate(self.STEPS)
            )

    def get_absolute_url(self):
        return reverse("drill", args=[self.pk])

    def clean(self):
        self.check_editable()
        if not self._times_changed():
            return  # lessons learned written on a closed drill: its recorded times are not re-judged
        if self.critical_restored_at and self.critical_restored_at < self.started_at:
            raise ValidationError(
                {"critical_restored_at": "Critical functions cannot be back before the disaster was declared."}
            )
        if _future(self.critical_restored_at):
            raise ValidationError(
                {
                    "critical_restored_at": f"Critical functions cannot be back in the future "
                    f"({_at(self.critical_restored_at)}): give the time they were back."
                }
            )
        # Moved after a step's start, the declaration would make that step, and the recovery
        # time measured from it, end before the disaster began.
        early = next((s for s in self._recorded_steps() if s.started_at and s.started_at < self.started_at), None)
        if early:
            at = _at(early.started_at)
            raise ValidationError(
                {
                    "started_at": f"{early.get_step_display()} started at {at}, before this declaration: "
                    f"declare the disaster at {at} or earlier, or correct that step."
                }
            )

    # What a complete drill keeps as it was: its steps too (check_editable). Its lessons learned,
    # written once it is over, may still be added.
    FROZEN = ("title", "server_id", "scenario", "started_at", "critical_restored_at")

    def check_editable(self, step=None, restore_runs=None):
        """ValidationError when the drill is complete as the database records it (not as a form
        has just changed a step in memory) and this changes a `step` (a DrDrillStep that differs
        from its row), what the drill recorded, or the restore runs it names (`restore_runs`, their
        ids): a finished drill is audit evidence."""
        if not _all_done(self._recorded_steps()):
            return
        before = DrDrill.objects.filter(pk=self.pk).values(*self.FROZEN).first() or {}
        runs_changed = restore_runs is not None and set(restore_runs) != set(
            self.restore_runs.values_list("pk", flat=True)
        )
        if step is not None or runs_changed or any(before.get(f) != getattr(self, f) for f in self.FROZEN):
            raise ValidationError(self.read_only_message())

    def _times_changed(self):
        times = ("started_at", "critical_restored_at")
        before = DrDrill.objects.filter(pk=self.pk).values(*times).first() if self.pk else None
        return before is None or any(before[f] != getattr(self, f) for f in times)

    def read_only_message(self):
        return (
            f"“{self}” is complete: its record is the evidence of the drill and read-only but for its lessons"
            " learned; log a new drill for another."
        )

    def _recorded_steps(self):
        return list(DrDrillStep.objects.filter(drill_id=self.pk)) if self.pk else []

    def step(self, name):
        return next((s for s in self.steps.all() if s.step == name), None)

    @property
    def full_restored_at(self):
        go_live = self.step("go_live")
        return go_live.finished_at if go_live else None

    @property
    def status(self):
        """planned, in progress, complete, or complete with failed steps: from what was recorded.

        A step with only an outcome, a name or notes entered was still entered: the drill is
        under way. A step is done when it finished or has an outcome."""
        steps = list(self.steps.all())
        if _all_done(steps):
            failed = [s for s in steps if s.outcome == DrDrillStep.Outcome.FAILED]
            return f"complete, {len(failed)} step{'s' if len(failed) > 1 else ''} failed" if failed else "complete"
        if self.critical_restored_at or any(s.entered for s in steps):
            return "in progress"
        return "planned"

    @property
    def is_complete(self):
        """Every step done: from then on the drill is read-only (`check_editable`)."""
        return _all_done(list(self.steps.all()))

    def objectives(self):
        """(critical, full) RTO objectives in minutes: the server's, else the strategy's."""
        if self.server is not None:
            return self.server.rto_critical_minutes, self.server.rto_full_minutes
        return DEFAULT_RTO_CRITICAL_MINUTES, DEFAULT_RTO_FULL_MINUTES

    def recovery_times(self):
        """The measured recovery times against the RTO objectives, for the report."""
        critical_minutes, full_minutes = self.objectives()
        full_at = self.full_restored_at
        critical_at = self.critical_restored_at or full_at
        return [
            _measure("Critical functions", critical_minutes, self.started_at, critical_at),
            _measure("Full system", full_minutes, self.started_at, full_at),
        ]


def restore_run_problem(run, declared):
    """Why the RestoreRun `run` is no restore of a drill declared at `declared`, in one line, or ''.
    A run queued and never started, or one run before the disaster, would make the drill's
    "Restore runs used" a restore that did not happen in it."""
    if run.started_at is None:
        return f"Restore run #{run.pk} never started: link the restores run during the drill."
    if run.started_at < declared:
        return (
            f"Restore run #{run.pk} started at {_at(run.started_at)}, before the disaster was declared "
            f"({_at(declared)}): link the restores run during the drill."
        )
    return ""


def _measure(label, objective_minutes, start, end):
    objective = timedelta(minutes=objective_minutes)
    measured = end - start if end else None
    # A recovery that ends before the disaster was declared is a mistyped time, not a fast
    # recovery: it meets no objective, and the report asks for the times to be corrected.
    impossible = measured is not None and measured < timedelta(0)
    known = measured is not None and not impossible
    return {
        "label": label,
        "objective": objective,
        "measured": measured,
        "met": measured <= objective if known else None,
        "margin": objective - measured if known else None,
        "impossible": impossible,
    }


def _all_done(steps):
    return bool(steps) and all(s.done for s in steps)


def _at(when):
    return f"{timezone.localtime(when):%Y-%m-%d %H:%M}"


def _future(when):
    return when is not None and when > timezone.now() + CLOCK_SLACK


class DrDrillStep(models.Model):
    class Outcome(models.TextChoices):
        OK = "ok", "OK"
        ISSUES = "issues", "With issues"
        FAILED = "failed", "Failed"

    drill = models.ForeignKey(DrDrill, on_delete=models.CASCADE, related_name="steps")
    step = models.CharField(max_length=32, choices=DrDrill.STEPS)
    position = models.PositiveSmallIntegerField(default=0, editable=False)
    who = models.CharField(max_length=150, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=10, choices=Outcome.choices, blank=True)
    notes = models.TextField(blank=True)

    class Meta:
        ordering = ["drill", "position"]
        constraints = [models.UniqueConstraint(fields=["drill", "step"], name="one_row_per_drill_step")]
        verbose_name = "DR drill step"

    def __str__(self):
        return f"{self.drill}: {self.get_step_display()}"

    RECORDED = ("step", "position", "who", "started_at", "finished_at", "outcome", "notes")

    def changed(self):
        """Does this step differ from its recorded row?"""
        before = DrDrillStep.objects.filter(pk=self.pk).values(*self.RECORDED).first() if self.pk else None
        return before is None or any(before[f] != getattr(self, f) for f in self.RECORDED)

    def clean(self):
        if not self.changed():
            return  # the admin validates every row of the drill, changed or not: what was recorded stands
        self.drill.check_editable(step=self)
        name = self.get_step_display()
        if self.finished_at and not self.started_at:
            raise ValidationError({"started_at": f"{name} has a finish but no start: give the start too."})
        if self.started_at and self.finished_at and self.finished_at < self.started_at:
            raise ValidationError(
                {
                    "finished_at": f"{name} cannot finish before it started ({_at(self.started_at)}): "
                    "give a finish at or after the start, or correct the start."
                }
            )
        for field, verb in (("started_at", "start"), ("finished_at", "finish")):
            if _future(getattr(self, field)):
                at = _at(getattr(self, field))
                raise ValidationError({field: f"{name} cannot {verb} in the future ({at}): give the time it {verb}ed."})
        if self.outcome and _future(self.drill.started_at):
            raise ValidationError(
                {
                    "outcome": f"The disaster is declared for {_at(self.drill.started_at)}: record {name} once it has happened."
                }
            )
        if self.started_at and self.started_at < self.drill.started_at:
            raise ValidationError(
                {
                    "started_at": f"{name} cannot start before the disaster was declared ({_at(self.drill.started_at)}): "
                    "give a start at or after it."
                }
            )

    @property
    def help(self):
        return DrDrill.STEP_HELP[self.step]

    @property
    def entered(self):
        return bool(self.started_at or self.finished_at or self.outcome or self.who or self.notes)

    @property
    def done(self):
        return bool(self.finished_at or self.outcome)

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None
