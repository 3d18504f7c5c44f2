"""The evidence pack: a seeded quarter's pack opens, its PDF says the quarter's figures, it verifies
with verifyevidence and with stock gpg and sha256sum, and one byte changed inside any member (or a
key other than the portal's) fails the verification. Auditors and DBAs make it on a page, with a
POST carrying the CSRF token: a link (another site's too) makes nothing; a pack covers at most a year."""

import io
import json
import shutil
import subprocess
import zipfile
from datetime import datetime
from io import StringIO
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.test import Client, TestCase
from django.urls import reverse
from PIL import Image
from pypdf import PdfReader

from backupportal import journal
from backupportal.lib import signing
from backupportal.models import JournalEntry
from backups.models import BackupRun, Server
from restores.models import DrDrill, DrDrillStep, RestoreTest
from tests.helpers import make_user
from watching.evidence import MAX_DAYS, Period, last_quarter, period_problem
from watching.evidence_pack import verify
from watching.models import Alert, EvidencePack, MaintenanceTask, RpoSample

MALDIVES = ZoneInfo("Indian/Maldives")
Q3 = ["--from", "2026-07-01", "--to", "2026-09-30"]
Q3_DAYS = 92
GOOD_LOGICAL_DAYS = 10  # July 1st to 10th
FAILED_LOGICAL, GOOD_BASE, FAILED_BASE = 2, 3, 1
RPO_SAMPLES = [120, 600, 1800]  # worst seconds of three hours; the objective is 15 min
RESTORE_TESTS = [600, 1200]  # seconds, passed; and one failed


def q3(month, day, hour=2, minute=30):
    return datetime(2026, month, day, hour, minute, tzinfo=MALDIVES)


@pytest.fixture
def signing_dir(settings, tmp_path):
    settings.SIGNING_KEY_DIR = tmp_path / "signing"
    return settings.SIGNING_KEY_DIR


@pytest.fixture
def quarter(catalog, signing_dir, django_capture_on_commit_callbacks):
    """The catalog's server, registered in June, with a third quarter of 2026 to account for."""
    server = catalog["server"]
    Server.objects.filter(pk=server.pk).update(created_at=q3(6, 1))
    for day in range(1, GOOD_LOGICAL_DAYS + 1):
        _run(server, "logical", "succeeded", q3(7, day))
    for day in range(11, 11 + FAILED_LOGICAL):
        _run(server, "logical", "failed", q3(7, day), error="x")
    for day in range(GOOD_BASE):
        _run(server, "base", "succeeded", q3(8, 1 + day))
    _run(server, "base", "failed", q3(8, 20))
    _run(server, "logical", "succeeded", q3(10, 1))  # after Q3
    for hour, seconds in enumerate(RPO_SAMPLES):
        RpoSample.objects.create(server=server, hour=q3(8, 5, hour, 0), worst_seconds=seconds)
    for day, seconds in enumerate(RESTORE_TESTS):
        test = RestoreTest.objects.create(
            server=server, status="passed", started_at=q3(9, 1 + day), finished_at=q3(9, 1 + day), duration_s=seconds
        )
        _journaled("restore_test_passed", test, q3(9, 1 + day), duration_s=seconds)
    test = RestoreTest.objects.create(
        server=server, status="failed", started_at=q3(9, 10), error="critical table empty"
    )
    _journaled("restore_test_failed", test, q3(9, 10), outcome="failed", error=test.error)
    DrDrill.objects.create(title="Q3 failover drill", server=server, logged_by=_owner(), started_at=q3(9, 15, 9, 0))
    Alert.objects.create(
        condition="rpo_breached",
        subject="server:maldives",
        server=server,
        message="m",
        state="resolved",
        opened_at=q3(8, 5, 1, 0),
        resolved_at=q3(8, 5, 2, 30),
    )
    MaintenanceTask.objects.create(kind="strategy_review", due_on=q3(7, 7).date(), completed_at=q3(7, 6))
    MaintenanceTask.objects.create(kind="monthly_restore_test", due_on=q3(8, 31).date())
    # The head file is written when an entry commits: run those writes, as a committed entry would.
    with django_capture_on_commit_callbacks(execute=True):
        for action, when in (
            ("key_rotated", q3(8, 10)),
            ("restore_approved", q3(8, 11)),
            ("change_approved", q3(8, 12)),
        ):
            with time_machine.travel(when, tick=False):
                journal.record(action, actor="bob", obj=server)
    return server


