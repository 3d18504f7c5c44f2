"""The auditor's pages: the journal, filtered, paged by keyset, exported as CSV."""

import csv
import io
import json
import time

from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponseForbidden, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_safe

from backupportal import journal
from backupportal.forms import JournalFilter, keyset
from backupportal.lib.links import url_for
from backupportal.models import JournalEntry
from backupportal.roles import require_perm

PAGE_SIZE = 50
# Each row with its HMAC and its predecessor's: an auditor can re-check the chain outside the
# portal (HMAC-SHA256 over journal.canonical(entry), with the key held by the portal's operators).
CSV_FIELDS = [
    *("id", "at", "actor", "action", "object_type", "object_id", "object_repr", "server", "outcome", "details"),
    *("prev_hmac", "hmac"),
]
DETAILS = CSV_FIELDS.index("details")


def _cursor(value):
    """An entry id from the query string -> its (at, id), or None."""
    if not value or not value.isdigit():
        return None
    return JournalEntry.objects.filter(pk=int(value)).values_list("at", "id").first()


@require_safe
@require_perm("backupportal.view_journalentry")
def journal_list(request):
    form = JournalFilter(request.GET or None)
    entries, newer, older = [], None, None
    if not form.is_bound or form.is_valid():
        qs = form.filter(JournalEntry.objects.all()) if form.is_bound else JournalEntry.objects.all()
        older_than, newer_than = _cursor(request.GET.get("older_than")), _cursor(request.GET.get("newer_than"))
        # One row more than the page says whether there is a page beyond: no COUNT(*).
        rows = list(keyset(qs, older_than, newer_than)[: PAGE_SIZE + 1])
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        if newer_than:
            rows.reverse()
            newer, older = (rows[0].pk if more else None), (rows[-1].pk if rows else None)
        else:
            newer = rows[0].pk if older_than and rows else None
            older = rows[-1].pk if more else None
        entries = rows
    return render(
        request,
        "journal/list.html",
        {
            "form": form,
            "entries": entries,
            "newer": newer,
            "older": older,
            "query": form.query_string() if form.is_bound else "",
            "actions": JournalFilter.known_actions(),
            "servers": journal.server_names(),
        },
    )


@require_safe
@require_perm("backupportal.view_journalentry")
def journal_export(request):
    """CSV of the filtered journal, streamed: a million rows never sit in memory. A GET that writes
    (the export is journaled), so one that another site's page sent (an <img>, a link) is
    refused: the browser says where it came from (Sec-Fetch-Site)."""
    if request.headers.get("Sec-Fetch-Site", "none") not in ("same-origin", "none"):
        return HttpResponseForbidden("Export the journal from its own page: a request from another site is refused.")
    form = JournalFilter(request.GET or None)
    qs = JournalEntry.objects.all()
    if form.is_bound:
        if not form.is_valid():
            return render(request, "journal/list.html", {"form": form, "entries": []}, status=400)
        qs = form.filter(qs)
    journal.record(
        "journal_exported", actor=request.user.get_username(), filters={k: str(v) for k, v in form.data.items()}
    )
    rows = qs.order_by("-at", "-id").values_list(*CSV_FIELDS).iterator(chunk_size=2000)
    response = StreamingHttpResponse(_csv_lines(rows), content_type="text/csv; charset=utf-8")
    stamp = timezone.localtime().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="journal-{stamp}.csv"'
    return response


def _csv_lines(rows, batch=1000):
    """CSV text in chunks of `batch` rows: one write to the client per chunk, not per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_FIELDS)
    for n, row in enumerate(rows, 1):
        values = list(row)
        values[1] = timezone.localtime(values[1]).isoformat()
        values[DETAILS] = json.dumps(values[DETAILS], sort_keys=True)
        writer.writerow([_cell(v) for v in values])
        if n % batch == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _cell(value):
    """Spreadsheets run a cell that starts with = + - @ as a formula; a failed login's user
    name is typed by anyone, so such cells are quoted with a leading apostrophe."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@require_safe
@require_perm("backupportal.view_journalentry")
def journal_verify(request):
    """The chain check of `manage.py verifyjournal`, from the browser: it only reads.

    Walks every entry (about a second per 100,000 here), so it runs when asked, not on every visit."""
    verdict = None
    if request.GET.get("run"):
        started = time.monotonic()
        verdict = journal.check()
        verdict = {**verdict._asdict(), "duration_s": time.monotonic() - started}
    return render(request, "journal/verify.html", {"verdict": verdict})


@require_safe
@require_perm("backupportal.view_journalentry")
def journal_entry(request, entry_id):
    entry = get_object_or_404(JournalEntry, pk=entry_id)
    return render(
        request,
        "journal/entry.html",
        {
            "entry": entry,
            "details": json.dumps(entry.details, indent=2, sort_keys=True),
            "previous": JournalEntry.objects.filter(id__lt=entry.pk)
            .order_by("-id")
            .values_list("id", flat=True)
            .first(),
            "next": JournalEntry.objects.filter(id__gt=entry.pk).order_by("id").values_list("id", flat=True).first(),
        },
    )


@require_safe
@require_perm("backupportal.view_journalentry")
def journal_object(request, entry_id):
    """Follow an entry to its object: its page, else its admin page. Resolved on click, so
    the journal page itself needs no query per row."""
    entry = get_object_or_404(JournalEntry, pk=entry_id)
    try:
        model = journal.model_for(entry.object_type)  # an old label too, after its model moved
    except (LookupError, ValueError):
        raise Http404(f"Entry #{entry.pk} is about no object the portal knows.") from None
    try:
        obj = model._default_manager.filter(pk=entry.object_id).first()
    except (ValueError, ValidationError):
        obj = None
    url = url_for(obj) if obj is not None else ""
    if not url:
        return render(request, "journal/object_missing.html", {"entry": entry, "exists": obj is not None}, status=404)
    return redirect(url)
