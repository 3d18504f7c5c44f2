"""Production's memory and I/O settings in a PITR copy: sized or built for production's host,
they can stop the copy starting on the portal's.

A copy keeps production's postgresql.conf and postgresql.auto.conf (ALTER SYSTEM, which tuning
tools use). Three kinds of setting stop it at start-up where the host differs (seen on 15 and 18):

- shared memory sized for production's memory (shared_buffers, min_dynamic_shared_memory): more
  than this host can map fails ("could not map anonymous shared memory"). A copy recovers and
  answers a DBA's queries: it gets at most a quarter of this host's memory (COPY_SHARE).
- huge_pages = on, where this host reserved none: the same failure. The copy tries them.
- io_method = io_uring (18), where this host's PostgreSQL was built without liburing: "invalid
  value", and no other setting can be read either. The copy uses worker, PostgreSQL's default.
- Unix-domain sockets in directories this host lacks (a layout of production's own), or for a
  group it does not have: "could not create any Unix-domain sockets". The copy's go where this
  host's PostgreSQL puts them by default, for the database OS user's group; the portal reaches
  the copy on 127.0.0.1 either way.

- include directives naming files outside the data directory: production's host had them, the
  backup does not, and this host's file of that name (if any) is not production's: a missing one
  stops the copy ("could not open configuration file"), another feeds it unrelated settings.
  They are commented out of the copy's postgresql.conf, each named in a warning.

Each change is written after production's settings in postgresql.auto.conf, and said: a warning
where the copy runs otherwise than production would, a note for huge pages (try uses them when
there are). ALTER SYSTEM RESET gives production's value back where it fits.
"""

import grp
import os
import re
from pathlib import Path

from backupportal.lib.osuser import run_as_db_user
from backups import binaries, walspool
from restores.pitr_libraries import configured, split_list

COPY_SHARE = 4  # a copy's shared memory: at most this fraction (1/n) of the host's memory
MIB = 1 << 20
SMALLEST_BUFFERS = 128 * MIB
SOCKET_PATH_MAX = 108  # sockaddr_un's sun_path on Linux, its terminating zero included  # initdb's default: never less, whatever the rest of the segment takes


def fit(plan):
    """Write what the copy needs to start on this host into postgresql.auto.conf; before
    pitr_libraries reads the copy's settings, which an io_method this host lacks hides too."""
    leave_out_includes(plan)
    major = binaries.backup_major(plan.base)
    try:
        postgres = binaries.cluster_tool(major, "postgres", "reading the copy's settings")
    except binaries.MissingBinaries:
        return  # the start says what is missing
    huge_pages = configured(postgres, plan.datadir, "huge_pages")
    if huge_pages is None and major >= 18:
        if not _write_if_it_reads(plan, postgres, "io_method", "worker"):
            return  # another error in production's files: the start says which
        plan.warnings.append(
            "production's io_method is one this host's PostgreSQL does not offer (io_uring needs a build with"
            " liburing): the copy uses worker, PostgreSQL's default"
        )
        huge_pages = configured(postgres, plan.datadir, "huge_pages")
    if huge_pages == "on":
        _write(plan, {"huge_pages": "try"})
        plan.notes.append(
            "production's huge_pages = on would stop the copy where this host reserved none:"
            " the copy uses huge pages if there are (try)"
        )
    _fit_shared_memory(plan, postgres)
    _fit_sockets(plan, postgres)