def _journaled(action, obj, when, **details):
    """Journaled at `when`, as the portal journals the row it wrote then (the head file too)."""
    with time_machine.travel(when, tick=False), TestCase.captureOnCommitCallbacks(execute=True):
        return journal.record(action, actor="job:backup", obj=obj, **details)


def _run(server, kind, status, finished_at, **fields):
    """A backup run that finished at `finished_at`, journaled as the runner journals it."""
    run = BackupRun.objects.create(server=server, kind=kind, status=status, finished_at=finished_at, **fields)
    if status == "succeeded":
        _journaled("backup_succeeded", run, finished_at, size=run.size, sha256=run.sha256)
    else:
        _journaled("backup_failed", run, finished_at, outcome="failed", error=run.error)
    return run


def _owner():
    from django.contrib.auth.models import User

    return User.objects.get(username="owner")


def make_pack(tmp_path, *period):
    output = tmp_path / "pack.zip"
    out = StringIO()
    call_command("evidencepack", *(period or Q3), "--output", str(output), "--json", stdout=out)
    return output, json.loads(out.getvalue().splitlines()[-1])


def public_key_file(tmp_path):
    """The public half, as the auditor keeps it: outside the pack and outside the portal's key directory."""
    path = tmp_path / "auditor-has" / "signing-public.asc"
    path.parent.mkdir()
    signing.ensure_key()
    path.write_text(signing.public_key())
    return path


def verifyevidence(path, key, *more):
    out, err = StringIO(), StringIO()
    code = 0
    try:
        call_command("verifyevidence", str(path), "--key", str(key), "--json", *more, stdout=out, stderr=err)
    except SystemExit as e:
        code = e.code
    return code, json.loads(out.getvalue().splitlines()[-1]), err.getvalue()


def pdf_text(data, tmp_path):
    """The PDF's text as two readers see it (pypdf, poppler's pdftotext), once each page was rendered
    by poppler (pdftoppm) to an image that is not blank."""
    reader = PdfReader(io.BytesIO(data))
    pdf = tmp_path / "summary.pdf"
    pdf.write_bytes(data)
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == len(reader.pages) >= 1
    for page in pages:
        with Image.open(page) as image:
            low, high = image.convert("L").getextrema()
            assert low < 100 and high > 200, f"{page.name} rendered blank"
    poppler = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True, text=True)
    pypdf_text = " ".join(" ".join(page.extract_text() for page in reader.pages).split())
    return pypdf_text, " ".join(poppler.stdout.split())


