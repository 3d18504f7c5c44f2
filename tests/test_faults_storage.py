"""Storage faults: a read-only location under an unprivileged worker, and an S3 endpoint that
refuses connections, hangs or answers 500 during upload, verification and restore.

The S3 faults come from a small real TCP proxy between boto3 and moto's server: boto3 and moto
are untouched, the proxy only decides what the wire does.
"""

import json
import pwd
import shutil
import socket
import threading
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups.copies import retry_due_copies
from backups.models import BackupCopy, BackupRun, StorageLocation
from tests.helpers import UNPRIVILEGED, catalog_files, lent_to, manage_as, worker_home
from watching.models import Alert

ERROR_500 = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


class FaultyEndpoint:
    """An HTTP proxy in front of moto whose behaviour is switched by set(mode, only=METHODS).

    pass   relay both ways;
    refuse the port is closed: connections are refused, as when the host is down;
    hang   read the request, never answer (boto3's read timeout must end it);
    500    answer with HTTP 500 InternalError;
    stall  relay the request, then only the first `stall_after` bytes of the answer, then hang.

    `only` limits hang, 500 and stall to requests of those methods (say PUT: uploads, GET:
    downloads); the others pass. Every relayed request gets `Connection: close`, so each
    connection carries one request and a mode applies from the next request on.
    """

    def __init__(self, upstream_port, stall_after=16 * 1024):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.stall_after = stall_after
        self.mode, self.only = "pass", None
        self.faulted = []  # request lines answered with the fault: boto3's attempts
        self.listener = None
        self.open = set()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.listen()

    def listen(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def set(self, mode, only=None):
        with self.lock:
            for sock in list(self.open):
                _close(sock)
            self.open.clear()
            self.faulted = []
        if mode == "refuse" and self.listener is not None:
            _close(self.listener)
            self.listener = None
        elif mode != "refuse" and self.listener is None:
            self.listen()
        self.mode, self.only = mode, only

    def close(self):
        self.closed.set()
        self.set("refuse")

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                self.open.add(client)
            threading.Thread(target=self._serve, args=(client, self.mode, self.only), daemon=True).start()

    def _serve(self, client, mode, only):
        try:
            head, rest = _read_head(client)
            if head is None:
                return
            line = head.split(b"\r\n", 1)[0].decode()
            if only and line.split()[0] not in only:
                mode = "pass"
            if mode in ("hang", "500", "stall"):
                with self.lock:
                    self.faulted.append(line)
            if mode == "hang":
                while client.recv(65536) and not self.closed.is_set():
                    pass
            elif mode == "500":
                _read_body(client, head, rest)
                client.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                    + f"Content-Length: {len(ERROR_500)}\r\nConnection: close\r\n\r\n".encode()
                    + ERROR_500
                )
                client.shutdown(socket.SHUT_WR)
                while client.recv(65536):  # let boto3 close first: no reset on unread bytes
                    pass
            else:
                self._relay(client, _one_request(head) + rest, self.stall_after if mode == "stall" else None)
        except OSError:
            pass
        finally:
            _close(client)

    def _relay(self, client, request, budget):
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with self.lock:
            self.open.add(upstream)
        upstream.sendall(request)
        threading.Thread(target=_pump, args=(client, upstream, None), daemon=True).start()
        _pump(upstream, client, budget)
        if budget is not None:  # the answer stops mid-way and the connection stays open
            self.closed.wait()
        _close(upstream)


def _pump(src, dst, budget):
    try:
        while chunk := src.recv(65536):
            if budget is not None:
                chunk = chunk[:budget]
                budget -= len(chunk)
            if chunk:
                dst.sendall(chunk)
            if budget == 0:
                return
    except OSError:
        pass
    finally:
        if budget is None:
            _close(dst)


def _read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", rest


