"""Production's libraries in a PITR copy: the copy must start here, and run nothing of them.

A copy keeps production's postgresql.conf and postgresql.auto.conf, and with them the libraries
production loads. Two things go wrong with that:

- A library this host's PostgreSQL lacks (production had an extension installed that the
  restore host has not) stops the copy at start-up when shared_preload_libraries names it, and
  refuses every connection when session_ or local_preload_libraries does. Such a library is
  left out of the copy's list, with a warning naming it (`leave_out_missing`).
- A library that is installed here starts production's background workers in the copy:
  pglogical's apply workers consume production's slots, Citus's maintenance daemon commits or
  aborts prepared transactions on production's worker nodes, a scheduler runs production's jobs
  a second time. recovery_settings writes max_worker_processes = 0 (WORKERS_NOTE), so no
  background worker starts: libraries still load, their functions and types work.
"""

import subprocess
from pathlib import Path

from backupportal.lib.osuser import run_as_db_user
from backups import binaries, walspool

PRELOAD_LISTS = ("shared_preload_libraries", "session_preload_libraries", "local_preload_libraries")
WORKERS_NOTE = (
    "max_worker_processes = 0 stays in the restored cluster's postgresql.auto.conf: no background worker"
    " of production's libraries (pglogical, Citus, pg_cron, a scheduler) runs in the copy, and queries"
    " run without parallel workers (hot_standby = off stays too: recovery took no connections); once nothing"
    " there can reach production, ALTER SYSTEM RESET max_worker_processes and restart"
)
# Every PostgreSQL's $libdir holds PL/pgSQL: how a candidate directory is recognised.
SENTINEL = "plpgsql"
SUFFIXES = ("", ".so", ".dylib")


def leave_out_missing(plan):
    """Each library production's *_preload_libraries names that this host's PostgreSQL of the
    backup's version does not have is left out of the copy's list, in postgresql.auto.conf
    after production's settings; plan.warnings names each. Nothing is changed when the effective
    settings or $libdir cannot be read: the copy then starts as production's files say."""
    try:
        postgres = binaries.cluster_tool(binaries.backup_major(plan.base), "postgres", "reading the copy's settings")
    except binaries.MissingBinaries:
        return
    libdir = library_dir(postgres)
    search = configured(postgres, plan.datadir, "dynamic_library_path")
    if libdir is None or search is None:
        return
    directories = [Path(entry.replace("$libdir", str(libdir))) for entry in search.split(":") if entry]
    written = []
    for setting in PRELOAD_LISTS:
        names = split_list(configured(postgres, plan.datadir, setting) or "")
        if setting == "local_preload_libraries":
            missing = [name for name in names if not installed_plugin(name, libdir)]
        else:
            missing = [name for name in names if not installed(name, libdir, directories)]
        if not missing:
            continue
        kept = [name for name in names if name not in missing]
        written.append(f"{setting} = {walspool.conf_quote(', '.join(quote_name(name) for name in kept))}")
        plan.warnings.append(
            f"{setting} named {', '.join(map(quote_name, missing))}, which this host's PostgreSQL does not have ({libdir}):"
            f" left out of the copy's list, so that it {'starts' if setting == PRELOAD_LISTS[0] else 'takes connections'};"
            " what needs it (its functions, types and hooks) fails there until it is installed and listed again"
        )
    if written:
        with open(plan.datadir / "postgresql.auto.conf", "a") as conf:
            conf.write("# libraries this host lacks, left out by backupportal's PITR restore\n")
            conf.write("\n".join(written) + "\n")


def configured(postgres, datadir, name):
    """The setting as the copy would start with it (postgres -C reads every configuration file,
    includes too, and loads no library); None when postgres cannot tell."""
    try:
        done = run_as_db_user([postgres, "-D", datadir, "-C", name], timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def library_dir(postgres):
    """$libdir of the installation `postgres` belongs to: PostgreSQL finds it relative to its own
    program, lib/postgresql or lib beside bin (Debian's, the PyPI build's). None when neither
    holds PL/pgSQL."""
    prefix = Path(postgres).resolve().parent.parent
    for candidate in (prefix / "lib" / "postgresql", prefix / "lib"):
        if installed(SENTINEL, candidate, [candidate]):
            return candidate
    return None


def installed(name, libdir, directories):
    """Whether PostgreSQL would find library `name` (dfmgr.c: a bare name is looked for along
    dynamic_library_path, with and without the platform's suffix; $libdir/ stands for libdir)."""
    if name.startswith("$libdir/"):
        name = str(libdir) + name[len("$libdir") :]
    places = [Path(name)] if "/" in name else [directory / name for directory in directories]
    return any(Path(f"{place}{suffix}").is_file() for place in places for suffix in SUFFIXES)


def installed_plugin(name, libdir):
    """local_preload_libraries (any user may set it) loads from $libdir/plugins only: a bare name
    is looked for there, and any other path is refused (dfmgr.c, restricted)."""
    if name.startswith("$libdir/plugins/"):
        name = name[len("$libdir/plugins/") :]
    return "/" not in name and installed(name, libdir, [Path(libdir) / "plugins"])


def split_list(value):
    """The names of a library list as PostgreSQL splits it (SplitDirectoriesString): commas,
    blanks around names, a name in double quotes kept whole and "" in it a quote."""
    names, current, quoted, i = [], "", False, 0
    while i < len(value):
        char = value[i]
        if char == '"' and quoted and value[i + 1 : i + 2] == '"':
            current, i = current + '"', i + 1
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            names, current = [*names, current.strip()], ""
        else:
            current += char
        i += 1
    return [name for name in [*names, current.strip()] if name]


def quote_name(name):
    """A name as a list element: in double quotes when it holds what the list syntax splits on."""
    return '"' + name.replace('"', '""') + '"' if any(char in name for char in ', "\t') else name