def rezip(path, name, change):
    """The pack with one member's data changed, zipped again (valid CRCs: only the sums can tell)."""
    with zipfile.ZipFile(path) as old:
        members = [(info, old.read(info)) for info in old.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as new:
        for info, data in members:
            new.writestr(info, change(data) if info.filename == name else data)


def flip(data, at=None):
    data = bytearray(data)
    data[len(data) // 2 if at is None else at] ^= 0x01
    return bytes(data)


def test_the_quarters_pack_opens_and_its_pdf_says_the_quarters_figures(quarter, tmp_path):
    path, result = make_pack(tmp_path)
    assert result["period"] == "2026-07-01 to 2026-09-30" and (tmp_path / "pack.zip.sig").exists()
    with zipfile.ZipFile(path) as pack:
        assert sorted(pack.namelist()) == sorted(
            ["summary.pdf", "journal.csv", "journal-check.json", "SHA256SUMS", "SHA256SUMS.sig"]
        )
        text, rendered = pdf_text(pack.read("summary.pdf"), tmp_path)
        csv = pack.read("journal.csv").decode()
        check = json.loads(pack.read("journal-check.json"))

    missed = Q3_DAYS - GOOD_LOGICAL_DAYS
    assert "Evidence pack: 2026-07-01 to 2026-09-30" in text
    assert (
        f"maldives: logical backups taken {GOOD_LOGICAL_DAYS}, failed {FAILED_LOGICAL}; "
        f"base backups taken {GOOD_BASE}, failed {FAILED_BASE}; incrementals taken 0, failed 0; "
        f"days without a good logical backup {missed} of {Q3_DAYS}."
    ) in text
    assert "missed: 2026-07-11, 2026-07-12, 2026-07-13" in text
    # 82 days missed, 60 named: the line says the rest are not (it named 60 and stopped).
    assert f"2026-09-08; and {missed - 60} more (not listed here)" in text and "2026-09-09" not in text
    over = sum(1 for s in RPO_SAMPLES if s > 15 * 60)
    assert (
        f"maldives: RPO worst {max(RPO_SAMPLES) // 60} min against an objective of 15 min; "
        f"hours over the objective {over} of {len(RPO_SAMPLES)} measured."
    ) in text
    assert (
        f"maldives: RTO longest {max(RESTORE_TESTS) // 60} min, newest {RESTORE_TESTS[-1] // 60} min against an "
        f"objective of 4 h 0 min; passed restore tests over the objective 0 of {len(RESTORE_TESTS)}."
    ) in text
    assert f"Restore tests: {len(RESTORE_TESTS)} passed, 1 failed" in text and "critical table empty" in text
    assert "DR drills: 1" in text and "Q3 failover drill" in text
    assert "Alerts opened: 1 (1 resolved, 0 still open)" in text and "RPO breached" in text and "1 h 30 min" in text
    assert "Maintenance tasks due: 2 (1 done, 1 overdue)" in text
    assert "Key rotations: 1" in text
    assert "Approvals of restores and destructive changes: 2" in text
    assert "restore_approved" in text and "change_approved" in text
    assert f"Signed with the portal's signing key {signing.fingerprint()}" in text
    assert "Journal chain check: intact" in text
    assert (
        "Rows against the journal: as the journal recorded them (16 backup runs, 3 restore tests, 0 drill steps)"
        in text
    )
    # poppler reads the same sentences (the tables' columns it lays out by position).
    for sentence in (
        "logical backups taken 10, failed 2;",
        "hours over the objective 1 of 3 measured",
        "Q3 failover drill",
    ):
        assert sentence in rendered

    # The CSV holds the quarter's entries and no other; the check covers the whole journal.
    in_q3 = JournalEntry.objects.filter(at__gte=q3(7, 1, 0, 0), at__lt=q3(10, 1, 0, 0))
    lines = csv.strip().splitlines()
    journaled_rows = GOOD_LOGICAL_DAYS + FAILED_LOGICAL + GOOD_BASE + FAILED_BASE + len(RESTORE_TESTS) + 1
    assert lines[0].startswith("id,at,actor,action") and len(lines) == 1 + in_q3.count() == 4 + journaled_rows
    assert check["ok"] is True and check["entries_in_period"] == 3 + journaled_rows
    made = JournalEntry.objects.get(action="evidence_pack_made")
    assert made.details["sha256"] == result["sha256"] and made.details["period"] == "2026-07-01 to 2026-09-30"


def test_the_pack_verifies_with_verifyevidence_and_with_stock_gpg(quarter, tmp_path):
    path, _ = make_pack(tmp_path)
    key = public_key_file(tmp_path)
    code, result, _ = verifyevidence(path, key)
    assert code == 0 and result["ok"] is True
    assert [c["check"] for c in result["checks"]] == [
        "ZIP signature",
        "SHA256SUMS signature",
        "member summary.pdf",
        "member journal.csv",
        "member journal-check.json",
        "journal chain when the pack was made",
        "rows against the journal when the pack was made",
    ]
    assert result["checks"][-2]["detail"].startswith("intact: ")
    assert (
        result["checks"][-1]["detail"] == "as the journal recorded them: 16 backup runs, 3 restore tests, 0 drill steps"
    )

    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home)]
    subprocess.run([*gpg, "--import", str(key)], check=True, capture_output=True)
    zip_check = subprocess.run([*gpg, "--verify", f"{path}.sig", str(path)], capture_output=True, text=True)
    assert zip_check.returncode == 0 and "Good signature" in zip_check.stderr
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(path) as pack:
        pack.extractall(unpacked)
    sums_check = subprocess.run([*gpg, "--verify", "SHA256SUMS.sig", "SHA256SUMS"], cwd=unpacked, capture_output=True)
    assert sums_check.returncode == 0
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=unpacked, capture_output=True).returncode == 0
    intact = subprocess.run(["grep", '"ok": true', "journal-check.json"], cwd=unpacked, capture_output=True)
    assert intact.returncode == 0  # the README's last line


