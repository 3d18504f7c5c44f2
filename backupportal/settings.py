"""Settings for backupportal, read from the environment (and `.env` when present).

Every variable is documented in `.env.example`. With nothing set, the portal runs on
SQLite under var/ with django-q2's ORM broker, so it needs no service at all.
"""

import os
import secrets
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from backupportal.lib.clientaddr import parse_networks

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env")
# After .env, so that VAR_DIR may be set there too.
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))


def _secret_key():
    """SECRET_KEY from the environment, else one generated once and kept in var/ (0600)."""
    if env.str("SECRET_KEY", default=""):
        return env.str("SECRET_KEY")
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(64))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_q",
    # TOTP devices and recovery codes (backupportal/twofactor.py); their own admin is not used.
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "backupportal",
    "backups",
    "restores",
    "watching",
]

MIDDLEWARE = [
    # X-Forwarded-Proto from TRUSTED_PROXIES or this host only, before anything asks request.is_secure().
    "backupportal.middleware.ForwardedProtoMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Scripts and styles from our static files only: no inline script runs, injected or not.
    "backupportal.middleware.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    # A NUL or an out-of-range date in a filter or a search: 400 with one line, not a 500.
    "backupportal.middleware.BadQueryMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Pages of a logged-in user: Cache-Control no-store, unless the view said otherwise.
    "backupportal.middleware.PrivatePagesMiddleware",
    # request.user.is_verified(): the second factor of this session (django-otp).
    "django_otp.middleware.OTPMiddleware",
    # Every page needs a login; the few public views say so with @login_not_required.
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    # ...and one of the three roles: a user with none gets a page saying so (403).
    "backupportal.middleware.RoleRequiredMiddleware",
    # ...and the second factor: asked after the password when enrolled, enrolment when required.
    "backupportal.middleware.SecondFactorMiddleware",
    # Auditors get 403 on every POST, on every page (DESIGN.md's role table).
    "backupportal.middleware.AuditorsChangeNothingMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "backupportal.urls"
WSGI_APPLICATION = "backupportal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "backupportal.roles.context_processor",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'portal.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Workers and the web server write at once: wait for the lock instead of failing, and
    # take it at BEGIN so that a read-then-write transaction cannot deadlock.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"timeout": 30, "transaction_mode": "IMMEDIATE"})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Django's backend behind the login limits (backupportal/logins.py), and single sign-on
# (backupportal/sso.py), which does nothing until OIDC_RP_CLIENT_ID is set.
AUTHENTICATION_BACKENDS = ["backupportal.logins.LimitedModelBackend", "backupportal.sso.SsoBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

# Login limits (backupportal.models.LoginFailure), over failures of the last window: per user
# name and address, after LOGIN_FREE_ATTEMPTS failures each attempt waits 1, 2, 4... up to
# LOGIN_MAX_DELAY seconds after the last failure (a wait, never a lock-out, and never one that
# others' failures elsewhere impose on the owner); per address, LOGIN_ADDRESS_LIMIT failures
# refuse the address until the window passes. Many addresses guessing one name are slowed each
# on its own: the second factor is what stops a guessed password.
LOGIN_FAILURE_WINDOW = env.int("LOGIN_FAILURE_WINDOW", default=15 * 60)
LOGIN_FREE_ATTEMPTS = env.int("LOGIN_FREE_ATTEMPTS", default=3)
LOGIN_MAX_DELAY = env.int("LOGIN_MAX_DELAY", default=60)
LOGIN_ADDRESS_LIMIT = env.int("LOGIN_ADDRESS_LIMIT", default=20)
# Proxies (addresses or CIDRs) whose X-Forwarded-For is believed: behind the TLS proxy every
# client has the proxy's address. Nobody's, by default.
TRUSTED_PROXIES = env.list("TRUSTED_PROXIES", default=[])
parse_networks(TRUSTED_PROXIES)  # fail at start on a typo, not at the first login

# Second factor (TOTP, django-otp): required of DBAs, Sysadmins and superusers when on, and
# asked again (a code of the last 5 minutes) before approving a restore or a destructive change
# whenever it is on or the approver has enrolled. The demo turns it off; production keeps it.
REQUIRE_2FA = env.bool("REQUIRE_2FA", default=True)
# The name an authenticator app shows beside the code.
OTP_TOTP_ISSUER = env.str("OTP_TOTP_ISSUER", default="backupportal")


def _role_map(text):
    """OIDC_ROLE_MAP: "idp-group=Role,..." -> {idp-group: Role}; a role must be one of the three."""
    mapping = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        group, sep, role = (part.strip() for part in pair.rpartition("="))
        if not sep or not group or role not in ("DBA", "Sysadmin", "Auditor"):
            raise ImproperlyConfigured(
                f"OIDC_ROLE_MAP: {pair!r} is not GROUP=ROLE with ROLE one of DBA, Sysadmin, Auditor "
                "(e.g. OIDC_ROLE_MAP=pg-dbas=DBA,infra=Sysadmin,audit=Auditor)"
            )
        mapping[group] = role
    return mapping


# Single sign-on with OpenID Connect (mozilla-django-oidc; backupportal/sso.py): on when
# OIDC_RP_CLIENT_ID is set. Accounts are linked by (issuer, subject), never by email; the
# groups claim gives the roles through OIDC_ROLE_MAP, again at every login.
OIDC_RP_CLIENT_ID = env.str("OIDC_RP_CLIENT_ID", default="")
OIDC_RP_CLIENT_SECRET = env.str("OIDC_RP_CLIENT_SECRET", default="")
OIDC_ISSUER = env.str("OIDC_ISSUER", default="").rstrip("/")
OIDC_OP_AUTHORIZATION_ENDPOINT = env.str("OIDC_OP_AUTHORIZATION_ENDPOINT", default="")
OIDC_OP_TOKEN_ENDPOINT = env.str("OIDC_OP_TOKEN_ENDPOINT", default="")
OIDC_OP_USER_ENDPOINT = env.str("OIDC_OP_USER_ENDPOINT", default="")
OIDC_OP_JWKS_ENDPOINT = env.str("OIDC_OP_JWKS_ENDPOINT", default="")
OIDC_RP_SIGN_ALGO = env.str("OIDC_RP_SIGN_ALGO", default="RS256")
OIDC_RP_SCOPES = env.str("OIDC_RP_SCOPES", default="openid email profile")
OIDC_GROUPS_CLAIM = env.str("OIDC_GROUPS_CLAIM", default="groups")
OIDC_ROLE_MAP = _role_map(env.str("OIDC_ROLE_MAP", default=""))
OIDC_PROVIDER_NAME = env.str("OIDC_PROVIDER_NAME", default="single sign-on")
OIDC_TIMEOUT = env.int("OIDC_TIMEOUT", default=10)
OIDC_USE_PKCE = True
OIDC_CREATE_USER = True
OIDC_AUTHENTICATION_CALLBACK_URL = "oidc-callback"
if OIDC_RP_CLIENT_ID:
    _missing = [
        name
        for name in ("OIDC_RP_CLIENT_SECRET", "OIDC_ISSUER", "OIDC_OP_AUTHORIZATION_ENDPOINT", "OIDC_OP_TOKEN_ENDPOINT")
        + ("OIDC_OP_USER_ENDPOINT", "OIDC_OP_JWKS_ENDPOINT")
        if not globals()[name]
    ]
    if _missing:
        raise ImproperlyConfigured(
            f"OIDC_RP_CLIENT_ID is set but {', '.join(_missing)} not: set them from your identity provider's "
            ".well-known/openid-configuration, or unset OIDC_RP_CLIENT_ID"
        )

LANGUAGE_CODE = "en-gb"
# One date and time format everywhere (backupportal/formats/en_GB/formats.py).
FORMAT_MODULE_PATH = ["backupportal.formats"]
TIME_ZONE = env.str("TIME_ZONE", default="Indian/Maldives")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
if env.bool("WHITENOISE_USE_FINDERS", default=False):
    # Tests and the demo serve static files without running collectstatic first.
    WHITENOISE_USE_FINDERS = True
    STORAGES["staticfiles"]["BACKEND"] = "django.contrib.staticfiles.storage.StaticFilesStorage"

# Security. Production is https; the demo on http://127.0.0.1 turns SECURE_SSL_REDIRECT off,
# and the cookie flags follow it so that the login works there.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=SECURE_SSL_REDIRECT)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=SECURE_SSL_REDIRECT)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000 if SECURE_SSL_REDIRECT else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_AGE = env.int("SESSION_COOKIE_AGE", default=8 * 3600)  # one working day
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"


def _pg_bin_dirs(listed, single):
    """The only directories whose PostgreSQL programs the portal runs (backups.binaries picks
    among them): PG_BIN_DIRS (colon-separated), else PG_BIN, else every Debian-style one present.
    A directory listed but missing is kept here and skipped with a warning at startup."""
    dirs = [d for d in listed.split(":") if d.strip()] or ([single] if single else [])
    if not dirs:
        return sorted(str(p) for p in Path("/usr/lib/postgresql").glob("*/bin"))
    for d in dirs:
        if not os.path.isabs(d):
            raise ImproperlyConfigured(
                f"PG_BIN_DIRS: {d!r} is not an absolute path: list directories such as /usr/lib/postgresql/15/bin"
            )
    if listed and single and os.path.normpath(single) not in [os.path.normpath(d) for d in dirs]:
        raise ImproperlyConfigured(f"PG_BIN={single} is not one of PG_BIN_DIRS={listed}: set one of the two")
    return [os.path.normpath(d) for d in dirs]


# PostgreSQL binaries. PG_BIN is the single-directory form of PG_BIN_DIRS (also read by
# backupportal.lib.pgcluster for throwaway clusters).
PG_BIN = env.str("PG_BIN", default="")
PG_BIN_DIRS = _pg_bin_dirs(env.str("PG_BIN_DIRS", default=""), PG_BIN)

# pg_dump's own gzip level (custom format); gpg never compresses again. See bench/RESULTS.md.
PG_DUMP_COMPRESS = env.int("PG_DUMP_COMPRESS", default=1)
# zstd's level for base backups (zstd -T0 on every core; gpg then only encrypts), 1-19. Quick
# bench (103 MiB strategy-shaped, shared 2-core machine): level 1 4.76 s and 59.5 MiB, level 3
# 5.04 s and 58.1 MiB, within the run-to-run noise; 3 is zstd's own default.
# 1 by measurement (bench/RESULTS.md, base backups): on the strategy-shaped cluster level 3 took
# half as much CPU again for an artifact 1.7% smaller. -1 to -10 are zstd's --fast=1..10.
BASE_ZSTD_LEVEL = env.int("BASE_ZSTD_LEVEL", default=1)
if not (1 <= BASE_ZSTD_LEVEL <= 19 or -10 <= BASE_ZSTD_LEVEL <= -1):
    raise ImproperlyConfigured(
        f"BASE_ZSTD_LEVEL={BASE_ZSTD_LEVEL}: zstd's levels are 1 to 19, or -1 to -10 for --fast=1 to 10"
    )
# Who compresses a base backup: "server" (BASE_BACKUP's own zstd, read over the replication
# protocol by backups.basestream; a server built without zstd falls back by itself) or "client"
# (pg_basebackup's tar through zstd -T0 on the portal's machine). The server's way measured about
# 1.5 s less on the bench's 1 GB cluster, and sends a third of the bytes over the network.
BASE_COMPRESSION = env.str("BASE_COMPRESSION", default="server")
if BASE_COMPRESSION not in ("server", "client"):
    raise ImproperlyConfigured(f"BASE_COMPRESSION={BASE_COMPRESSION!r}: say server or client")
# zstd threads the database server gives a base backup it compresses (0: one, in its walsender).
BASE_SERVER_WORKERS = env.int("BASE_SERVER_WORKERS", default=2)
if not 0 <= BASE_SERVER_WORKERS <= 64:
    raise ImproperlyConfigured(f"BASE_SERVER_WORKERS={BASE_SERVER_WORKERS}: say 0 to 64 zstd threads")
# A backup still running after this many seconds is stopped and failed.
BACKUP_TIMEOUT = env.int("BACKUP_TIMEOUT", default=6 * 3600)
# A logical backup waits this long for each table's lock (its counting, and pg_dump's
# --lock-wait-timeout), then fails and lets go: production's ALTER TABLE or TRUNCATE queued behind
# the backup's lock would otherwise queue the backup's next lock behind itself, a wait no
# deadlock detector sees, with every query on that table stuck behind both.
BACKUP_LOCK_WAIT = env.int("BACKUP_LOCK_WAIT", default=120)
if BACKUP_LOCK_WAIT < 1:  # 0 would mean no bound at all to PostgreSQL
    raise ImproperlyConfigured(
        f"BACKUP_LOCK_WAIT={BACKUP_LOCK_WAIT}: say how many seconds (1 or more) to wait for a lock"
    )
# A run still queued after this many seconds was lost by the broker or no worker is running:
# it is failed, which frees the lock; so are a queued restore test and an approved restore
# request no worker started (restores.orphans). Above the longest wait for a free worker.
# A server the monitor finds not answering for this long is an alert (one pass is a blip: a restart).
UNREACHABLE_AFTER_MINUTES = env.int("UNREACHABLE_AFTER_MINUTES", default=5)
QUEUED_RUN_TIMEOUT = env.int("QUEUED_RUN_TIMEOUT", default=3600)
# A base backup or an incremental run waits this long for its WAL to be archived and ingested.
WAL_WAIT_SECONDS = env.int("WAL_WAIT_SECONDS", default=300)
# Push archiving: once the spool is empty, the worker's every-minute ingest waits this many seconds
# for more WAL before it ends; a pass still taking WAL ends only when the next minute's takes over
# (walingest.HANDOVER). Under load a segment is then catalogued and encrypted seconds after
# PostgreSQL archives it, not up to a minute later; an idle server's pass ends at once. 0: never
# wait, and a pass lasts at most walingest.PASS_SECONDS.
WAL_INGEST_LINGER = env.int("WAL_INGEST_LINGER", default=20)
# A PITR starts the cluster once its base backup is in place and fetches the WAL while recovery
# runs, at most this many segments and 256 MiB ahead of replay (restores/pitr_prefetch.py): the
# staging area stays bounded, and the WAL fetched while the base is extracted covers a day's worth
# of 1 MB segments (16 of 16 MB ones).
PITR_PREFETCH_SEGMENTS = env.int("PITR_PREFETCH_SEGMENTS", default=256)
# pg_receivewal must stream this long before it counts as recovered (receiver_down resolves):
# a receiver that keeps dying mails no "resolved" between its deaths.
RECEIVER_STEADY_SECONDS = env.int("RECEIVER_STEADY_SECONDS", default=10)
# Pull: the server's own archiver (an archive_command left from push, or the DBA's own) failing
# with nothing archived for this long is archive_failing: pg_wal keeps every segment it has not
# archived. PostgreSQL retries a failure at once and then each minute; a passing one is not mailed.
PULL_ARCHIVER_GRACE_SECONDS = env.int("PULL_ARCHIVER_GRACE_SECONDS", default=300)

# pg_restore jobs for logical restores: 1 pipes the decrypted stream (no plaintext on disk);
# more decrypts into a private scratch file (0600, removed afterwards), as pg_restore -j needs,
# while the schema is restored from the table of contents; data and indexes then run with -j.
# Measured 21% faster with 2 jobs on 2 cores (bench/RESULTS.md), hence the default.
RESTORE_JOBS = env.int("RESTORE_JOBS", default=2)
# With more than one job, the tables' rows are loaded by COPY as gpg decrypts the file, rather
# than by pg_restore once it is whole (restores.dumpstream): False leaves them to pg_restore.
RESTORE_STREAM_DATA = env.bool("RESTORE_STREAM_DATA", default=True)
# maintenance_work_mem of the restore's own sessions (index builds), on the target server: up
# to RESTORE_JOBS of them build at once.
RESTORE_MAINTENANCE_WORK_MEM = env.str("RESTORE_MAINTENANCE_WORK_MEM", default="256MB")

# Storage.
BACKUP_ROOT = Path(env.str("BACKUP_ROOT", default=str(VAR_DIR / "backups")))
WAL_ROOT = Path(env.str("WAL_ROOT", default=str(BACKUP_ROOT / "wal")))
WAL_SPOOL = Path(env.str("WAL_SPOOL", default=str(VAR_DIR / "walspool")))
# Sandbox clusters of approved PITR requests, and the throwaway clusters of base-backup restore
# tests, on the portal's host: the postgres OS user must be able to traverse it.
SANDBOX_ROOT = Path(env.str("SANDBOX_ROOT", default=str(VAR_DIR / "sandboxes")))
# A PITR's WAL staging directory (restores/pitr_staging.py), root's and outside the new cluster's
# data directory: every directory on its path must be root's and writable by no one else, and
# traversable by the postgres OS user (as SANDBOX_ROOT is; VAR_DIR, with the keys, need not be).
# It holds a window of decrypted WAL (about 256 MB) a PITR.
PITR_STAGING_ROOT = Path(env.str("PITR_STAGING_ROOT", default=str(SANDBOX_ROOT / "pitr-staging")))
# A request's sandbox is stopped and removed this many seconds after it was restored (the hourly
# "sandboxes-expire" schedule): three days to look around, then its disk, port and copy of
# production data are given back.
SANDBOX_MAX_AGE = env.int("SANDBOX_MAX_AGE", default=72 * 3600)
NAS_ROOT = env.str("NAS_ROOT", default="")
if NAS_ROOT and any(
    a == b or a in b.parents or b in a.parents
    for a, b in ((Path(NAS_ROOT).resolve(), Path(root).resolve()) for root in (BACKUP_ROOT, WAL_ROOT))
):
    # Its copies would be the primary's own files under the same keys (StorageLocation.check_apart).
    raise ImproperlyConfigured(f"NAS_ROOT {NAS_ROOT} overlaps BACKUP_ROOT or WAL_ROOT: give the NAS its own directory.")
S3_BUCKET = env.str("S3_BUCKET", default="")
S3_ENDPOINT_URL = env.str("S3_ENDPOINT_URL", default="")
S3_PREFIX = env.str("S3_PREFIX", default="backupportal/")
S3_SSE = env.str("S3_SSE", default="")
S3_STORAGE_CLASS = env.str("S3_STORAGE_CLASS", default="")
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION are read by boto3 itself
# from the environment, so the secret never passes through settings or the database.
# Objects past the threshold go up by multipart upload, one part in memory at a time.
S3_MULTIPART_THRESHOLD = env.int("S3_MULTIPART_THRESHOLD", default=8 * 1024 * 1024)
S3_PART_SIZE = env.int("S3_PART_SIZE", default=8 * 1024 * 1024)
# A multipart upload started this many seconds ago, with no part sent for as long, was left by a
# killed copy: retention aborts it (backups.s3uploads), as S3 bills its parts until then.
S3_STALE_UPLOAD_AGE = env.int("S3_STALE_UPLOAD_AGE", default=24 * 3600)
# A dead endpoint must fail a copy in seconds (the worker retries it later), not hang a worker:
# refused at once; no answer to connect, 3 x 5 s; connected but silent, 3 x 10 s.
S3_CONNECT_TIMEOUT = env.int("S3_CONNECT_TIMEOUT", default=5)
S3_READ_TIMEOUT = env.int("S3_READ_TIMEOUT", default=10)
S3_MAX_ATTEMPTS = env.int("S3_MAX_ATTEMPTS", default=3)

# Encryption: a passphrase file (0600) for symmetric AES-256, or public-key recipients.
BACKUP_PASSPHRASE_FILE = env.str("BACKUP_PASSPHRASE_FILE", default="")
GPG_RECIPIENTS = env.list("GPG_RECIPIENTS", default=[])
# The passphrase's key derivation (gpg --s2k-count, SHA-512): the strategy's 65011712, the most
# gpg encodes, about 0.25 s of CPU per artifact encrypted or decrypted. Lowering it weakens the
# passphrase against guessing; the test settings lower it, as Django's tests do password hashing.
GPG_S2K_COUNT = env.int("GPG_S2K_COUNT", default=65011712)
if not 1024 <= GPG_S2K_COUNT <= 65011712:
    raise ImproperlyConfigured(f"GPG_S2K_COUNT={GPG_S2K_COUNT}: gpg takes 1024 to 65011712 (the strategy's)")
GNUPGHOME = env.str("GNUPGHOME", default="")
# The keyring: every key that encrypted a kept artifact, by its random key id (backups.keyring).
# A directory of 0600 files, 0700; never inside a selfbackup, and to be kept in escrow too.
KEYRING_DIR = Path(env.str("KEYRING_DIR", default=str(VAR_DIR / "keyring")))

# The journal's HMAC key and the newest entry's HMAC live outside the database.
JOURNAL_KEY_FILE = Path(env.str("JOURNAL_KEY_FILE", default=str(VAR_DIR / "journal.key")))
JOURNAL_HEAD_FILE = Path(env.str("JOURNAL_HEAD_FILE", default=str(VAR_DIR / "journal.head")))
# The head is also written as an anchor to every storage location hourly (the "journal-anchors"
# schedule) and when a backup finishes. Not from the environment: production keeps it on.
JOURNAL_ANCHORS = True
# The key that seals the servers' passwords in the catalog (backupportal/lib/sealed.py).
SECRETS_KEY_FILE = Path(env.str("SECRETS_KEY_FILE", default=str(VAR_DIR / "secrets.key")))
# The portal's OpenPGP signing key (manifests, evidence packs): a GnuPG home of its own, 0700,
# never inside a selfbackup; its public half is SIGNING_KEY_DIR/signing-public.asc.
SIGNING_KEY_DIR = Path(env.str("SIGNING_KEY_DIR", default=str(VAR_DIR / "signing")))
# The portal's own database backed up daily (selfbackup): alerted when the newest good one is
# older than this many hours; the newest SELFBACKUP_KEEP are kept in every location.
SELFBACKUP_MAX_AGE_HOURS = env.int("SELFBACKUP_MAX_AGE_HOURS", default=26)
SELFBACKUP_KEEP = env.int("SELFBACKUP_KEEP", default=14)
# Evidence packs made on the evidence page, kept for download (watching/evidence_pack.py).
EVIDENCE_DIR = Path(env.str("EVIDENCE_DIR", default=str(VAR_DIR / "evidence")))

# Alert mail.
EMAIL_CONFIG = env.email_url("EMAIL_URL", default="consolemail://")
vars().update(EMAIL_CONFIG)
ALERT_EMAILS = env.list("ALERT_EMAILS", default=[])
# Alert channels (watching/channels.py) refuse a JSON webhook or Teams host that resolves to a
# loopback, link-local, private (RFC 1918, 100.64/10, fc00::/7), multicast or unspecified address,
# unless listed here: names (mattermost.corp.mv), addresses (10.0.4.7) or networks (10.20.0.0/16).
# Private ones too, so that whoever edits a channel cannot make the portal probe the database
# servers and storage beside it. Cloud metadata addresses are refused even when listed.
ALERT_CHANNEL_ALLOWED_HOSTS = env.list("ALERT_CHANNEL_ALLOWED_HOSTS", default=[])
# The same for a storage location's S3 endpoint (backups/s3.py), which receives requests signed
# with the S3 credentials: a MinIO on 10.x is listed here. S3_ENDPOINT_URL needs no listing.
STORAGE_ALLOWED_HOSTS = env.list("STORAGE_ALLOWED_HOSTS", default=[])
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="backupportal@localhost")
EMAIL_TIMEOUT = 10

METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# django-q2: one dict. The ORM broker needs no service; Q_BROKER_URL=redis://... for Redis.
Q_BROKER_URL = env.str("Q_BROKER_URL", default="")
Q_CLUSTER = {
    "name": "backupportal",
    "workers": env.int("Q_WORKERS", default=2),
    # A base backup of a large database runs for hours; the lock and the run's heartbeat,
    # not this timeout, find a dead worker. retry must stay above timeout.
    "timeout": env.int("Q_TIMEOUT", default=6 * 3600),
    "retry": env.int("Q_TIMEOUT", default=6 * 3600) + 600,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "save_limit": 1000,
    "poll": 1,
    "label": "Task queue (superusers only)",
}
# The restore worker: a django-q2 cluster of its own (`Q_CLUSTER_NAME=restore manage.py qcluster`,
# on the host holding the private key of GPG_RECIPIENTS) that alone takes restore, restore-test
# and rebuild tasks. Empty: they run on the main cluster, as before.
RESTORE_CLUSTER = env.str("RESTORE_CLUSTER", default="")
if RESTORE_CLUSTER == Q_CLUSTER["name"]:
    raise ImproperlyConfigured(
        f"RESTORE_CLUSTER must differ from the main cluster's name {Q_CLUSTER['name']!r}: leave it empty for one cluster"
    )
# django-q2 reads a started cluster's own options here by its Q_CLUSTER_NAME (and needs the key
# whenever Q_CLUSTER_NAME names another cluster than the main one).
Q_CLUSTER["ALT_CLUSTERS"] = {RESTORE_CLUSTER: {}} if RESTORE_CLUSTER else {}
if Q_BROKER_URL.startswith("redis"):
    Q_CLUSTER["redis"] = Q_BROKER_URL
elif Q_BROKER_URL:
    raise ImproperlyConfigured(
        f"Q_BROKER_URL must be empty (ORM broker) or redis://...; got {Q_BROKER_URL.split(':')[0]}://"
    )
else:
    Q_CLUSTER["orm"] = "default"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "redact": {"()": "backupportal.lib.redact.RedactFilter"},
        "forbidden_in_one_line": {"()": "backupportal.lib.logfilters.ForbiddenInOneLine"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "filters": ["redact"]},
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        # Where Django logs each 403 with its traceback.
        "django.request": {"filters": ["forbidden_in_one_line"]},
        # Apprise's INFO and DEBUG lines quote the URLs it posts to, webhook tokens included.
        "apprise": {"level": "WARNING"},
        # urllib3 logs each request line at DEBUG, a webhook's token in its path or query included.
        "urllib3": {"level": "INFO"},
    },
}
