"""The auditor's evidence pack: one ZIP per period, signed twice with the portal's signing key.

Inside the ZIP: summary.pdf (watching/evidence_pdf.py), journal.csv (the period's journal
entries, as the journal page exports them, each with its HMAC and its predecessor's),
journal-check.json (the chain check of the whole journal when the pack was made), SHA256SUMS
(`sha256sum -c` reads it) and SHA256SUMS.sig, a detached signature of SHA256SUMS. Beside the
ZIP, FILE.sig is a detached signature of the ZIP itself.

`verify()` checks both signatures with a public key the auditor brings (never one from the
pack) and every member against SHA256SUMS; so does stock gpg with sha256sum (README). Once those
hold, it reads journal-check.json: a pack of a journal that was not intact fails its verification,
and so does one whose rows (backup runs, restore tests, drill steps) differed from the journal
entries that recorded them (watching/evidence_rows.py).
"""

import functools
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from django.utils import timezone

from backupportal import journal
from backupportal.journal_views import CSV_FIELDS, _csv_lines
from backupportal.lib import signing
from backupportal.models import JournalEntry
from watching import evidence, evidence_pdf, evidence_rows

SUMS, SUMS_SIG = "SHA256SUMS", "SHA256SUMS.sig"
JOURNAL_CHECK = "journal-check.json"
SIGNATURE_SUFFIX = ".sig"


@dataclass(frozen=True)
class Pack:
    data: bytes  # the ZIP
    signature: bytes  # of the ZIP, detached and armored
    sha256: str
    signer: str
    period: object = None  # an evidence.Period
    members: tuple = ()
    journal_intact: bool = False


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


def build(period):
    """Make the pack of `period` (an evidence.Period), in memory: write() puts it on disk."""
    signer = signing.ensure_key()
    verdict = journal.check()
    extract = JournalEntry.objects.filter(evidence.in_period("at", period)).order_by("at", "id")
    check = {
        "ok": verdict.ok,
        "message": verdict.message,
        "journal": verdict.journal,
        "entries_checked": verdict.count,
        "period": str(period),
        "entries_in_period": extract.count(),
        "checked_at": timezone.now().isoformat(),
        # The catalog's rows are not signed: each one the pack reports on, against its journal entries.
        "rows": evidence_rows.check(period),
    }
    pdf = evidence_pdf.render(evidence.figures(period), check, signer)
    rows = extract.values_list(*CSV_FIELDS).iterator(chunk_size=2000)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        add = functools.partial(_add, archive, timezone.localtime().timetuple()[:6])
        # The journal's extract, the biggest member, is compressed chunk by chunk, never held whole.
        sums = {
            "summary.pdf": add("summary.pdf", [pdf]),
            "journal.csv": add("journal.csv", (text.encode() for text in _csv_lines(rows))),
            JOURNAL_CHECK: add(JOURNAL_CHECK, [(json.dumps(check, indent=2, sort_keys=True) + "\n").encode()]),
        }
        listing = "".join(f"{digest}  {name}\n" for name, digest in sums.items()).encode()
        add(SUMS, [listing])
        add(SUMS_SIG, [signing.sign(listing)])
        members = sorted(archive.namelist())
    data = buffer.getvalue()
    del buffer
    return Pack(data, signing.sign(data), hashlib.sha256(data).hexdigest(), signer, period, tuple(members), verdict.ok)


def _add(archive, stamp, name, chunks):
    """Write the member `name` from its chunks of bytes; its sha256."""
    info = zipfile.ZipInfo(name, date_time=stamp)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    digest = hashlib.sha256()
    with archive.open(info, "w") as member:
        for chunk in chunks:
            digest.update(chunk)
            member.write(chunk)
    return digest.hexdigest()