@pytest.mark.parametrize("member", ["journal.csv", "summary.pdf", "journal-check.json"])
def test_one_byte_changed_in_a_members_data_fails_the_verification(quarter, tmp_path, member):
    path, _ = make_pack(tmp_path)
    key = public_key_file(tmp_path)
    rezip(path, member, flip)
    code, result, err = verifyevidence(path, key)
    assert code == 1 and result["ok"] is False
    failed = {c["check"]: c["detail"] for c in result["checks"] if not c["ok"]}
    assert set(failed) == {"ZIP signature", f"member {member}"}
    assert "altered" in failed[f"member {member}"] and f"FAILED member {member}" in err
    # Stock tools say the same.
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home)]
    subprocess.run([*gpg, "--import", str(key)], check=True, capture_output=True)
    assert subprocess.run([*gpg, "--verify", f"{path}.sig", str(path)], capture_output=True).returncode != 0
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(path) as pack:
        pack.extractall(unpacked)
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=unpacked, capture_output=True).returncode != 0


def test_a_changed_sha256sums_or_a_byte_of_the_zip_fails(quarter, tmp_path):
    path, _ = make_pack(tmp_path)
    key = public_key_file(tmp_path)
    original = path.read_bytes()
    rezip(path, "SHA256SUMS", lambda data: data.replace(b"summary.pdf", b"summary.pdf", 1).replace(b"0", b"1", 1))
    _, result, _ = verifyevidence(path, key)
    assert not next(c for c in result["checks"] if c["check"] == "SHA256SUMS signature")["ok"]

    path.write_bytes(flip(original))  # one byte of the ZIP itself, nothing zipped again
    code, result, _ = verifyevidence(path, key)
    assert code == 1 and not result["checks"][0]["ok"]


def test_a_pack_signed_by_another_key_does_not_verify_with_the_portals(quarter, tmp_path, settings):
    key = public_key_file(tmp_path)  # the portal's, as the auditor was given it
    settings.SIGNING_KEY_DIR = tmp_path / "forger"
    path, _ = make_pack(tmp_path)  # a pack made and signed throughout by another key
    code, result, _ = verifyevidence(path, key)
    assert code == 1
    assert [c["check"] for c in result["checks"] if not c["ok"]] == ["ZIP signature", "SHA256SUMS signature"]
    data = path.read_bytes()
    sig = (tmp_path / "pack.zip.sig").read_bytes()
    assert all(c.ok for c in verify(data, sig, signing.public_key()))  # with the forger's own key it would


