"""Completing a maintenance task: the evidence, chosen from what the portal recorded."""

from django import forms
from django.core.exceptions import ValidationError

from backupportal.models import JournalEntry
from restores.models import DrDrill, RestoreTest
from watching import maintenance

SESSION_ACTIONS = ("login", "logout", "login_failed", "second_factor_verified", "second_factor_failed")


class CompleteTask(forms.Form):
    """Completing a maintenance task: the evidence, chosen from what the portal recorded."""

    evidence = forms.ChoiceField(required=False, label="Evidence recorded by the portal")
    evidence_url = forms.CharField(
        required=False,
        max_length=500,
        label="…or a link",
        help_text="https://… (a document, a ticket) or /… (a portal page)",
    )
    notes = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))

    def __init__(self, *args, task, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task
        self.fields["evidence"].choices = [("", "—")] + self.candidates()
        if "url" not in maintenance.EVIDENCE[task.kind]:
            del self.fields["evidence_url"]

    def candidates(self):
        """Recent evidence of the kinds this task takes, newest first (50 of each at most)."""
        allowed = maintenance.EVIDENCE[self.task.kind]
        groups = []
        if "restore_test" in allowed:
            tests = RestoreTest.objects.exclude(status="running").select_related("server")[:50]
            groups.append(
                ("Restore tests", [(f"restore_test:{t.pk}", f"{t} ({t.started_at:%Y-%m-%d})") for t in tests])
            )
        if "drill" in allowed:
            drills = DrDrill.objects.select_related("server")[:50]
            groups.append(("DR drills", [(f"drill:{d.pk}", f"{d} ({d.started_at:%Y-%m-%d})") for d in drills]))
        if "entry" in allowed:
            # Sessions are nobody's evidence of work done: they would fill the list.
            entries = JournalEntry.objects.exclude(action__in=SESSION_ACTIONS).order_by("-at", "-id")
            if self.task.kind == maintenance.Kind.WEEKLY_VERIFY:
                entries = entries.filter(action__startswith=maintenance.VERIFY_ACTION_PREFIX)
            groups.append(("Journal entries", [(f"entry:{e.pk}", f"#{e.pk} {e}") for e in entries[:50]]))
        return [g for g in groups if g[1]]

    def clean(self):
        data = super().clean()
        choice, url = data.get("evidence"), (data.get("evidence_url") or "").strip()
        if choice and url:
            raise ValidationError("Give one piece of evidence: a recorded one or a link, not both.")
        data["evidence_ref"] = ("url", url) if url else self._lookup(choice) if choice else None
        try:
            maintenance.check_evidence(self.task.kind, data["evidence_ref"])
        except ValidationError as e:
            raise ValidationError(e.messages) from None
        return data

    def _lookup(self, choice):
        models = {"restore_test": RestoreTest, "drill": DrDrill, "entry": JournalEntry}
        kind_of, _, pk = choice.partition(":")
        try:
            return kind_of, models[kind_of].objects.get(pk=int(pk))
        except (KeyError, ValueError, models.get(kind_of, JournalEntry).DoesNotExist):
            raise ValidationError(f"No such evidence {choice!r}: choose one from the list.") from None
