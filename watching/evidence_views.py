"""The evidence page: an auditor (or a DBA) picks a period and gets its signed evidence pack.

Making a pack is a POST with the page's CSRF token: it writes the ZIP, a row and a journal entry in
the user's name, which a link from another site must not do (SameSite=Lax cookies go with a GET
that opens a page). It is the one POST an auditor may send that is not about their own account
(backupportal/middleware.py): a pack changes nothing but adds itself and a journal entry.
The ZIP and its signature are kept in EVIDENCE_DIR, so both downloads are of the same pack.
"""

import secrets
from datetime import date

from django import forms
from django.conf import settings
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_safe

from backupportal.lib import signing
from backupportal.roles import require_perm
from watching import evidence, evidence_pack
from watching.models import EvidencePack

PERM = "watching.make_evidence_pack"


class PeriodForm(forms.Form):
    start = forms.DateField(label="First day", widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label="Last day (included)", widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("start") and cleaned.get("end"):
            if problem := evidence.period_problem(cleaned["start"], cleaned["end"]):
                raise forms.ValidationError(problem)
        return cleaned


@require_safe
@require_perm(PERM)
def evidence_page(request):
    quarter = evidence.last_quarter()
    form = PeriodForm(initial={"start": quarter.first, "end": quarter.last})
    return render(request, "evidence/page.html", _context(form))


@require_http_methods(["GET", "HEAD", "POST"])
@require_perm(PERM)
def evidence_make(request):
    if request.method != "POST":
        return redirect("evidence")  # an address opened (or an old bookmark) makes nothing: the form
    form = PeriodForm(request.POST)
    if not form.is_valid():
        return render(request, "evidence/page.html", _context(form), status=400)
    period = evidence.Period(form.cleaned_data["start"], form.cleaned_data["end"])
    try:
        pack = evidence_pack.build(period)
    except signing.SigningError as e:
        form.add_error(None, f"The pack cannot be signed: {e}")
        return render(request, "evidence/page.html", _context(form), status=500)
    name = f"evidence-{period.first:%Y%m%d}-{period.last:%Y%m%d}-{date.today():%Y%m%d}-{secrets.token_hex(4)}.zip"
    directory = settings.EVIDENCE_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        evidence_pack.write(pack, directory / name, actor=request.user.get_username())
    except OSError as e:
        form.add_error(None, f"The pack cannot be written to EVIDENCE_DIR ({e.strerror or e}): tell the operator.")
        return render(request, "evidence/page.html", _context(form), status=500)
    made = EvidencePack.objects.create(
        period_start=period.first,
        period_end=period.last,
        made_by=request.user,
        file_name=name,
        sha256=pack.sha256,
        size=len(pack.data),
    )
    return redirect(made)


@require_safe
@require_perm(PERM)
def evidence_detail(request, pack_id):
    pack = get_object_or_404(EvidencePack.objects.select_related("made_by"), pk=pack_id)
    return render(request, "evidence/pack.html", {"pack": pack, "fingerprint": _fingerprint()})


@require_safe
@require_perm(PERM)
def evidence_download(request, pack_id, part):
    pack = get_object_or_404(EvidencePack, pk=pack_id)
    path = settings.EVIDENCE_DIR / pack.file_name
    if part == "signature":
        path = evidence_pack.signature_path(path)
    if not path.exists():
        raise Http404(f"{path.name} is no longer in EVIDENCE_DIR: make the pack again.")
    return FileResponse(open(path, "rb"), as_attachment=True, filename=path.name)


def _context(form):
    return {"form": form, "packs": EvidencePack.objects.select_related("made_by")[:20], "fingerprint": _fingerprint()}


def _fingerprint():
    try:
        return signing.fingerprint()
    except signing.SigningError:
        return ""
