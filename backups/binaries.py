"""Which PostgreSQL programs the portal runs: only those in the directories PG_BIN_DIRS lists.

Whoever may name a directory may run code as the worker, so only the operator (through the
environment) lists directories; the web chooses among them. Two rules pick the directory:

- client tools talk to a server over libpq, and a newer one reads an older server (pg_dump
  refuses a newer one): the directory of the server's major version, else the newest at
  least as new;
- programs that run or read a data directory (postgres, pg_ctl, pg_waldump...) must be of
  that directory's major version exactly: PostgreSQL refuses anything else.
"""

import functools
import logging
import os
import re
import subprocess
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from psycopg.conninfo import make_conninfo

from backupportal.lib import osuser
from backupportal.lib.childenv import child_env
from backups.pipeline import BackupFailed

log = logging.getLogger(__name__)

CLIENT_TOOLS = {"pg_dump", "pg_dumpall", "pg_basebackup", "pg_receivewal", "psql", "pg_restore"}
CLUSTER_TOOLS = {"postgres", "pg_ctl", "pg_combinebackup", "pg_controldata", "pg_waldump", "pg_verifybackup"}
# Asked in this order for a directory's major version; the first that answers tells.
VERSION_PROGRAMS = ("pg_config", "postgres", "pg_dump")
VERSION_LINE = re.compile(r"PostgreSQL\)?\s+(\d+)")


class MissingBinaries(BackupFailed, FileNotFoundError):
    """No directory of PG_BIN_DIRS has the program needed: the message names it and what to do.
    A BackupFailed for the backup runs, an OSError (a program not found) for the restores."""


def listed_dirs() -> list[Path]:
    return [Path(os.path.normpath(d)) for d in settings.PG_BIN_DIRS]


def is_listed(path) -> bool:
    return Path(os.path.normpath(str(path))) in listed_dirs()


def missing_dirs() -> list[Path]:
    return [d for d in listed_dirs() if not d.is_dir()]


@functools.cache
def dir_major(path) -> int | None:
    """The major version of the binaries in `path`, asked of the programs themselves (cached:
    pg_config is a Perl wrapper on Debian). None when none of them answers."""
    for program in VERSION_PROGRAMS:
        exe = Path(path) / program
        if not os.access(exe, os.X_OK):
            continue
        try:
            out = subprocess.run(
                [str(exe), "--version"], capture_output=True, text=True, timeout=30, env=child_env(), cwd="/"
            )
        except (OSError, subprocess.SubprocessError):
            continue
        found = VERSION_LINE.search(out.stdout)
        if out.returncode == 0 and found:
            return int(found.group(1))
    return None


def usable_dirs() -> list[tuple[Path, int]]:
    """(directory, major) of every listed directory present whose version could be read, oldest first."""
    found = [(d, dir_major(str(d))) for d in listed_dirs() if d.is_dir()]
    return sorted(((d, m) for d, m in found if m is not None), key=lambda pair: pair[1])


def dir_choices():
    """The admin's choices for a server's directory: automatic, or one of PG_BIN_DIRS."""
    return [("", "Automatic: the server's major version, else the newest at least as new")] + [
        (str(d), f"{d} (PostgreSQL {m})") for d, m in usable_dirs()
    ]


def validate_bin_dir(value):
    """A server's pg_bin: empty, or one of PG_BIN_DIRS; never a path typed by a user."""
    if value and not is_listed(value):
        raise ValidationError(f"{value} is not in PG_BIN_DIRS ({_listed_text()}): choose one of those directories")


def server_major(server) -> int | None:
    return server.pg_version // 10000 if server.pg_version else None


def client_dir(server) -> Path:
    """Where the server's client tools come from: its own choice among PG_BIN_DIRS, else the
    directory of its major version, else the newest at least as new."""
    needed = server_major(server) or 0
    if server.pg_bin:
        return _chosen_dir(server, needed)
    candidates = [(d, m) for d, m in usable_dirs() if m >= needed]
    if not candidates:
        wanted = f"PostgreSQL {needed} or newer client tools" if needed else "PostgreSQL client tools"
        raise MissingBinaries(
            f"no {wanted} in PG_BIN_DIRS ({_listed_text()}): server {server.name} needs them; "
            "install them and list their bin directory in PG_BIN_DIRS"
        )
    exact = [d for d, m in candidates if m == needed]
    return exact[0] if exact else candidates[-1][0]


def _chosen_dir(server, needed):
    chosen = Path(os.path.normpath(server.pg_bin))
    if not is_listed(chosen):
        raise MissingBinaries(
            f"server {server.name} names {chosen} as its PostgreSQL bin directory, which is not in PG_BIN_DIRS "
            f"({_listed_text()}): choose one of those in the admin"
        )
    major = dir_major(str(chosen)) if chosen.is_dir() else None
    if major is None:
        raise MissingBinaries(f"{chosen} (server {server.name}'s choice) holds no PostgreSQL binaries: choose another")
    if major < needed:
        raise MissingBinaries(
            f"{chosen} holds PostgreSQL {major} tools, older than server {server.name}'s PostgreSQL {needed}: "
            f"choose a directory of {needed} or newer"
        )
    return chosen


def client_tool(server, name, dump_major=None) -> Path:
    """pg_dump, psql... for `server`, from client_dir(); pg_restore (into `server`, of a dump
    made by pg_dump `dump_major` when known) from restore_dir()."""
    if name not in CLIENT_TOOLS:
        raise ValueError(f"{name} is not a client tool: cluster_tool() chooses it by exact major version")
    directory = restore_dir(server, dump_major) if name == "pg_restore" else client_dir(server)
    return _program(directory, name, f"install it beside the others in {directory}")