def test_the_commands_refuse_wrong_input_with_one_line(quarter, tmp_path):
    for args, says in [
        (["--from", "2026-07-01"], "give both --from and --to"),
        (["--from", "2026-07-01", "--to", "2026-13-01"], "--to '2026-13-01' is not a date"),
        (["--from", "2026-09-30", "--to", "2026-07-01"], "is after the last"),
        (["--from", "0001-01-01", "--to", "2026-07-01"], "0001-01-01 is out of range"),
        (["--from", "2024-01-01", "--to", "2026-07-01"], f"a pack covers at most {MAX_DAYS} days"),
        ([*Q3, "--output", str(tmp_path / "nowhere" / "p.zip")], "does not exist"),
    ]:
        output = [] if "--output" in args else ["--output", str(tmp_path / "p.zip")]
        with pytest.raises(Exception, match=says):
            call_command("evidencepack", *args, *output, stdout=StringIO())
    path, _ = make_pack(tmp_path)
    with pytest.raises(Exception, match="exists: choose another --output"):
        make_pack(tmp_path)
    with pytest.raises(Exception, match="the public key .* cannot be read"):
        call_command("verifyevidence", str(path), "--key", str(tmp_path / "none.asc"), stdout=StringIO())
    shutil.copy(path, tmp_path / "lone.zip")
    with pytest.raises(Exception, match="signature .* cannot be read"):
        call_command("verifyevidence", str(tmp_path / "lone.zip"), "--key", str(public_key_file(tmp_path)))
    assert not (tmp_path / "p.zip").exists()


def test_a_pack_that_cannot_be_written_is_one_line_and_never_journaled_as_made(quarter, tmp_path):
    made = JournalEntry.objects.filter(action="evidence_pack_made")
    before = made.count()
    for output, says in [
        ("", "--output is empty: name the ZIP to write"),
        ("  ", "--output is empty"),
        ("/proc/evidence.zip", "--output /proc/evidence.zip: cannot be written"),
    ]:
        with pytest.raises(CommandError, match=says) as refused:
            call_command("evidencepack", *Q3, "--output", output, stdout=StringIO())
        assert "\n" not in str(refused.value)
    assert made.count() == before
    assert not list(Path("/proc").glob(".evidence.zip*"))


def test_the_default_period_is_the_last_complete_quarter():
    assert last_quarter(datetime(2026, 12, 3).date()) == Period(
        datetime(2026, 7, 1).date(), datetime(2026, 9, 30).date()
    )
    assert last_quarter(datetime(2026, 1, 1).date()) == Period(
        datetime(2025, 10, 1).date(), datetime(2025, 12, 31).date()
    )


def test_a_pack_covers_at_most_a_year_leap_day_included():
    day = datetime(2024, 1, 1).date()
    assert MAX_DAYS == 366
    assert period_problem(day, datetime(2024, 12, 31).date()) == ""
    problem = period_problem(day, datetime(2025, 1, 1).date())
    assert (
        problem == "The period is 367 days; a pack covers at most 366 days: make several packs, one per year or less."
    )


def on_the_page(user):
    """A browser of `user`'s that checks CSRF tokens, and the token the evidence page gave it."""
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    page = browser.get(reverse("evidence"))
    assert page.status_code == 200
    return browser, page.context["csrf_token"]


def made_nothing(packs_before):
    return (
        EvidencePack.objects.count() == packs_before
        and not JournalEntry.objects.filter(action="evidence_pack_made").exists()
    )


