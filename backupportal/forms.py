"""The auditor's journal filter, and the second factor's code."""

import datetime

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import Q
from django.utils import timezone

from backupportal import journal
from backupportal.lib.inputs import SaneInputsMixin
from backupportal.models import JournalEntry
from backupportal.twofactor import normalise


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


class CodeForm(forms.Form):
    """A second-factor code: six digits from the authenticator, or a recovery code."""

    otp_token = forms.CharField(
        label="Code",
        max_length=32,
        widget=forms.TextInput(
            attrs={"autocomplete": "one-time-code", "inputmode": "numeric", "autofocus": True, "size": 12}
        ),
    )

    def clean_otp_token(self):
        code = normalise(self.cleaned_data["otp_token"])
        if not code:
            raise ValidationError(
                "That is not a code: type the 6 digits your authenticator app shows, or a recovery code."
            )
        return code