def _one_request(head):
    """The request head with `Connection: close`: the server closes after its answer."""
    lines = [h for h in head.rstrip(b"\r\n").split(b"\r\n") if not h.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _read_body(sock, head, body):
    headers = head.decode(errors="replace").lower()
    if "expect: 100-continue" in headers:
        return  # a final status instead of 100 Continue: the client does not send the body
    length = 0
    for line in headers.splitlines():
        if line.startswith("content-length:"):
            length = int(line.split(":")[1])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return
        body += chunk


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# --- A read-only location, with a worker that is not root -------------------------------------


def backup_as(user, settings, home):
    return manage_as(user, settings, home, "backup", "maldives", "--json")


@pytest.mark.django_db(transaction=True)
def test_a_read_only_location_fails_the_run_with_one_line_and_leaves_nothing(
    server, passphrase_file, backup_root, settings
):
    backup_root.chmod(0o755)  # readable, not writable, by anyone but root
    home = worker_home(settings, passphrase_file, UNPRIVILEGED)
    try:
        with lent_to(UNPRIVILEGED, *catalog_files()):
            refused = backup_as(UNPRIVILEGED, settings, home)
            # The same worker, once the location is its own: the setup is sound, the next run succeeds.
            with lent_to(UNPRIVILEGED, backup_root):
                done = backup_as(UNPRIVILEGED, settings, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    assert refused.returncode == 1, refused.stderr
    [stderr] = refused.stderr.strip().splitlines()
    line = stderr.removeprefix("backup failed: ")
    assert line == (
        f"location primary ({backup_root}) is not writable by the OS user {UNPRIVILEGED} that runs the backups "
        f"(Permission denied: {backup_root / 'maldives'}): make it writable by that user (chown/chmod, or "
        "remount read-write), or point the location at another directory"
    ), line
    result = json.loads(refused.stdout.strip().splitlines()[-1])
    run = BackupRun.objects.get(pk=result["id"])
    assert result["status"] == run.status == "failed" and run.error == line
    assert run.size is None and not run.copies.filter(status=BackupCopy.Status.OK).exists()
    assert Alert.objects.get(condition="backup_failed", state="open").message.endswith(line)
    assert JournalEntry.objects.get(action="backup_failed", object_id=str(run.pk)).details["error"] == line

    assert done.returncode == 0, done.stderr
    good = BackupRun.objects.get(pk=json.loads(done.stdout.strip().splitlines()[-1])["id"])
    assert good.status == "succeeded" and good.is_good
    artifact = backup_root / good.key
    assert artifact.stat().st_uid == pwd.getpwnam(UNPRIVILEGED).pw_uid  # written by the unprivileged worker
    # Nothing of the refused run anywhere: only the good run's two artifacts.
    files = sorted(p.relative_to(backup_root) for p in backup_root.rglob("*") if p.is_file())
    assert files == sorted(Path(k) for k in good.details["keys"])


# --- S3 faults ---------------------------------------------------------------------------------

FAULTS = ["refuse", "hang", "500"]


@pytest.fixture
def faulty(tiers, settings):
    """The S3 location reached through a FaultyEndpoint; timeouts short enough for a test."""
    settings.S3_CONNECT_TIMEOUT, settings.S3_READ_TIMEOUT, settings.S3_MAX_ATTEMPTS = 1, 1, 2
    settings.STORAGE_ALLOWED_HOSTS = ["127.0.0.1"]  # the proxy is another port there
    proxy = FaultyEndpoint(tiers.server.port)
    StorageLocation.objects.filter(kind="s3").update(endpoint_url=proxy.endpoint)
    tiers.locations["s3"].refresh_from_db()
    yield proxy
    proxy.close()


def backup_json():
    out = StringIO()
    try:
        call_command("backup", "maldives", "--json", stdout=out, stderr=StringIO())
    except SystemExit:
        pass
    return json.loads(out.getvalue().strip().splitlines()[-1])


def s3_objects(tiers):
    return [o["Key"] for o in tiers.s3.list_objects_v2(Bucket=tiers.bucket).get("Contents", [])]


def sha256_of(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def bounded(settings, calls):
    """The longest `calls` S3 calls may take against a silent endpoint: every attempt times out, plus backoff."""
    per_call = settings.S3_MAX_ATTEMPTS * (settings.S3_CONNECT_TIMEOUT + settings.S3_READ_TIMEOUT) + 2
    return calls * per_call + 5


# refuse: the host is down; hang and 500 hit the upload itself (its PUTs), after the
# existence check and the multipart upload's creation went through.
UPLOAD_FAULTS = [("refuse", None), ("hang", {"PUT"}), ("500", {"PUT"})]
MESSAGES = {
    "refuse": "cannot reach the S3 endpoint",
    "hang": "Read timeout",
    "500": "answered 500 InternalError to",
}


@pytest.mark.parametrize("fault,only", UPLOAD_FAULTS, ids=[f for f, _ in UPLOAD_FAULTS])
def test_s3_failing_during_upload_fails_the_copy_not_the_backup(
    fault, only, server, passphrase_file, tiers, faulty, settings
):
    settings.S3_MULTIPART_THRESHOLD = 4096  # the multipart path, as large dumps take
    faulty.set(fault, only)
    started = time.monotonic()
    result = backup_json()
    took = time.monotonic() - started
    assert result["status"] == "succeeded", result
    status = {(c["location"], c["status"]) for c in result["copies"]}
    assert status == {("primary", "ok"), ("nas", "ok"), ("s3", "failed")}
    # Bounded: three S3 copies (dump, globals, signed manifest) failed in seconds, each PUT tried
    # S3_MAX_ATTEMPTS times.
    assert took < bounded(settings, calls=3), took
    if fault != "refuse":
        assert len(faulty.faulted) == 3 * settings.S3_MAX_ATTEMPTS, faulty.faulted

    run = BackupRun.objects.get(pk=result["id"])
    s3 = run.copies.get(location__kind="s3", artifact="main")
    assert s3.status == "failed" and s3.attempts == 1, s3.last_error
    assert MESSAGES[fault] in s3.last_error and "\n" not in s3.last_error, s3.last_error
    if fault != "refuse":
        assert "upload_part" in s3.last_error  # the dump went by multipart; its part failed
    # The run's local copy is whole and good; nothing half-uploaded is in the bucket, not even parts.
    primary = run.copies.get(location__kind="primary", artifact="main")
    assert primary.status == "ok" and sha256_of(tiers.primary / run.key) == run.sha256 == primary.sha256
    assert s3_objects(tiers) == []
    assert "Uploads" not in tiers.s3.list_multipart_uploads(Bucket=tiers.bucket)
    alert = Alert.objects.get(condition="upload_failed", subject="location:s3", state="open")
    assert "to s3 failed on attempt 1" in alert.message and MESSAGES[fault] in alert.message
    assert JournalEntry.objects.filter(action="copy_failed", outcome="failed").count() == 3

    # The endpoint recovers: the retry schedule makes the copies and the alert resolves.
    faulty.set("pass")
    assert retry_due_copies(now=timezone.now() + timedelta(minutes=2))["copied"] == 3
    s3.refresh_from_db()
    assert s3.status == "ok" and s3.sha256 == run.sha256
    alert.refresh_from_db()
    assert alert.state == "resolved"


def good_backup_everywhere():
    result = backup_json()
    assert result["status"] == "succeeded" and {c["status"] for c in result["copies"]} == {"ok"}, result
    return BackupRun.objects.get(pk=result["id"])


# A download that fails before an answer, or (stall) part-way through the object's bytes.
DOWNLOAD_FAULTS = [("refuse", None), ("hang", {"GET"}), ("500", {"GET"}), ("stall", {"GET"})]


def verify_json(*args):
    out, err = StringIO(), StringIO()
    try:
        call_command("verify", *args, "--json", stdout=out, stderr=err)
    except SystemExit:
        pass
    return json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


@pytest.mark.parametrize("fault,only", DOWNLOAD_FAULTS, ids=[f for f, _ in DOWNLOAD_FAULTS])
def test_s3_failing_during_verify_is_could_not_verify_never_corrupt(
    fault, only, server, passphrase_file, tiers, faulty, settings
):
    run = good_backup_everywhere()
    s3_main = run.copies.get(location__kind="s3", artifact="main")
    assert (tiers.primary / run.key).stat().st_size > faulty.stall_after  # so that `stall` cuts it
    faulty.set(fault, only)
    started = time.monotonic()
    found, err = verify_json(str(run.pk))
    assert time.monotonic() - started < bounded(settings, calls=6)
    by_copy = {(c["location"], c["artifact"]): c for c in found["copies"]}
    # Stalling cuts only what is longer than its budget: the small globals and manifest files get through.
    small = {("s3", "globals"), ("s3", "signed_manifest")}
    unreachable = {("s3", "main")} | (small if fault != "stall" else set())
    assert {k for k, c in by_copy.items() if c["status"] == "unreachable"} == unreachable
    assert {k for k, c in by_copy.items() if c["status"] == "ok"} == set(by_copy) - unreachable
    assert found["bad"] == 0 and f"0 bad and {len(unreachable)} unreachable" in err
    assert MESSAGES.get(fault, "Read timeout") in by_copy[("s3", "main")]["error"]
    # The catalog still believes the copy good (it was not proven otherwise) and not freshly verified.
    s3_main.refresh_from_db()
    assert s3_main.status == "ok" and s3_main.verified_at is None
    assert not Alert.objects.filter(condition="corruption").exists()
    assert not JournalEntry.objects.filter(action="copy_bad").exists()
    assert JournalEntry.objects.get(action="verify").details["unreachable"] == len(unreachable)

    faulty.set("pass")
    found, _ = verify_json(str(run.pk))
    assert found["ok"] == found["checked"] == 9  # dump, globals, signed manifest on three tiers
    s3_main.refresh_from_db()
    assert s3_main.verified_at is not None


def database_exists(cluster, name):
    return bool(cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]))


def restore_json(run, dbname):
    out, err = StringIO(), StringIO()
    try:
        call_command("restore", str(run.pk), "--into-database", dbname, "--json", stdout=out, stderr=err)
    except SystemExit:
        pass
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("fault,only", DOWNLOAD_FAULTS, ids=[f for f, _ in DOWNLOAD_FAULTS])
def test_a_restore_with_only_s3_left_fails_cleanly_while_it_fails_and_succeeds_after(
    fault, only, server, sample_cluster, passphrase_file, tiers, faulty, settings
):
    run = good_backup_everywhere()
    # The local disaster: the primary and NAS copies are gone; S3 is all that is left.
    (tiers.primary / run.key).unlink()
    (tiers.nas / run.key).unlink()
    faulty.set(fault, only)
    result = restore_json(run, "restored_during_fault")
    assert result["status"] == "failed"
    error = result["error"]
    assert "\n" not in error and MESSAGES.get(fault, "Read timeout") in error, error
    if fault != "stall":  # stall fails mid-stream, after the copy was chosen
        assert "primary copy missing; nas copy missing; s3 unreadable (" in error, error
    # Nothing half-restored: the new database is gone; the S3 copy is not condemned.
    assert not database_exists(sample_cluster, "restored_during_fault")
    copies = dict(run.copies.filter(artifact="main").values_list("location__name", "status"))
    assert copies == {"primary": "bad", "nas": "bad", "s3": "ok"}

    faulty.set("pass")
    result = restore_json(run, "restored_after_fault")
    assert result["status"] == "succeeded", result
    assert f"read from s3 (s3://{tiers.bucket}/" in result["notes"]
    with sample_cluster.connect("restored_after_fault") as conn:
        from backupportal.lib import sampledata

        assert sampledata.counts(conn) == run.details["row_counts"]


@pytest.mark.parametrize("fault,only", DOWNLOAD_FAULTS, ids=[f for f, _ in DOWNLOAD_FAULTS])
def test_pitr_fetch_skips_an_unreachable_s3_copy_without_condemning_it(
    fault, only, server, passphrase_file, tiers, faulty, tmp_path
):
    """backups.streams, as PITR reads base backups and WAL: S3 faulty → the next copy, or a clear failure."""
    from backups.copies import mark_faults
    from backups.crypto import Encryption
    from backups.streams import FetchFailed, FileSink, decrypt_first_healthy, readable

    run = good_backup_everywhere()
    copies = {c.location.name: c for c in run.copies.filter(artifact="main").select_related("location")}
    faulty.set(fault, only)
    # S3 first (as a remote restore host that has no local tier would read it): it falls back to the NAS.
    sink = FileSink(tmp_path / "fallback.dump")
    notes, faults = decrypt_first_healthy([copies["s3"], copies["nas"]], sink, Encryption(), f"run #{run.pk}")
    assert notes == [f"run #{run.pk}: read from nas after s3: unreachable ({notes[0].split('unreachable (', 1)[1]}"]
    assert MESSAGES.get(fault, "Read timeout") in notes[0]
    mark_faults(faults)
    assert (tmp_path / "fallback.dump").read_bytes()[:5] == b"PGDMP"

    # Only S3 left: a clear failure, no plaintext left behind, the S3 copy still believed good.
    for gone in ("primary", "nas"):
        (getattr(tiers, gone) / run.key).unlink()
    with pytest.raises(FetchFailed) as failed:
        decrypt_first_healthy(
            readable(copies.values()), FileSink(tmp_path / "only_s3.dump"), Encryption(), f"run #{run.pk}"
        )
    mark_faults(failed.value.faults)
    message = str(failed.value)
    assert message.startswith(f"run #{run.pk} cannot be read intact from any location (primary: missing (")
    assert "; s3: unreachable (" in message and "\n" not in message
    assert list(tmp_path.glob("*only_s3*")) == []
    assert dict(run.copies.filter(artifact="main").values_list("location__name", "status")) == {
        "primary": "bad",
        "nas": "bad",
        "s3": "ok",
    }


def test_a_logical_restore_falls_back_to_the_next_copy_when_one_breaks_off_mid_stream(
    server, sample_cluster, passphrase_file, tiers, faulty, settings, s3_client
):
    """Primary and NAS gone; the S3 copy stalls after its first bytes: the restore reads the
    replica bucket (the next location in read order) instead of failing, and condemns nothing."""
    from backups.copies import copy_one, plan_copies

    run = good_backup_everywhere()
    replica = f"{tiers.bucket}-replica"
    s3_client.create_bucket(Bucket=replica)
    s3 = tiers.locations["s3"]
    StorageLocation.objects.create(
        name="s3-replica", kind="s3", bucket=replica, prefix=s3.prefix, endpoint_url=tiers.server.endpoint
    )
    plan_copies(run)
    for copy in run.copies.filter(location__name="s3-replica"):
        assert copy_one(copy).status == "ok"
    (tiers.primary / run.key).unlink()
    (tiers.nas / run.key).unlink()
    faulty.set("stall", {"GET"})

    result = restore_json(run, "restored_from_replica")

    assert result["status"] == "succeeded", result
    notes = result["notes"]
    assert "s3 failed mid-stream (" in notes and "Read timeout" in notes, notes
    assert f"read from s3-replica (s3://{replica}/" in notes, notes
    assert faulty.faulted  # the stall did hit the S3 copy's download
    copies = dict(run.copies.filter(artifact="main").values_list("location__name", "status"))
    assert copies == {"primary": "bad", "nas": "bad", "s3": "ok", "s3-replica": "ok"}
    with sample_cluster.connect("restored_from_replica") as conn:
        from backupportal.lib import sampledata

        assert sampledata.counts(conn) == run.details["row_counts"]
