"""How the portal reaches a protected server: its DSN, its stored password, its connections.

The DSN is read as libpq reads it (backupportal/lib/libpq.py) and every parameter it carries
(sslmode and the like) reaches every connection and every client tool. The password is sealed
at rest (backupportal/lib/sealed.py) for the user, host and port it was entered for, and goes
nowhere else: change any of the three without giving a new password and it is forgotten.
"""

import psycopg
from django.core.exceptions import ValidationError
from django.db import models
from psycopg.types.string import TextLoader

from backupportal.lib.libpq import SAFE_AUTH, Dsn, DsnError, parse, tls_weakened
from backupportal.lib.pgerrors import explain
from backupportal.lib.sealed import SealError, seal, unseal
from backups.pipeline import BackupFailed

# What pages and messages show of a DSN that cannot be read (one registered before the rules
# got stricter); nothing connects with it: connect() and libpq_env() refuse such a DSN.
UNREADABLE = Dsn(host="(unreadable DSN)", port=0, user="", dbname="")

# Every session of the portal's own, in production and in restored copies, whatever the database
# or the role was set to (ALTER DATABASE/ROLE ... SET; the startup options outrank both): names
# resolve in pg_catalog only, so an owner's count(*) or operator in public, before pg_catalog in
# the database's search_path, never runs as the portal's role; and no timeout of the database's
# cancels the portal's counting (pg_dump turns them off too). Restored PITR copies: Restored.connect.
SESSION_GUARD = (
    "-c search_path=pg_catalog,pg_temp -c statement_timeout=0 -c lock_timeout=0"
    " -c idle_in_transaction_session_timeout=0"
)
TRANSACTION_TIMEOUT_FROM = 170000  # before 17 the setting is unknown, and a startup option naming it is fatal


def session_guard(pg_version):
    """SESSION_GUARD for the client tools of a server of `pg_version` (0: not probed yet): from 17
    also without transaction_timeout, which would end pg_dump's snapshot (and a restore's long
    COPY) midway. The version is the one its last connection said (ServerConnection._note_version)."""
    more = " -c transaction_timeout=0" if (pg_version or 0) >= TRANSACTION_TIMEOUT_FROM else ""
    return SESSION_GUARD + more


def guard_newer(conn):
    """The guard's part a startup option cannot carry to every version: from 17, transaction_timeout
    off, set on the connection once it says which version answered (a version recorded earlier may
    be another cluster's: naming the setting at startup to a 15 is fatal)."""
    if conn.info.server_version >= TRANSACTION_TIMEOUT_FROM:
        conn.execute("SET transaction_timeout = 0")
        if not conn.autocommit:
            conn.commit()
    return conn


class SqlAsciiText(TextLoader):
    """Text from a SQL_ASCII database is bytes in no known encoding: psycopg returns them as
    bytes, which the code reading settings, snapshot names and catalogs does not expect. They
    come back as text here, any byte that is not UTF-8 written as a \\x escape.
    """

    def load(self, data):
        return bytes(data).decode("utf-8", "backslashreplace")