def write(pack, path, actor):
    """The ZIP at `path` and its signature at `path`.sig, both complete or neither there; then
    journaled that `actor` made it (a pack that was not written is never journaled as made).
    OSError when either cannot be written."""
    path = Path(path)
    written = []
    try:
        for target, data in ((path, pack.data), (signature_path(path), pack.signature)):
            temporary = target.with_name(f".{target.name}.tmp")
            try:
                with open(temporary, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                temporary.replace(target)
            finally:
                temporary.unlink(missing_ok=True)
            written.append(target)
    except OSError:
        for target in written:  # a ZIP without its signature is not a pack
            target.unlink(missing_ok=True)
        raise
    journal.record(
        "evidence_pack_made",
        actor=actor,
        period=str(pack.period),
        sha256=pack.sha256,
        members=list(pack.members),
        signer=pack.signer,
        journal_intact=pack.journal_intact,
    )


def signature_path(path):
    path = Path(path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


# --- Verification --------------------------------------------------------------------------------


def verify(data, signature, public_key):
    """Every check of a pack, in order: the ZIP's signature, SHA256SUMS's, and each member's sha256."""
    checks = [_signature_check("ZIP signature", data, signature, public_key)]
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:  # a CRC error, a truncated file
        return [*checks, Check("ZIP contents", False, f"the ZIP cannot be read: {e}")]
    if SUMS not in members or SUMS_SIG not in members:
        return [*checks, Check(SUMS, False, f"the ZIP holds no {SUMS} or no {SUMS_SIG}: it is not an evidence pack")]
    checks.append(_signature_check(f"{SUMS} signature", members[SUMS], members[SUMS_SIG], public_key))
    listed = _read_sums(members[SUMS])
    if listed is None:
        return [*checks, Check(SUMS, False, f"{SUMS} is not in sha256sum's form")]
    for name, digest in listed.items():
        checks.append(_member_check(name, digest, members.get(name)))
    for name in sorted(set(members) - set(listed) - {SUMS, SUMS_SIG}):
        checks.append(Check(f"member {name}", False, f"{name} is in the ZIP but not in {SUMS}"))
    if all(check.ok for check in checks) and JOURNAL_CHECK in listed:
        checks.append(_journal_check(members[JOURNAL_CHECK]))
        checks.append(_rows_check(members[JOURNAL_CHECK]))
    return checks


def _journal_check(data):
    """What the pack's own journal check said: an authentic pack of a journal that was not intact
    is no evidence that stands, and "verified" alone would say it is. Read only once every
    signature and sum holds, so the words are the portal's."""
    what = "journal chain when the pack was made"
    try:
        check = json.loads(data)
        ok, message = check["ok"] is True, str(check["message"])
    except (ValueError, KeyError, TypeError):
        return Check(what, False, f"{JOURNAL_CHECK} does not say whether the journal was intact")
    return Check(what, ok, f"{'intact' if ok else 'NOT intact'}: {message}")


def _rows_check(data):
    """What the pack's own cross-check said: a row that differs from the journal entry that
    recorded it was changed in the database after the fact, and the PDF printed the change."""
    what = "rows against the journal when the pack was made"
    try:
        rows = json.loads(data).get("rows")
        if rows is None:
            return Check(what, True, "not checked: the pack was made before rows were checked against the journal")
        checked, differ = rows["checked"], rows["differ"]
        counted = evidence_rows.counted(checked)
        first = differ and f"{differ[0]['row']}: {differ[0]['problem']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return Check(what, False, f"{JOURNAL_CHECK} does not say whether its rows agree with the journal")
    if differ:
        more = f" (and {len(differ) - 1} more rows, listed in {JOURNAL_CHECK})" if len(differ) > 1 else ""
        return Check(what, False, f"{first} differs from the journal{more}")
    return Check(what, True, f"as the journal recorded them: {counted}")


def _signature_check(what, data, signature, public_key):
    try:
        signer = signing.verify(data, signature, public_key)
    except signing.SigningError as e:
        return Check(what, False, str(e))
    return Check(what, True, f"good signature by {signer}")


def _read_sums(text):
    listed = {}
    for line in text.decode("utf-8", "replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name in listed:
            return None
        listed[name] = digest.lower()
    return listed


def _member_check(name, digest, data):
    if data is None:
        return Check(f"member {name}", False, f"{name} is in {SUMS} but missing from the ZIP")
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        return Check(f"member {name}", False, f"{name} has sha256 {actual}, {SUMS} says {digest}: it was altered")
    return Check(f"member {name}", True, f"sha256 {actual} as {SUMS} says")