def _fit_shared_memory(plan, postgres):
    segment = _number(configured(postgres, plan.datadir, "shared_memory_size"))  # MB, all of it
    dynamic = _number(configured(postgres, plan.datadir, "min_dynamic_shared_memory"))  # MB
    if segment is None or dynamic is None:
        return
    memory = host_memory()
    share = memory // COPY_SHARE
    wanted = (segment + dynamic) * MIB
    if wanted <= share:
        return
    blocks = _number(configured(postgres, plan.datadir, "shared_buffers"))
    block_size = _number(configured(postgres, plan.datadir, "block_size"))
    if blocks is None or block_size is None:
        return
    buffers = blocks * block_size
    rest = segment * MIB - buffers  # locks, connections, WAL buffers: sized by settings recovery needs
    fitted = max(SMALLEST_BUFFERS, (share - rest) // MIB * MIB)
    changes = {"shared_buffers": f"{fitted // MIB}MB"} if fitted < buffers else {}
    if dynamic:
        changes["min_dynamic_shared_memory"] = "0"
    if not changes:
        return
    _write(plan, changes)
    plan.warnings.append(
        f"production's shared memory ({_size(wanted)}) is more than a copy may take of this host's"
        f" {_size(memory)} (a {'quarter' if COPY_SHARE == 4 else f'1/{COPY_SHARE}'}): the copy runs with "
        + " and ".join(f"{name} = {value}" for name, value in changes.items())
        + "; ALTER SYSTEM RESET each where production's fits"
    )


# An include line of postgresql.conf (guc-file.l: the '=' is optional, a simple value unquoted).
INCLUDE = re.compile(
    r"^\s*(include_dir|include_if_exists|include)\b\s*=?\s*('(?:[^'\\]|''|\\.)*'|[^\s#']+)", re.IGNORECASE
)


def leave_out_includes(plan):
    """Comment out of the copy's postgresql.conf every include of a file or directory outside
    its data directory (production's files of its own host)."""
    conf = plan.datadir / "postgresql.conf"
    try:
        lines = conf.read_text(errors="surrogateescape").splitlines(keepends=True)
    except OSError:
        return
    home, left_out = plan.datadir.resolve(), []
    for i, line in enumerate(lines):
        m = INCLUDE.match(line)
        if m is None:
            continue
        value = m.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1].replace("''", "'"))
        if (plan.datadir / value).resolve().is_relative_to(home):  # an absolute value replaces the datadir
            continue
        lines[i] = f"# left out by backupportal's PITR restore, a file of production's host: {line}"
        left_out.append(f"{m.group(1).lower()} {walspool.conf_quote(value)}")
    if left_out:
        conf.write_text("".join(lines), errors="surrogateescape")
        plan.warnings.append(
            f"production's postgresql.conf names {', '.join(left_out)}, outside its data directory: not in the"
            " backup, and this host's file of that name is not production's; left out of the copy, whose"
            " settings there are PostgreSQL's defaults or production's postgresql.auto.conf"
        )


def _fit_sockets(plan, postgres):
    changes = {}
    group = configured(postgres, plan.datadir, "unix_socket_group")
    if group and not _is_group(group):
        changes["unix_socket_group"] = ""
    directories = configured(postgres, plan.datadir, "unix_socket_directories")
    if directories and not any(map(_writable, split_list(directories))):
        default = _default(postgres, "unix_socket_directories")
        changes["unix_socket_directories"] = default if default and _writable(default) else ""
    if not changes:
        return
    _write(plan, changes)
    production = {"unix_socket_group": group, "unix_socket_directories": directories}
    plan.notes.append(
        "production's Unix-domain sockets cannot be made on this host ("
        + ", ".join(f"{name} = {walspool.conf_quote(production[name])}" for name in changes)
        + "): the copy's are made with "
        + ", ".join(f"{name} = {walspool.conf_quote(value)}" for name, value in changes.items())
    )


def _is_group(name):
    try:
        grp.getgrnam(name)
    except KeyError:
        return name.isdigit()  # PostgreSQL takes a group id too
    return True


def _writable(directory):
    """Whether the database OS user can make a socket in `directory`: an abstract one (@name,
    Linux) needs none; a relative one is in the data directory (production's files, not used
    here); a path too long for a socket's name fails as a missing one does."""
    if directory.startswith("@"):
        return True
    if not directory.startswith("/") or len(directory) + len("/.s.PGSQL.65535") >= SOCKET_PATH_MAX:
        return False
    return run_as_db_user(["test", "-d", directory, "-a", "-w", directory], timeout=30).returncode == 0


def _default(postgres, name):
    """The built-in default of a setting, as this host's PostgreSQL was built (postgres --describe-config)."""
    done = run_as_db_user([postgres, "--describe-config"], timeout=60)
    for line in done.stdout.splitlines():
        fields = line.split("\t")
        if fields[0] == name and len(fields) > 4:
            return fields[4]
    return None


def host_memory():
    """Bytes of memory on this host, or the container's limit (cgroup v2) when lower."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return memory
    return min(memory, int(limit)) if limit.isdigit() else memory


def _write_if_it_reads(plan, postgres, name, value):
    """Write `name = value`; kept only if the copy's settings can be read with it."""
    conf = plan.datadir / "postgresql.auto.conf"
    before = conf.read_bytes()
    _write(plan, {name: value})
    if configured(postgres, plan.datadir, name) == value:
        return True
    conf.write_bytes(before)
    return False


def _write(plan, changes):
    with open(plan.datadir / "postgresql.auto.conf", "a") as conf:
        conf.write("# production's value does not fit this host: written by backupportal's PITR restore\n")
        conf.write("".join(f"{name} = {walspool.conf_quote(value)}\n" for name, value in changes.items()))


def _number(value):
    return int(value) if value is not None and value.isdigit() else None


def _size(nbytes):
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes / MIB:.0f} MB"