def conninfo_dbname(name):
    """A connection string naming only the database `name`, quoted as libpq reads it.

    pg_dumpall (like every libpq tool) reads a database name holding '=' or starting with
    postgresql:// as a connection string: a database named `x host=elsewhere` would take the
    tool, and PGPASSWORD, to another server. A connection string's own dbname is never read
    again as one, and the host and port still come from the environment."""
    return make_conninfo(dbname=name)


def restore_dir(server, dump_major=None) -> Path:
    """Where pg_restore comes from to restore into `server` a dump made by pg_dump `dump_major`:
    client_dir() when it reads the dump (or the dump's version is not known), else the oldest
    listed that does. pg_restore reads archives of its own version and older only (15 refuses
    16's: "unsupported version (1.15) in file header"); the oldest that reads it is the closest
    to the server, for a newer pg_restore sends what older servers may not know (17 and later
    send SET transaction_timeout, an error on 16 and before)."""
    directory = client_dir(server)
    major = dir_major(str(directory))
    if dump_major is not None and major < dump_major:
        readers = [(d, m) for d, m in usable_dirs() if m >= dump_major]
        if not readers:
            raise MissingBinaries(
                f"no PostgreSQL {dump_major} or newer pg_restore in PG_BIN_DIRS ({_listed_text()}): the backup was made "
                f"by pg_dump {dump_major}; install PostgreSQL {dump_major} or newer client tools and list their bin directory"
            )
        directory, major = readers[0]
    target = server_major(server)
    if major >= 17 and target is not None and target < 17:
        # Measured: pg_restore 18 into a 15 server fails at once on SET transaction_timeout.
        if dump_major is not None and dump_major >= 17:
            raise MissingBinaries(
                f"a backup made by pg_dump {dump_major} cannot be restored into PostgreSQL {target}: only pg_restore "
                f"{major} or newer reads it, and it sets transaction_timeout, which {target} lacks; restore into a "
                "server of PostgreSQL 17 or newer"
            )
        raise MissingBinaries(
            f"pg_restore {major} ({directory}) cannot restore into PostgreSQL {target}: it sets transaction_timeout, "
            f"which {target} lacks; list PostgreSQL {target} client tools in PG_BIN_DIRS"
        )
    return directory


def cluster_tool(major, name, purpose) -> Path:
    """postgres, pg_ctl, pg_waldump... of exactly `major`; refused by name when none is listed."""
    if name not in CLUSTER_TOOLS:
        raise ValueError(f"{name} is not a program of a data directory: client_tool() chooses it")
    if major is None:
        raise MissingBinaries(f"the PostgreSQL version is unknown: {name} cannot be chosen for {purpose}")
    exact = [d for d, m in usable_dirs() if m == major]
    if not exact:
        raise MissingBinaries(
            f"no PostgreSQL {major} binaries in PG_BIN_DIRS ({_listed_text()}): {name} {major} is needed for "
            f"{purpose}; install PostgreSQL {major} and list its bin directory in PG_BIN_DIRS"
        )
    return _program(exact[0], name, f"install the PostgreSQL {major} server package")


def cluster_dir(major, purpose) -> Path:
    """The directory of exactly `major` (for code that names its programs itself: pg_waldump)."""
    return cluster_tool(major, "pg_waldump", purpose).parent


def backup_major(run) -> int | None:
    """The major version a backup was taken from: that of its server (recorded at registration
    and on every save of the server in the admin, which asks the server)."""
    return server_major(run.server)


def datadir_major(datadir) -> int | None:
    """A data directory's own major version (its PG_VERSION file), None when unreadable."""
    try:
        return int((Path(datadir) / "PG_VERSION").read_text().strip())
    except (OSError, ValueError):
        return None


def pg_ctl(datadir, *args, major=None):
    """pg_ctl ARGS on `datadir` as the database OS user, of the cluster's own major version (its
    PG_VERSION; else `major`, its server's): never whatever PG_BIN says, which may be another's."""
    major = datadir_major(datadir) or major
    if major is None:
        raise MissingBinaries(f"cannot tell which PostgreSQL version runs {datadir}: its PG_VERSION is unreadable")
    return osuser.pg_ctl(cluster_tool(major, "pg_ctl", f"the cluster in {datadir}"), datadir, *args)


def describe(server) -> str:
    """One line for checkserver and the server page: which directory runs what."""
    try:
        client = client_dir(server)
        text = f"client tools from {client} (PostgreSQL {dir_major(str(client))})"
    except MissingBinaries as e:
        text = f"no client tools: {e}"
    major = server_major(server)
    if major and not any(m == major for _, m in usable_dirs()):
        text += f"; no PostgreSQL {major} server binaries (pg_ctl, pg_waldump): restores into a new cluster are refused"
    return text


def warn_missing():
    """At startup: a directory listed but missing is skipped, and said so."""
    for directory in missing_dirs():
        log.warning("PG_BIN_DIRS lists %s, which does not exist: skipped", directory)


def _program(directory, name, todo):
    path = directory / name
    if not os.access(path, os.X_OK):
        raise MissingBinaries(f"{name} is not in {directory}: {todo}")
    return path


def _listed_text():
    return ":".join(str(d) for d in listed_dirs()) or "empty"
