"""A server's DSN read the way libpq reads it, and the settings every client of it gets.

One parser for the portal's connections (psycopg) and for the client tools (pg_dump and the
others, which take the same settings as PG* environment variables), so that both reach the
same host with the same SSL rules. A DSN libpq would read differently, or a parameter we would
drop on the floor, is refused with one line saying what to change, never guessed at.
"""

import re
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

SCHEMES = ("postgresql://", "postgres://")
SHAPE = "postgresql://USER@HOST:PORT/DBNAME"

# The DSN parameters the portal passes on, each with the environment variable the client
# tools read it from. Anything else is refused: silently dropping `sslmode=require` would
# back up over a connection the DBA asked to be encrypted.
PARAMETERS = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "application_name": "PGAPPNAME",
}
CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
}
# Where they would change whom we connect to as, they belong in the DSN's own parts.
OWN_PARTS = ("host", "hostaddr", "port", "user", "dbname")
DEFAULTS = {"connect_timeout": "10", "application_name": "backupportal"}

# What the portal's own connections (psycopg's libpq, 16 or newer) require of the server: it
# never answers a request for the password in clear text or as md5 (a listener that asks for
# one would learn the password, or a hash as good as it). Trust, peer and SCRAM still work.
SAFE_AUTH = "!password,!md5"


class DsnError(ValueError):
    """The DSN cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Dsn:
    host: str
    port: int
    user: str
    dbname: str
    password: str = ""
    params: dict = field(default_factory=dict)

    @property
    def target(self) -> str:
        """Whom a password is for: the user at the host and port. Bound to the stored password."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def tls(self) -> str:
        """How sure a connection is of the server it reaches, as the stored password is bound to
        it: the sslmode (libpq's default, prefer, when none is named) and, where it verifies, the
        root certificate it trusts."""
        mode, root = self.params.get("sslmode", "prefer"), self.params.get("sslrootcert", "")
        if mode == "require" and root:
            mode = "verify-ca"  # libpq verifies the certificate when a root certificate is given
        return f"{mode} {root}".rstrip() if mode.startswith("verify") else mode

    def settings(self) -> dict:
        """The connection parameters, defaults included (what psycopg takes as keywords)."""
        return DEFAULTS | self.params

    def environment(self) -> dict:
        """The same parameters as PG* variables, for the client tools (whose libpq may be older)."""
        return {PARAMETERS[name]: value for name, value in self.settings().items()}


def tls_weakened(then: str, now: str) -> bool:
    """Is a connection with Dsn.tls `now` less sure of its server than one with `then`? A lower
    sslmode, or another root certificate where `then` verified. Never when `then` is unknown ("")."""
    if not then:
        return False
    order = CHOICES["sslmode"]
    (mode_then, _, root_then), (mode_now, _, root_now) = then.partition(" "), now.partition(" ")
    if order.index(mode_now) < order.index(mode_then):
        return True
    return mode_then.startswith("verify") and root_now != root_then


def parse(dsn: str) -> Dsn:
    """Read a postgresql:// URI as libpq does (percent-decoding included), or raise DsnError."""
    dsn = (dsn or "").strip()
    scheme = next((s for s in SCHEMES if dsn.startswith(s)), None)
    if scheme is None:
        raise DsnError(f"the DSN must start with postgresql://: write it as {SHAPE}")
    userinfo, rest = _credentials(dsn[len(scheme) :])
    rest, _, query = rest.partition("?")
    hostport, _, path = rest.partition("/")
    user, colon, password = userinfo.partition(":")
    _refuse_ambiguous(user, hostport)
    host, port = _host_and_port(hostport)
    return Dsn(
        host=_decode(host, "host"),
        port=port,
        user=_decode(user, "user") or "postgres",
        dbname=_decode(path, "database name") or "postgres",
        password=_decode(password, "password") if colon else "",
        params=_parameters(query),
    )


def _credentials(body):
    """(USER[:PASSWORD], the rest), split as libpq does: at the first '@' met before any '/'
    (a '?' or ':' in a password is its own, an '@' in one must be written %40)."""
    stop = next((i for i, c in enumerate(body) if c in "@/"), len(body))
    if body[stop : stop + 1] == "@":
        return body[:stop], body[stop + 1 :]
    return "", body


def _refuse_ambiguous(user, hostport):
    """Read as libpq reads them, an unencoded '@' in a user name ("me@corp@host") or in a parameter
    before any path ("host?application_name=ops@corp") would move the host: what an earlier reading
    of this DSN took for the host is not it. Refused, never guessed: '@' is written %40."""
    if "@" in hostport or any(c in user for c in "?&="):
        raise DsnError(
            "the DSN has an '@' that is not the one before its host: write '@' in a name or a parameter as %40"
        )


def _host_and_port(hostport):
    if "," in hostport:
        raise DsnError("the DSN names several hosts: register each server on its own, with one host")
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket:
            raise DsnError("the DSN's IPv6 address has no closing ']': write it as postgresql://USER@[ADDRESS]:PORT/DB")
        if after and not after.startswith(":"):
            raise DsnError(f"the DSN has more after its IPv6 address than a port: write it as {SHAPE}")
        port = after[1:]
    else:
        host, _, port = hostport.partition(":")
    if not host:
        raise DsnError(
            f"the DSN names no host (libpq would quietly use a local socket): write it as {SHAPE}, "
            "a socket directory percent-encoded (postgresql://USER@%2Fvar%2Frun%2Fpostgresql/DBNAME)"
        )
    if not port:
        return host, 5432
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        # Not quoted: a password missing its '@' ("USER:PASSWORD/DB") is read as host and port.
        raise DsnError(f"the DSN's port is not a number from 1 to 65535: write it as {SHAPE}")
    return host, int(port)


def _parameters(query):
    params = {}
    for pair in filter(None, query.split("&")):
        name, equals, value = pair.partition("=")
        name = _decode(name, "parameter name")
        if not equals:
            raise DsnError(f"the DSN parameter {name!r} has no value: write {name}=VALUE")
        value = _decode(value, f"parameter {name}")
        if name == "password":
            raise DsnError("the DSN holds a password: give the password separately, never in the DSN")
        if name in OWN_PARTS:
            raise DsnError(f"the DSN parameter {name!r} is not accepted: put it in the DSN's own part ({SHAPE})")
        if name not in PARAMETERS:
            raise DsnError(f"the DSN parameter {name!r} is not supported: use only {', '.join(PARAMETERS)}")
        if name in params:
            raise DsnError(f"the DSN parameter {name!r} is given twice: keep one")
        params[name] = _checked(name, value)
    return params


def _checked(name, value):
    if name in CHOICES and value not in CHOICES[name]:
        raise DsnError(f"the DSN's {name}={value!r} is not one of {', '.join(CHOICES[name])}")
    if name == "connect_timeout" and not (value.isascii() and value.isdigit()):
        raise DsnError(f"the DSN's connect_timeout={value!r} is not a number of seconds")
    if not value:
        raise DsnError(f"the DSN parameter {name!r} is empty: give it a value or leave it out")
    return value


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode(text, what):
    """libpq's percent-decoding: a bad escape or a NUL byte is an error, not passed through."""
    if _BAD_PERCENT.search(text):
        raise DsnError(f"the DSN's {what} has a '%' that is not followed by two hex digits: write %25 for '%'")
    raw = unquote_to_bytes(text)
    if b"\x00" in raw:
        raise DsnError(f"the DSN's {what} holds a NUL byte (%00): remove it")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise DsnError(f"the DSN's {what} is not valid UTF-8 once percent-decoded") from None