class ServerConnection(models.Model):
    """The connection half of Server: an abstract model, so Server's module stays readable."""

    # The DSN never holds the password, so it can be shown on every page and in every log.
    dsn = models.CharField(
        "DSN",
        max_length=500,
        help_text="postgresql://USER@HOST:PORT/DBNAME, optionally ?sslmode=require and other libpq "
        "parameters (sslrootcert, sslcert, sslkey, connect_timeout, target_session_attrs, application_name)",
    )
    # Sealed with SECRETS_KEY_FILE for password_target: never the password itself.
    password_sealed = models.TextField(blank=True, editable=False)
    password_target = models.CharField(
        max_length=600, blank=True, editable=False, help_text="USER@HOST:PORT the stored password was entered for"
    )
    # A Sysadmin who turns sslmode=verify-full down to require (or disable) would let a listener on
    # the way stand in for the server: the password is not sent over a connection less sure of it.
    password_tls = models.CharField(
        max_length=600,
        blank=True,
        editable=False,
        help_text="the DSN's sslmode (and root certificate, where it verifies) the stored password was entered with",
    )

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        # Whatever changed the DSN (the admin, a shell, a script), a password entered for another
        # user, host or port, or with a surer TLS, is dropped here rather than sent to the new one.
        if self.password_sealed and not self._password_fits():
            self.password_sealed = self.password_target = self.password_tls = ""
            self.password_forgotten = True
            if kwargs.get("update_fields") is not None:
                fields = {"password_sealed", "password_target", "password_tls"}
                kwargs["update_fields"] = {*kwargs["update_fields"], *fields}
        super().save(*args, **kwargs)

    def clean_dsn(self):
        """The DSN's form: a ValidationError on the dsn field naming what to change."""
        try:
            parse(self.dsn)
        except DsnError as e:
            raise ValidationError({"dsn": f"malformed DSN: {e}."}) from None
        if parse(self.dsn).password:
            raise ValidationError({"dsn": "The DSN holds a password: give the password separately, never in the DSN."})

    # --- What the DSN says, for pages and for the client tools.

    def _parts(self) -> Dsn:
        try:
            return parse(self.dsn)
        except DsnError:
            return UNREADABLE

    def _target(self) -> str:
        parts = self._parts()
        return "" if parts is UNREADABLE else parts.target

    def _password_fits(self) -> bool:
        """Is the stored password for this DSN: its user, host and port, and a TLS as sure?"""
        parts = self._parts()
        return (
            parts is not UNREADABLE
            and self.password_target == parts.target
            and not tls_weakened(self.password_tls, parts.tls)
        )

    @property
    def host(self):
        return self._parts().host

    @property
    def port(self):
        return self._parts().port

    @property
    def user(self):
        return self._parts().user

    @property
    def dbname(self):
        return self._parts().dbname

    # --- The password: sealed at rest, only for whom it was entered.

    @property
    def password(self) -> str:
        """The stored password, for this DSN's user, host and port only, and a TLS as sure as when
        it was entered ('' for any other)."""
        if not self.password_sealed or not self._password_fits():
            return ""
        return unseal(self.password_sealed, self.password_target)

    @password.setter
    def password(self, value):
        target = self._target()
        if value and target:
            self.password_sealed, self.password_target = seal(value, target), target
            self.password_tls = self._parts().tls
        else:
            self.password_sealed = self.password_target = self.password_tls = ""

    # --- Connections.

    def connection_settings(self, dbname=None) -> dict:
        """psycopg's keywords: the DSN's, the stored password, and no password sent in clear text."""
        try:
            parts = parse(self.dsn)
            password = self.password
        except (DsnError, SealError) as e:
            # Raised as what a failed connection raises, so every caller's error path says it.
            raise psycopg.OperationalError(f"server {self}: {e}") from None
        return {
            "host": parts.host,
            "port": parts.port,
            "user": parts.user,
            "dbname": dbname or parts.dbname,
            "password": password or None,
            "require_auth": SAFE_AUTH,
        } | parts.settings()

    def connect(self, dbname=None, autocommit=True, **kwargs):
        """A psycopg connection (autocommit unless asked otherwise) to this server."""
        settings = self.connection_settings(dbname) | kwargs
        # The caller's own options after the guard: a query that sets its own statement_timeout
        # (watching.rpo's) keeps it; the DSN cannot carry options (backupportal.lib.libpq).
        settings["options"] = f"{SESSION_GUARD} {settings.get('options') or ''}".strip()
        conn = psycopg.connect(**settings, autocommit=autocommit)
        try:
            _ = conn.info.encoding  # asked of the server's encoding: raises for one Python lacks
        except psycopg.NotSupportedError:  # EUC_TW, MULE_INTERNAL: no Python codec; the server converts
            conn.close()
            conn = psycopg.connect(**settings, client_encoding="UTF8", autocommit=autocommit)
        if conn.info.encoding == "ascii":  # a SQL_ASCII database
            for type_name in ("text", "name", "varchar", "bpchar"):
                conn.adapters.register_loader(type_name, SqlAsciiText)
        guard_newer(conn)
        self._note_version(conn)
        return conn

    def _note_version(self, conn):
        """The server says its version at every connection: one upgraded in place since it was
        registered is recorded anew, and the client tools' session guard follows it."""
        known, now = getattr(self, "pg_version", None), conn.info.server_version
        if known is None or not self.pk or known // 10000 == now // 10000:
            return
        type(self).objects.filter(pk=self.pk).update(pg_version=now)
        self.pg_version = now

    def libpq_env(self, dbname=None) -> dict:
        """Environment for the client tools: the DSN's settings as PG* variables, the password via PGPASSWORD.

        The tools' libpq (15 here) cannot refuse to send a password in clear text, as the portal's
        own connections do (require_auth). So before a password is handed to one, a connection
        that can refuse asks the same host and port: one asking for a cleartext or md5 password
        gets nothing, and the tool is not started. (PGREQUIREAUTH does the same in a libpq 16+.)
        """
        try:
            settings = self.connection_settings(dbname)
        except psycopg.Error as e:  # the DSN or the sealed password cannot be used
            raise BackupFailed(str(e)) from None
        env = {"PGHOST": settings["host"], "PGPORT": str(settings["port"]), "PGUSER": settings["user"]}
        env |= {"PGDATABASE": settings["dbname"], "PGREQUIREAUTH": SAFE_AUTH} | parse(self.dsn).environment()
        # pg_dump sets its own search_path and timeouts; pg_dumpall, pg_restore and the others do
        # not all do (a role's statement_timeout cancels pg_dumpall's catalog query).
        env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {session_guard(getattr(self, 'pg_version', 0))}".strip()
        if settings["password"]:
            self.refuse_weak_authentication(settings)
            env["PGPASSWORD"] = settings["password"]
        return env

    def refuse_weak_authentication(self, settings):
        """BackupFailed unless the server takes a connection that never sends the password in clear.

        pg_basebackup and pg_receivewal connect for replication, which pg_hba.conf may allow a
        user who may not connect to the database: either kind of connection will do.
        """
        try:
            psycopg.connect(**settings).close()
        except psycopg.Error as e:
            if "authentication method requirement" in str(e) or not _replication_connects(settings):
                raise BackupFailed(explain(e, self)) from None

    def system_identifier(self) -> str:
        """The identifier initdb gave the cluster the DSN reaches now; psycopg's error when it
        cannot be read. Schema-qualified: a function of that name in the search path is not it."""
        with self.connect() as conn:
            row = conn.execute("SELECT system_identifier FROM pg_catalog.pg_control_system()").fetchone()
        return str(row[0])

    def probe(self) -> int:
        """Connect and return server_version_num; a ValidationError with one line if we cannot use it."""
        try:
            with self.connect() as conn:
                # Reported by the server at connection start (ParameterStatus server_version).
                version = conn.info.server_version
        except psycopg.Error as e:
            raise ValidationError(explain(e, self)) from None
        if version < 150000:
            raise ValidationError(
                f"{self.host}:{self.port} runs PostgreSQL {version // 10000}, older than 15: "
                "upgrade it, or protect it with another tool."
            )
        return version


def _replication_connects(settings):
    try:
        psycopg.connect(**settings, replication="true").close()
    except psycopg.Error:
        return False
    return True
