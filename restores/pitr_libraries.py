"""Production's libraries in a PITR copy: the copy must start here, and run nothing of them.

A copy keeps production's postgresql.conf and postgresql.auto.conf, and with them the libraries
production loads. Three things go wrong with that:

- A library this host's PostgreSQL lacks (production had an extension installed that the
  restore host has not) stops the copy at start-up when shared_preload_libraries names it, and
  refuses every connection when session_ or local_preload_libraries does.
- A library named by a path outside this host's $libdir ('./evil', a file a production
  superuser wrote into the data directory) would run production's code on the portal's host.
  Both kinds are left out of the copy's list, with a warning naming each (`leave_out_missing`);
  recovery_settings sets dynamic_library_path to $libdir, so a bare name is found there only.
- A library that is installed here starts production's background workers in the copy:
  pglogical's apply workers consume production's slots, Citus's maintenance daemon commits or
  aborts prepared transactions on production's worker nodes, a scheduler runs production's jobs
  a second time. recovery_settings writes max_worker_processes = 0 (WORKERS_NOTE), so no
  background worker starts: libraries still load, their functions and types work.
"""

import subprocess
from pathlib import Path

from backupportal.lib.osuser import run_as_db_user, write_as_db_user
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
    """Each library production's *_preload_libraries names that is not in this host's $libdir
    for the backup's version is left out of the copy's list, in postgresql.auto.conf after
    production's settings; plan.warnings names each. A missing one would stop the copy (or
    refuse its connections); one named by a path elsewhere (./evil.so in the data directory,
    which a production superuser can write) would run production's code on the portal's host.
    When $libdir or a list cannot be read, that list is emptied."""
    try:
        postgres = binaries.cluster_tool(binaries.backup_major(plan.base), "postgres", "reading the copy's settings")
        libdir = library_dir(postgres)
    except binaries.MissingBinaries:
        postgres = libdir = None
    written = []
    for setting in PRELOAD_LISTS:
        listed = configured(postgres, plan.datadir, setting) if libdir is not None else None
        if listed is None:
            kept, missing = [], ["(the list could not be read)"]
        else:
            plugins = setting == "local_preload_libraries"  # loaded from $libdir/plugins only
            names = split_list(listed)
            kept = [name for name in names if in_libdir(name, libdir, plugins)]
            missing = [name for name in names if name not in kept]
        if not missing:
            continue
        written.append(f"{setting} = {walspool.conf_quote(', '.join(quote_name(name) for name in kept))}")
        plan.warnings.append(
            f"{setting} named {', '.join(map(quote_name, missing))}, which this host's PostgreSQL does not have"
            f" in {libdir or '$libdir'}: left out of the copy's list, so that it"
            f" {'starts' if setting == PRELOAD_LISTS[0] else 'takes connections'} and runs no code from elsewhere;"
            " what needs it (its functions, types and hooks) fails there until it is installed and listed again"
        )
    if written:
        note = "# libraries not in this host's $libdir, left out by backupportal's PITR restore\n"
        write_as_db_user(
            plan.datadir / "postgresql.auto.conf", (note + "\n".join(written) + "\n").encode(), append=True
        )


def configured(postgres, datadir, name):
    """The setting as the copy would start with it (postgres -C reads every configuration file,
    includes too); None when postgres cannot tell."""
    done = asked(postgres, datadir, name)
    return done.stdout.strip() if done is not None and done.returncode == 0 else None


def asked(postgres, datadir, name, *options):
    """postgres -C `name` of the copy (`options`: more -c), its run; None when it could not run.
    Its own data directory whatever production's postgresql.conf says (data_directory:
    postgresql.auto.conf is read from there), as at the start (pitr_recovery.own_files). A
    runtime-computed setting (shared_memory_size) loads shared_preload_libraries first: read it
    only once leave_out_missing left this host's alone."""
    argv = [postgres, "-D", datadir, "-c", f"data_directory={datadir}", *options, "-C", name]
    try:
        return run_as_db_user(argv, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None


def library_dir(postgres):
    """$libdir of the installation `postgres` belongs to: PostgreSQL finds it relative to its own
    program, lib/postgresql or lib beside bin (Debian's, the PyPI build's). None when neither
    holds PL/pgSQL."""
    prefix = Path(postgres).resolve().parent.parent
    for candidate in (prefix / "lib" / "postgresql", prefix / "lib"):
        if installed(SENTINEL, candidate):
            return candidate
    return None


def installed(name, libdir):
    """Whether `name` is a library in `libdir`, as PostgreSQL names one: bare (with or without the
    platform's suffix), "$libdir/name", or a path whose real place is inside `libdir`."""
    if name.startswith("$libdir/"):
        name = str(libdir) + name[len("$libdir") :]
    place = Path(name) if "/" in name else Path(libdir) / name
    if not place.is_absolute():
        return False  # relative to the data directory: production's files, not this host's
    home = Path(libdir).resolve()
    for suffix in SUFFIXES:
        found = Path(f"{place}{suffix}")
        if found.is_file() and found.resolve().is_relative_to(home):
            return True
    return False


def in_libdir(name, libdir, plugins=False):
    """installed(), for a list's entry; local_preload_libraries (any user may set it) loads
    from $libdir/plugins only, and refuses any other path (dfmgr.c, restricted)."""
    if not plugins:
        return installed(name, libdir)
    if name.startswith("$libdir/plugins/"):
        name = name[len("$libdir/plugins/") :]
    return "/" not in name and installed(name, Path(libdir) / "plugins")


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