def test_an_auditor_makes_the_pack_on_the_page_and_downloads_both_files(quarter, charlie, tmp_path, settings):
    settings.EVIDENCE_DIR = tmp_path / "evidence"
    browser, token = on_the_page(charlie)
    page = browser.get(reverse("evidence")).content.decode()
    assert 'value="2026-07-01"' in page or str(last_quarter().first) in page
    assert 'method="post"' in page and 'name="csrfmiddlewaretoken"' in page
    period = {"start": "2026-07-01", "end": "2026-09-30"}
    response = browser.post(reverse("evidence-make"), {**period, "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    detail = browser.get(response["Location"]).content.decode()
    pack_id = int(response["Location"].rstrip("/").rsplit("/", 1)[-1])
    assert EvidencePack.objects.get(pk=pack_id).made_by == charlie
    data = b"".join(browser.get(reverse("evidence-zip", args=[pack_id])).streaming_content)
    sig = b"".join(browser.get(reverse("evidence-sig", args=[pack_id])).streaming_content)
    assert all(c.ok for c in verify(data, sig, signing.public_key()))
    assert signing.fingerprint() in detail
    assert JournalEntry.objects.filter(action="evidence_pack_made", actor="charlie").count() == 1
    # Auditors still change nothing else.
    refused = browser.post(
        reverse("backup-now", args=[quarter.name]), {"kind": "logical", "csrfmiddlewaretoken": token}
    )
    assert refused.status_code == 403
    bad = browser.post(
        reverse("evidence-make"), {"start": "2026-09-30", "end": "2026-07-01", "csrfmiddlewaretoken": token}
    )
    assert bad.status_code == 400 and "first day first" in bad.content.decode()
    far = browser.post(
        reverse("evidence-make"), {"start": "0001-01-01", "end": "9999-12-31", "csrfmiddlewaretoken": token}
    )
    assert far.status_code == 400 and "out of range" in far.content.decode()
    assert EvidencePack.objects.filter(made_by=charlie).count() == 1


def test_opening_the_make_address_makes_no_pack_and_journals_nothing(quarter, client, charlie, alice, settings):
    """A link, an image or a redirect from another site is a GET, and SameSite=Lax cookies go with it."""
    before, files = EvidencePack.objects.count(), sorted(settings.EVIDENCE_DIR.iterdir())
    for user in (charlie, alice):
        client.force_login(user)
        response = client.get(reverse("evidence-make"), {"start": "2026-07-01", "end": "2026-09-30"})
        assert response.status_code == 302 and response["Location"] == reverse("evidence")
        assert client.head(reverse("evidence-make"), {"start": "2026-07-01", "end": "2026-09-30"}).status_code == 302
    assert made_nothing(before) and sorted(settings.EVIDENCE_DIR.iterdir()) == files


def test_a_post_without_the_pages_csrf_token_is_refused(quarter, charlie, alice):
    before = EvidencePack.objects.count()
    period = {"start": "2026-07-01", "end": "2026-09-30"}
    for user in (charlie, alice):
        browser, token = on_the_page(user)
        assert browser.post(reverse("evidence-make"), period).status_code == 403
        assert browser.post(reverse("evidence-make"), {**period, "csrfmiddlewaretoken": "x" * 64}).status_code == 403
        stranger = Client(enforce_csrf_checks=True)  # another site's form: the victim's session, not its token
        stranger.cookies = browser.cookies
        assert stranger.post(reverse("evidence-make"), period).status_code == 403
    assert made_nothing(before)


def test_a_period_longer_than_a_year_is_refused_with_one_line(quarter, alice):
    before = EvidencePack.objects.count()
    browser, token = on_the_page(alice)
    response = browser.post(
        reverse("evidence-make"), {"start": "1970-01-01", "end": "2026-09-30", "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 400
    assert response.context["form"].non_field_errors() == [
        "The period is 20727 days; a pack covers at most 366 days: make several packs, one per year or less."
    ]
    assert "make several packs" in response.content.decode()
    assert made_nothing(before)


def test_a_dba_may_make_a_pack_and_a_sysadmin_or_a_user_without_a_role_may_not(
    quarter, client, alice, sam, tmp_path, settings
):
    settings.EVIDENCE_DIR = tmp_path / "evidence"
    period = {"start": "2026-07-01", "end": "2026-09-30"}
    browser, token = on_the_page(alice)
    assert browser.post(reverse("evidence-make"), {**period, "csrfmiddlewaretoken": token}).status_code == 302
    assert EvidencePack.objects.filter(made_by=alice).count() == 1
    before = EvidencePack.objects.count()
    nobody = make_user("nobody")
    for user in (sam, nobody):
        browser = Client(enforce_csrf_checks=True)
        browser.force_login(user)
        assert browser.get(reverse("evidence")).status_code == 403
        token = browser.get(reverse("dashboard")).context["csrf_token"] if user == sam else "x" * 64
        assert browser.get(reverse("evidence-make"), period).status_code == 403
        assert browser.post(reverse("evidence-make"), {**period, "csrfmiddlewaretoken": token}).status_code == 403
    anonymous = Client()
    response = anonymous.post(reverse("evidence-make"), period)
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    assert EvidencePack.objects.count() == before
    assert JournalEntry.objects.filter(action="evidence_pack_made").count() == 1


def test_verifyevidence_says_when_the_journal_was_not_intact_as_the_pack_was_made(quarter, tmp_path, settings):
    """The pack is authentic, but what it holds comes from a journal whose newest entries are gone:
    "verified" alone would tell the auditor the evidence stands."""
    head = journal.read_head()
    gone = {"journal": head.journal, "entry": head.entry + 5, "hmac": "0" * 64, "count": (head.count or 0) + 5}
    Path(settings.JOURNAL_HEAD_FILE).write_text(json.dumps(gone) + "\n")
    assert not journal.check().ok
    path, _ = make_pack(tmp_path)
    code, result, err = verifyevidence(path, public_key_file(tmp_path))
    assert code == 1 and result["ok"] is False
    failed = {c["check"]: c["detail"] for c in result["checks"] if not c["ok"]}
    assert list(failed) == ["journal chain when the pack was made"]
    assert failed["journal chain when the pack was made"].startswith("NOT intact: ")
    assert "FAILED journal chain when the pack was made: NOT intact" in err
    assert len(err.strip().splitlines()) == 1


def _drill_with_go_live(server, client, dba):
    """Q3's drill with its go-live recorded on the drill's page, as a DBA records it (journaled)."""
    drill = DrDrill.objects.get(title="Q3 failover drill")
    client.force_login(dba)
    form = {"who": "alice", "started_at": "2026-09-15 11:00", "finished_at": "2026-09-15 12:00", "outcome": "ok"}
    with time_machine.travel(q3(9, 15, 13, 0), tick=False), TestCase.captureOnCommitCallbacks(execute=True):
        response = client.post(reverse("drill-step", args=[drill.pk, "go_live"]), form)
    assert response.status_code == 302, response.content[:500]
    return drill


@pytest.mark.parametrize("change", ["go_live", "backup", "restore_test"])
def test_a_row_changed_in_the_database_after_it_was_journaled_fails_the_pack(quarter, tmp_path, alice, change):
    """Found by a probe: the rows the PDF prints are not signed; one changed with an UPDATE (a
    drill's go-live moved, a failed backup or restore test turned good) read as the pack's truth
    while its journal check said "intact" and verifyevidence said "verified"."""
    drill = _drill_with_go_live(quarter, Client(), alice)
    if change == "go_live":
        DrDrillStep.objects.filter(drill=drill, step="go_live").update(finished_at=q3(9, 15, 10, 30))
        row = f"drill #{drill.pk} (Q3 failover drill) step go_live"
    elif change == "backup":
        run = BackupRun.objects.filter(status="failed", kind="base").get()
        BackupRun.objects.filter(pk=run.pk).update(status="succeeded")
        row = f"backup run #{run.pk} (maldives, base, succeeded)"
    else:
        test = RestoreTest.objects.get(status="failed")
        RestoreTest.objects.filter(pk=test.pk).update(status="passed", error="", duration_s=300)
        row = f"restore test #{test.pk} (maldives, passed)"
    assert journal.check().ok  # the journal itself is untouched
    path, _ = make_pack(tmp_path)
    code, result, err = verifyevidence(path, public_key_file(tmp_path))
    assert code == 1 and result["ok"] is False
    failed = {c["check"]: c["detail"] for c in result["checks"] if not c["ok"]}
    assert list(failed) == ["rows against the journal when the pack was made"]
    assert failed["rows against the journal when the pack was made"].startswith(f"{row}: ")
    assert "differs from the journal" in err and row in err and len(err.strip().splitlines()) == 1
    with zipfile.ZipFile(path) as pack:
        check = json.loads(pack.read("journal-check.json"))
        first_page = PdfReader(io.BytesIO(pack.read("summary.pdf"))).pages[0].extract_text()
    assert check["ok"] is True and [d["row"] for d in check["rows"]["differ"]] == [row], check["rows"]
    assert f"{row} differs from the journal" in " ".join(first_page.split())


def test_a_period_whose_rows_are_as_journaled_verifies_with_its_drill_steps(quarter, tmp_path, alice):
    _drill_with_go_live(quarter, Client(), alice)
    path, _ = make_pack(tmp_path)
    code, result, _ = verifyevidence(path, public_key_file(tmp_path))
    assert code == 0 and result["ok"] is True
    detail = result["checks"][-1]["detail"]
    assert detail == "as the journal recorded them: 16 backup runs, 3 restore tests, 1 drill steps"


def test_a_row_with_no_journal_entry_fails_the_pack(quarter, tmp_path):
    """A run inserted straight into the catalog: the runner journals every run it ends."""
    run = BackupRun.objects.create(server=quarter, kind="logical", status="succeeded", finished_at=q3(7, 20))
    path, _ = make_pack(tmp_path)
    code, result, err = verifyevidence(path, public_key_file(tmp_path))
    assert code == 1
    assert f"backup run #{run.pk} (maldives, logical, succeeded): no backup_succeeded or backup_imported" in err


def test_runs_a_catalog_rebuild_recreated_are_vouched_for_by_its_entry(quarter, tmp_path):
    """A rebuild recreates good runs from their signed manifests, with no backup_succeeded entry
    each: its catalog_rebuilt entry lists them. A run it did not list, or one turned failed since,
    still fails the pack."""
    rebuilt = {"location": "s3", "manifest": "m", "was": 7, "at": "2026-07-21T00:00:00+00:00"}
    made = [
        BackupRun.objects.create(
            server=quarter, kind="logical", status="succeeded", finished_at=q3(7, 20), details={"rebuilt": rebuilt}
        )
        for _ in range(2)
    ]
    journal.record("catalog_rebuilt", actor="alice", location="s3", runs=2, run_ids=[run.pk for run in made])
    path, _ = make_pack(tmp_path)
    key = public_key_file(tmp_path)
    code, result, err = verifyevidence(path, key)
    assert code == 0 and result["ok"] is True, err

    BackupRun.objects.filter(pk=made[1].pk).update(status="failed")
    forged = BackupRun.objects.create(
        server=quarter, kind="logical", status="succeeded", finished_at=q3(7, 21), details={"rebuilt": rebuilt}
    )
    (tmp_path / "again").mkdir()
    path, _ = make_pack(tmp_path / "again")
    code, result, err = verifyevidence(path, key)
    assert code == 1
    with zipfile.ZipFile(path) as pack:
        differ = {d["row"]: d["problem"] for d in json.loads(pack.read("journal-check.json"))["rows"]["differ"]}
    assert differ[f"backup run #{made[1].pk} (maldives, logical, failed)"].endswith(
        "(catalog_rebuilt) recreated it succeeded"
    )
    assert differ[f"backup run #{forged.pk} (maldives, logical, succeeded)"].startswith("no backup_succeeded")
