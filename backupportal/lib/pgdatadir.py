"""The files of a throwaway cluster (tests, the demo, the benchmarks; see pgcluster): where the
binaries are (pg_bin), initdb into a template, copying it, and the settings file we own.

Standard library and nothing of Django, as pgcluster. Production never imports this: it
chooses binaries by version (backups.binaries) and runs programs through osuser.
"""

import functools
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from backupportal.lib.childenv import child_env
from backupportal.lib.osuser import DB_OS_USER, chown_to_db_user, run_as_db_user, unreachable_ancestor

#: Database superuser created by initdb.
SUPERUSER = "postgres"

#: Last resort when neither PG_BIN nor pg_config says where the binaries are.
DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")

#: Name of the settings file we own inside the data directory.
CONF_FILE = "pgcluster.conf"

# The include line appended to postgresql.conf; postgresql.auto.conf (ALTER SYSTEM,
# recovery settings written by restores) is read after it and still wins.
_INCLUDE_LINE = f"include_if_exists = '{CONF_FILE}'"

# pg_hba.conf for every cluster: see the module docstring.
_PG_HBA = f"""\
# Written by backupportal.lib.pgcluster (throwaway cluster).
# TYPE  DATABASE     USER      ADDRESS        METHOD
local   all          all                      trust
host    all          {SUPERUSER}  127.0.0.1/32   trust
host    replication  {SUPERUSER}  127.0.0.1/32   trust
host    all          all       127.0.0.1/32   scram-sha-256
host    replication  all       127.0.0.1/32   scram-sha-256
"""


class ClusterError(RuntimeError):
    """A cluster could not be created, started or stopped (message has the log tail)."""


def pg_bin() -> Path:
    """Directory of the PostgreSQL binaries.

    ``PG_BIN`` from the environment, else ``pg_config --bindir``, else
    :data:`DEFAULT_PG_BIN`. The environment is read on every call; the
    ``pg_config`` answer is cached (on Debian it is a Perl wrapper).
    """
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    return _pg_config_bindir() or DEFAULT_PG_BIN


@functools.cache
def _pg_config_bindir() -> Path | None:
    exe = shutil.which("pg_config")
    if not exe:
        return None
    try:
        # A clean environment: the portal's secrets are no business of pg_config.
        out = subprocess.run([exe, "--bindir"], capture_output=True, text=True, timeout=30, check=True, env=child_env())
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(out.stdout.strip())
    return path if path.is_dir() else None


def make_base_dir(parent, prefix: str) -> Path:
    """mkdtemp under ``parent`` (or the temp dir), owned by the db user."""
    parent_path = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    parent_path = parent_path.absolute()
    blocked = unreachable_ancestor(parent_path)
    if blocked is not None:
        raise ClusterError(
            f"the {DB_OS_USER!r} OS user cannot traverse {blocked} (mode "
            f"{stat.S_IMODE(blocked.stat().st_mode):o}), so it cannot reach {parent_path}; "
            "use base_dir=None or a directory it can reach (pytest's tmp_path is not one)"
        )
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent_path))
    chown_to_db_user(base)
    return base


@functools.cache
def initdb_locale() -> str:
    """``C.UTF-8`` when the system has it, else ``C`` (both sort bytewise)."""
    try:
        out = subprocess.run(["locale", "-a"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "C"
    names = {line.strip().lower().replace("-", "") for line in out.splitlines()}
    return "C.UTF-8" if "c.utf8" in names else "C"


def run(argv: list, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """run_as_db_user, its timeout a ClusterError. ``cwd`` must be a directory the db user can enter."""
    try:
        return run_as_db_user(argv, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{Path(argv[0]).name} did not finish within {timeout}s: {argv}") from exc


def render(value) -> str:
    """A Python value as a postgresql.conf value.

    bool -> on/off, int/float -> bare number, anything else -> a quoted string
    (``'`` doubled and ``\\`` escaped, as the config file parser reads them).
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace("'", "''")
    return f"'{text}'"


def initdb(datadir: Path, wal_segsize_mb: int, cwd: Path, bin_dir: Path | None = None) -> None:
    """initdb a new data directory with our pg_hba.conf and include line (``bin_dir``'s initdb, else pg_bin()'s)."""
    argv = [
        str(Path(bin_dir or pg_bin()) / "initdb"),
        "-D",
        str(datadir),
        "-U",
        SUPERUSER,
        "-E",
        "UTF8",
        f"--locale={initdb_locale()}",
        f"--wal-segsize={int(wal_segsize_mb)}",
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        # Skip initdb's final fsync: a throwaway cluster does not outlive a crash
        # of the machine. The server itself keeps fsync on.
        "--no-sync",
        "--no-instructions",
    ]
    proc = run(argv, cwd=cwd, timeout=300)
    if proc.returncode != 0:
        raise ClusterError(f"initdb failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()}")
    write_as_db_user(datadir / "pg_hba.conf", _PG_HBA, mode=0o600)
    ensure_include(datadir)


def copy_template(template: Path, datadir: Path) -> None:
    """Copy a stopped template data directory (modes kept), then chown it."""
    if not (template / "PG_VERSION").is_file():
        raise ClusterError(f"not a data directory: {template}")
    if (template / "postmaster.pid").exists():
        raise ClusterError(f"template {template} has a postmaster.pid: copying a running cluster corrupts it")
    shutil.copytree(template, datadir, symlinks=True)
    chown_to_db_user(datadir)


def ensure_include(datadir: Path) -> None:
    """Append the include line for our settings file to postgresql.conf once."""
    conf = datadir / "postgresql.conf"
    text = conf.read_text()
    if _INCLUDE_LINE not in text.splitlines():
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"\n# Settings managed by backupportal.lib.pgcluster\n{_INCLUDE_LINE}\n"
        write_as_db_user(conf, text, mode=0o600)


def write_as_db_user(path: Path, text: str, mode: int) -> None:
    """Replace a file atomically, owned by the db user."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    chown_to_db_user(tmp)
    os.replace(tmp, path)


# -------------------------------------------------------------------- processes


def process_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie.

    The postmaster is reparented to PID 1 after pg_ctl exits; in containers
    PID 1 may not reap, so an exited server can linger as a zombie.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    # Format: "pid (comm) state ..."; comm may contain spaces and parentheses.
    state = stat_line.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
