"""Forms of the journal and the maintenance calendar."""

import datetime

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import Q
from django.utils import timezone

from backupportal import journal, maintenance
from backupportal.lib.inputs import SaneInputsMixin
from backupportal.models import JournalEntry


class JournalFilter(SaneInputsMixin, forms.Form):
    """The auditor's filters. Every field is optional; dates are whole days in TIME_ZONE."""

    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To (inclusive)", widget=forms.DateInput(attrs={"type": "date"}))
    actor = forms.CharField(required=False, label="User", max_length=150)
    action = forms.CharField(required=False, max_length=64, widget=forms.TextInput(attrs={"list": "journal-actions"}))
    server = forms.CharField(required=False, max_length=63, widget=forms.TextInput(attrs={"list": "journal-servers"}))
    outcome = forms.ChoiceField(required=False, choices=[("", "any")] + JournalEntry.Outcome.choices)

    def clean(self):
        data = super().clean()
        if data.get("date_from") and data.get("date_to") and data["date_to"] < data["date_from"]:
            raise ValidationError("The range ends before it starts: swap From and To.")
        return data

    def filter(self, qs):
        """The filtered queryset; the form must be valid."""
        data = self.cleaned_data
        if data.get("date_from"):
            qs = qs.filter(at__gte=_start_of(data["date_from"]))
        if data.get("date_to"):
            qs = qs.filter(at__lt=_start_of(data["date_to"] + datetime.timedelta(days=1)))
        for field in ("actor", "action", "server", "outcome"):
            if data.get(field):
                qs = qs.filter(**{field: data[field].strip()})
        return qs

    def query_string(self):
        """The filters as a URL query, for the page links and the CSV export."""
        from urllib.parse import urlencode

        return urlencode({k: v for k, v in self.data.items() if k in self.fields and v})

    @staticmethod
    def known_actions():
        return sorted(journal.ACTIONS.items())


def _start_of(day):
    return timezone.make_aware(datetime.datetime.combine(day, datetime.time.min))


def keyset(qs, older_than=None, newer_than=None):
    """Order newest first and start after (or before) a cursor entry, with no COUNT(*).

    The cursor is an entry (at, id); an index on (..., at, id) answers each page directly.
    """
    if older_than is not None:
        at, pk = older_than
        return qs.filter(Q(at__lt=at) | Q(at=at, id__lt=pk), at__lte=at).order_by("-at", "-id")
    if newer_than is not None:
        at, pk = newer_than
        return qs.filter(Q(at__gt=at) | Q(at=at, id__gt=pk), at__gte=at).order_by("at", "id")
    return qs.order_by("-at", "-id")


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
        from restores.models import DrDrill, RestoreTest

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
            entries = JournalEntry.objects.order_by("-at", "-id")
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
        from restores.models import DrDrill, RestoreTest

        models = {"restore_test": RestoreTest, "drill": DrDrill, "entry": JournalEntry}
        kind_of, _, pk = choice.partition(":")
        try:
            return kind_of, models[kind_of].objects.get(pk=int(pk))
        except (KeyError, ValueError, models.get(kind_of, JournalEntry).DoesNotExist):
            raise ValidationError(f"No such evidence {choice!r}: choose one from the list.") from None
