"""Logical backups under faults: kills mid-stream, argv tracing, bad encryption settings."""

import json
import os
import signal
import subprocess
import time
from io import StringIO
from pathlib import Path

import pytest

from backups.models import BackupRun
from backups.runner import fail_orphans
from tests.helpers import child_named, descendants, manage, register
from tests.tracing import traced

pytestmark = pytest.mark.django_db(transaction=True)


def wait_for(predicate, timeout=60, every=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def files_under(root):
    return [p for p in Path(root).rglob("*") if p.is_file()]


def streaming_run():
    run = BackupRun.objects.filter(status="running", bytes_done__gt=0).first()
    return run


@pytest.fixture
def big_server(big_cluster, db):
    server = register(big_cluster)
    yield server


def test_sigkill_of_pg_dump_mid_stream_fails_the_run_and_leaves_nothing(
    big_server, passphrase_file, backup_root, settings
):
    proc = manage(settings, "backup", "maldives", "--json")
    pg_dump = wait_for(lambda: child_named(proc.pid, "pg_dump"), what="pg_dump to start")
    wait_for(streaming_run, what="bytes to stream")
    tree = descendants(proc.pid)
    os.kill(pg_dump, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "pg_dump was killed by SIGKILL" in err
    result = json.loads(out.strip().splitlines()[-1])
    run = BackupRun.objects.get(pk=result["id"])
    assert run.status == "failed" and "killed by SIGKILL" in run.error
    assert files_under(backup_root) == []  # neither an artifact nor a partial file
    time.sleep(0.2)
    assert [p for p in tree if Path(f"/proc/{p}").exists() and _not_zombie(p)] == []


def encrypting_gpg(pid):
    """The gpg below pid that encrypts, not a short one python-gnupg runs to ask its version."""
    found = child_named(pid, "gpg")
    try:
        return found if found and b"--symmetric" in Path(f"/proc/{found}/cmdline").read_bytes() else None
    except OSError:
        return None


def test_sigkill_of_gpg_mid_stream_fails_the_run_in_one_line_that_says_what_to_do(
    big_server, passphrase_file, backup_root, settings
):
    """Found by a probe: gpg killed under the dump (the OOM killer, say) failed the run with a
    vague "gpg: [Errno 32] Broken pipe"."""
    proc = manage(settings, "backup", "maldives", "--json")
    wait_for(streaming_run, what="bytes to stream")
    gpg = wait_for(lambda: encrypting_gpg(proc.pid), what="gpg to encrypt")
    os.kill(gpg, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    result = json.loads(out.strip().splitlines()[-1])
    run = BackupRun.objects.get(pk=result["id"])
    assert run.status == "failed" and "\n" not in run.error
    assert run.error == (
        "gpg was killed by signal 9 (SIGKILL) while encrypting the output of pg_dump: nothing was kept; "
        "run the backup again, and check the machine's memory (the OOM killer, in dmesg) if it recurs"
    )
    assert run.error in err
    assert not run.copies.filter(status="ok").exists()
    assert files_under(backup_root) == []  # neither an artifact nor a partial file


def test_sigkill_of_the_worker_mid_stream_leaves_no_orphan_and_no_good_looking_file(
    big_server, passphrase_file, backup_root, settings
):
    proc = manage(settings, "backup", "maldives", "--json")
    wait_for(lambda: child_named(proc.pid, "pg_dump") and child_named(proc.pid, "gpg"), what="pg_dump and gpg")
    run = wait_for(streaming_run, what="bytes to stream")
    tree = descendants(proc.pid)
    assert len(tree) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    # pg_dump and gpg die with their parent: nothing goes on writing.
    wait_for(
        lambda: not [p for p in tree if Path(f"/proc/{p}").exists() and _not_zombie(p)],
        timeout=10,
        what="children to die",
    )
    # What is on disk is a temporary file that no one can mistake for a backup.
    assert all(p.name.startswith(".") and p.name.endswith(".partial") for p in files_under(backup_root))
    # The run is found and failed (its pid is dead), and its leftovers are removed.
    assert BackupRun.objects.get(pk=run.pk).status == "running"
    assert [r.pk for r in fail_orphans()] == [run.pk]
    run.refresh_from_db()
    assert run.status == "failed" and "died" in run.error
    assert files_under(backup_root) == []
    # The next run succeeds.
    proc = manage(settings, "backup", "maldives", "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["status"] == "succeeded"


def _not_zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_no_secret_in_any_argv_during_a_whole_backup(sample_cluster, passphrase_file, backup_root, settings, tmp_path):
    from backups.models import Server

    sample_cluster.create_role("backup_user", password="Dsn-Pa55word-xyz", superuser=True)
    server = Server(
        name="maldives", dsn=sample_cluster.dsn("reliabilitymaldives", user="backup_user"), password="Dsn-Pa55word-xyz"
    )
    server.pg_version = server.probe()
    server.save()
    result, output, found = traced(settings, tmp_path / "execve.trace", "backup", "maldives")
    assert result.get("status") == "succeeded", output
    programs = [Path(program).name for _, program, _, _ in found]
    # The trace saw the whole pipeline...
    assert {"pg_dump", "pg_dumpall", "gpg"} <= set(programs), programs
    # ...and neither the passphrase nor the DSN password was ever in an argv (environments are
    # tests/test_secrets_jobs.py's: the DSN password is in PGPASSWORD of the libpq tools).
    passphrase = passphrase_file.read_text().strip()
    for _, program, argv, _ in found:
        assert passphrase not in argv and "Dsn-Pa55word-xyz" not in argv, program


def test_a_world_readable_passphrase_file_fails_the_run_and_writes_nothing(server, passphrase_file, backup_root):
    from django.core.management import call_command

    passphrase_file.chmod(0o644)
    with pytest.raises(SystemExit):
        call_command("backup", "maldives")
    run = BackupRun.objects.get()
    assert run.status == "failed"
    assert "can be read by others" in run.error and "chmod 600" in run.error
    assert files_under(backup_root) == []


def test_a_missing_passphrase_file_fails_the_run(server, settings, backup_root):
    from django.core.management import call_command

    settings.BACKUP_PASSPHRASE_FILE = "/nonexistent/passphrase"
    with pytest.raises(SystemExit):
        call_command("backup", "maldives")
    assert "does not exist" in BackupRun.objects.get().error
    settings.BACKUP_PASSPHRASE_FILE = str(backup_root)  # a directory, not "missing"
    with pytest.raises(SystemExit):
        call_command("backup", "maldives")
    assert f"passphrase file {backup_root} is a directory" in BackupRun.objects.latest("pk").error


def test_public_key_recipients_the_backup_host_cannot_decrypt(server, settings, backup_root, tmp_path):
    """GPG_RECIPIENTS: only the holder of the secret key (not the portal) can read the backup."""
    from django.core.management import call_command

    owner_home = tmp_path / "owner-gnupg"
    owner_home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(owner_home), "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run(
        gpg + ["--quick-gen-key", "dr-officer@reliabilitymaldives.mv", "ed25519", "cert", "never"],
        check=True,
        capture_output=True,
    )
    fpr = (
        subprocess.run(gpg + ["--list-keys", "--with-colons"], capture_output=True, text=True)
        .stdout.split("fpr:::::::::")[1]
        .split(":")[0]
    )
    subprocess.run(gpg + ["--quick-add-key", fpr, "cv25519", "encr", "never"], check=True, capture_output=True)
    public = subprocess.run(gpg + ["--export", "--armor", fpr], capture_output=True, check=True).stdout
    portal_home = tmp_path / "portal-gnupg"
    settings.GNUPGHOME = str(portal_home)
    settings.GPG_RECIPIENTS = [fpr]
    settings.BACKUP_PASSPHRASE_FILE = ""
    portal_home.mkdir(mode=0o700)
    subprocess.run(
        ["gpg", "--batch", "--homedir", str(portal_home), "--import"], input=public, check=True, capture_output=True
    )

    call_command("backup", "maldives")
    run = BackupRun.objects.get()
    assert run.status == "succeeded", run.error
    artifact = backup_root / run.key
    portal_try = subprocess.run(
        ["gpg", "--batch", "--homedir", str(portal_home), "--decrypt", str(artifact)], capture_output=True
    )
    assert portal_try.returncode != 0  # the portal holds no secret key
    plain = subprocess.run(gpg + ["--decrypt", str(artifact)], capture_output=True, check=True).stdout
    assert plain[:5] == b"PGDMP"  # pg_dump's custom format


def test_a_backup_past_its_timeout_is_stopped_and_failed(big_server, passphrase_file, backup_root, settings):
    from django.core.management import call_command

    settings.BACKUP_TIMEOUT = 1
    with pytest.raises(SystemExit):
        call_command("backup", "maldives")
    run = BackupRun.objects.get()
    assert run.status == "failed" and "timed out after 1 s" in run.error
    assert files_under(backup_root) == []


def test_a_location_whose_capacity_is_reached_fails_the_run_cleanly(big_server, passphrase_file, backup_root):
    from django.core.management import call_command

    from backups.models import StorageLocation

    StorageLocation.objects.filter(name="primary").update(capacity_bytes=5 * 2**20)
    with pytest.raises(SystemExit):
        call_command("backup", "maldives")
    run = BackupRun.objects.get()
    assert run.status == "failed" and "configured capacity" in run.error
    assert files_under(backup_root) == []


def test_a_run_failed_by_the_sweep_while_it_wrote_its_manifest_keeps_no_file(
    server, passphrase_file, backup_root, monkeypatch
):
    """The sweep failed the run (its heartbeat late, say) and removed the files it knew of; the
    run's process then wrote its manifest and came to finish: that manifest goes too, never a
    signed manifest in the primary of a run the catalog says failed."""
    from backups import manifests, runner
    from backups.models import BackupCopy

    write = manifests.write_for_run

    def swept_meanwhile(run):
        key = write(run)
        runner.finish_failed(BackupRun.objects.get(pk=run.pk), "interrupted: no heartbeat since 20:00:00")
        return key

    monkeypatch.setattr(manifests, "write_for_run", swept_meanwhile)
    run = runner.execute(runner.claim(server, "logical", trigger="manual", actor="alice"))
    assert run.status == "failed" and run.error.startswith("interrupted")
    assert files_under(backup_root) == []
    assert not BackupCopy.objects.filter(run=run).exclude(status="deleted").exists()


@pytest.mark.parametrize(
    "content, said",
    [
        (b"pass\r\n", "has Windows line endings: stock gpg would take the CR as part of the passphrase"),
        (b"pass\nsecond line\n", "holds more than its first line: stock gpg reads only that line"),
        (b"\npass\n", "holds more than its first line"),
        (b"\xff\xfe\x00p\x00a", "is not text (UTF-8)"),
        (b"\n\n", "is empty: write the passphrase in it"),
        (b"ab\0the-long-secret\n", "holds a NUL byte: gpg would stop reading there"),
    ],
    ids=["crlf", "two-lines", "blank-first", "binary", "empty", "nul"],
)
def test_a_passphrase_file_stock_gpg_reads_otherwise_fails_the_run_in_one_line(
    server, passphrase_file, backup_root, content, said
):
    """Found by review: a file with CRLF endings made backups that the README's `gpg
    --passphrase-file` could not open (the portal stripped the CR, gpg keeps it)."""
    from django.core.management import call_command

    passphrase_file.write_bytes(content)
    with pytest.raises(SystemExit):
        call_command("backup", "maldives")
    run = BackupRun.objects.get()
    assert run.status == "failed" and said in run.error and "\n" not in run.error
    assert not list(backup_root.rglob("*.gpg"))


def test_a_passphrase_on_its_line_with_a_newline_opens_with_stock_gpg(server, passphrase_file, backup_root, tmp_path):
    from django.core.management import call_command

    passphrase_file.write_bytes(b"  spaces kept  \n")
    call_command("backup", "maldives", stdout=StringIO())
    artifact = next(backup_root.rglob("*.dump.gpg"))
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    decrypted = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase-file",
         str(passphrase_file), "--decrypt", str(artifact)],
        capture_output=True,
    )  # fmt: skip
    assert decrypted.returncode == 0, decrypted.stderr.decode()[-500:]


@pytest.mark.parametrize("phrase", ["pässwörd-long-enough", "passwort-€-long-enough"])
def test_a_new_key_with_a_passphrase_beyond_ascii_is_refused_in_one_line(
    server, backup_root, settings, tmp_path, phrase
):
    """Found by review: python-gnupg gives gpg a passphrase in Latin-1 (or fails on a euro sign),
    stock gpg --passphrase-file the file's UTF-8 bytes: backups the README's command could not open.
    A new key must be ASCII; keys made before keep working as they did."""
    from django.core.management import call_command

    passfile = tmp_path / "passphrase"
    passfile.write_bytes(phrase.encode() + b"\n")
    passfile.chmod(0o600)
    settings.BACKUP_PASSPHRASE_FILE = str(passfile)
    with pytest.raises(SystemExit):
        call_command("backup", "maldives")
    run = BackupRun.objects.get()
    assert run.status == "failed" and "the passphrase holds characters beyond ASCII" in run.error
    assert not list(backup_root.rglob("*.gpg"))


def test_a_worker_without_gpg_fails_the_backup_in_one_line(server, passphrase_file, backup_root, tmp_path, monkeypatch):
    """Found by a probe: gpg missing from the worker's PATH gave "internal error: OSError: Unable to
    run gpg", a traceback and no JSON. The run fails saying what to do."""
    from backups import keyring
    from tests.helpers import backup_json

    bare = tmp_path / "bin"  # the PostgreSQL tools are found by their own directory, not PATH
    bare.mkdir()
    monkeypatch.setattr(keyring, "_of_key", {})  # no Encryption set up before in this process
    with monkeypatch.context() as only:  # the clusters' teardown needs the real PATH back
        only.setenv("PATH", str(bare))
        result = backup_json()
    assert result["status"] == "failed", result
    assert result["error"].startswith("gpg cannot be run (") and "install gnupg" in result["error"], result["error"]
    assert "\n" not in result["error"] and "internal error" not in result["error"]


def test_a_failed_run_whose_file_cannot_be_removed_is_still_failed_journaled_and_its_copy_bad(
    server, passphrase_file, backup_root
):
    """Found by a probe (a location read-only by then): removing a failed run's file raised, so the
    command printed a traceback, nothing journaled the failure, and its copy stayed catalogued ok
    over the file left behind. The failure is journaled first; what stays is named, its copy bad."""
    from django.utils import timezone

    from backupportal.models import JournalEntry
    from backups.models import BackupCopy, StorageLocation
    from backups.runner import finish_failed

    key = "maldives/logical/20261207T000000+0500-1.dump.gpg"
    run = BackupRun.objects.create(
        server=server, kind="logical", status="running", started_at=timezone.now(), key=key, details={"keys": [key]}
    )
    stuck = backup_root / key  # something the location will not unlink as a file
    (stuck / "inside").mkdir(parents=True)
    copy = BackupCopy.objects.create(
        run=run, location=StorageLocation.objects.get(name="primary"), key=key, size=1, sha256="a" * 64, status="ok"
    )
    assert finish_failed(run, "pg_dump: error: the server went away")
    run.refresh_from_db(), copy.refresh_from_db()
    assert run.status == "failed" and run.error.startswith("pg_dump: error: the server went away; what it wrote")
    assert key in run.error and copy.status == BackupCopy.Status.BAD and key in copy.last_error
    assert JournalEntry.objects.filter(action="backup_failed", object_id=str(run.pk)).exists()


def test_ctrl_c_on_a_foreground_backup_fails_its_run_at_once(big_server, passphrase_file, backup_root, settings):
    """Found by a probe: SIGINT left the run 'running' (and a traceback) until the orphan sweep.
    The command gets SIGINT's default back: a CI started in the background of a shell without job
    control runs everything with SIGINT ignored, and Python then installs no Ctrl-C handler."""
    proc = manage(settings, "backup", "maldives", "--json", preexec_fn=ctrl_c_default)
    wait_for(lambda: child_named(proc.pid, "pg_dump"), what="pg_dump to start")
    os.kill(proc.pid, signal.SIGINT)  # at once: a CI under load saw the dump end before a later one
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    [run] = BackupRun.objects.all()
    assert run.status == "failed" and run.error.startswith("interrupted (Ctrl-C)"), (run.status, run.error)
    assert files_under(backup_root) == []


def ctrl_c_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
