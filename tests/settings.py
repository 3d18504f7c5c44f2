"""Settings for the test suite: the real settings, pointed at a throwaway var/ directory."""

import atexit
import os
import shutil
import tempfile

# One var/ for the session, made by the pytest process; the manage.py subprocesses the tests
# start inherit VAR_DIR and must not each make (and leave behind) a directory of their own.
if "VAR_DIR" not in os.environ:
    _var = tempfile.mkdtemp(prefix="bp-test-var-")
    os.chmod(_var, 0o755)  # the postgres OS user (archive command, restored clusters) must traverse it
    os.environ["VAR_DIR"] = _var
    _maker = os.getpid()
    atexit.register(lambda: os.getpid() == _maker and shutil.rmtree(_var, ignore_errors=True))
# Under pytest-xdist every worker gets a var/ of its own inside the session's (journal key,
# spools, SQLite database): two workers never share a file. The subprocesses a worker starts
# inherit both variables and land in the same place.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker and os.path.basename(os.environ["VAR_DIR"]) != _worker:
    os.environ["VAR_DIR"] = os.path.join(os.environ["VAR_DIR"], _worker)
    os.makedirs(os.environ["VAR_DIR"], mode=0o755, exist_ok=True)
    os.chmod(os.environ["VAR_DIR"], 0o755)
_var = os.environ["VAR_DIR"]
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("WHITENOISE_USE_FINDERS", "true")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,127.0.0.1,localhost")
# The suite logs in with force_login and no authenticator: the tests of the second factor turn
# it on (tests/test_two_factor.py), as production has it.
os.environ.setdefault("REQUIRE_2FA", "false")
# A light key derivation, as PASSWORD_HASHERS below: the strategy's costs 0.25 s of CPU per gpg
# run, thousands of times a suite. tests/test_encryption.py checks what production sets.
os.environ.setdefault("GPG_S2K_COUNT", "65536")

from backupportal.settings import *  # noqa: E402,F403

# A file, not :memory:, so that subprocesses (manage.py under strace, a real qcluster worker)
# see the same test database.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(_var, "test.sqlite3")}  # noqa: F405

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
# Tasks run inline in the test process; the portal and worker that browser tests start as
# subprocesses get Q_SYNC=0 and use the real broker.
# A queue per xdist worker: the Redis broker is one server for all of them.
Q_CLUSTER = {  # noqa: F405
    **Q_CLUSTER,  # noqa: F405
    "sync": os.environ.get("Q_SYNC", "1") == "1",
    "name": "-".join(filter(None, (Q_CLUSTER["name"], _worker))),  # noqa: F405
}

# tests/management/commands/flush.py: transactional tests empty the journal on SQLite too.
INSTALLED_APPS = [*INSTALLED_APPS, "tests"]  # noqa: F405
# Tests that count the files in a location see only artifacts (also when a worker they start
# meets the hourly schedule); tests/test_journal_anchors.py turns the anchors back on.
JOURNAL_ANCHORS = False
# The alert channel tests' receivers listen on 127.0.0.1, which a channel may not reach unless
# listed (tests/test_alert_channels.py empties the list where it tests the refusal).
ALERT_CHANNEL_ALLOWED_HOSTS = ["127.0.0.1"]
# The worker's ingest returns as soon as the spool is empty (test_wal_ingest sets it where it tests the wait).
WAL_INGEST_LINGER = 0
