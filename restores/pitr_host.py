"""Production's settings in a PITR copy that only production's host can honour: sized or built
for it, they stop the copy starting on the portal's (each seen on 15 and 18).

A copy keeps production's postgresql.conf and postgresql.auto.conf (ALTER SYSTEM, which tuning
tools use), with what they include:

- include directives naming files outside the data directory, in any of those files: production's
  host had them, the backup does not, and this host's file of that name (if any) is not
  production's. A missing one stops the copy ("could not open configuration file"), another feeds
  it unrelated settings. They are commented out of the copy's files, each named in a warning.
- values this host refuses ("invalid value for parameter"): a locale or time zone it lacks, a
  stack deeper than its limit, a compression its build lacks (REFUSED), and io_method = io_uring
  on 18 built without liburing. No other setting can be read while one is there: they come first.
- shared memory sized for production's memory (shared_buffers, min_dynamic_shared_memory): more
  than this host can map fails ("could not map anonymous shared memory"). A copy recovers and
  answers a DBA's queries: it gets at most a quarter of this host's memory (COPY_SHARE). Read
  once pitr_libraries left only this host's libraries: postgres -C loads them for it.
- huge_pages = on, where this host reserved none: the same failure. The copy tries them.
- Unix-domain sockets in directories this host lacks (a layout of production's own), or for a
  group it does not have: "could not create any Unix-domain sockets". The copy's go where this
  host's PostgreSQL puts them by default, for the database OS user's group; the portal reaches
  the copy on 127.0.0.1 either way.

Each change is written after production's settings in postgresql.auto.conf, and said: a warning
where the copy runs otherwise than production would, a note where it makes no difference to it.
ALTER SYSTEM RESET gives production's value back where it fits.
"""

import grp
import os
import pwd
import re
import subprocess
from pathlib import Path

from django.template.defaultfilters import filesizeformat

from backupportal.lib.osuser import DB_OS_USER, read_as_db_user, run_as_db_user, write_as_db_user
from backups import binaries, walspool
from restores.pitr_libraries import asked, configured, split_list

COPY_SHARE = 4  # a copy's shared memory: at most this fraction (1/n) of the host's memory
MIB = 1 << 20
SMALLEST_BUFFERS = 128 * MIB  # initdb's default: never less, whatever the rest of the segment takes
SOCKET_PATH_MAX = 108  # sockaddr_un's sun_path on Linux, its terminating zero included


def _postgres(plan):
    try:
        return binaries.cluster_tool(binaries.backup_major(plan.base), "postgres", "reading the copy's settings")
    except binaries.MissingBinaries:
        return None  # the start says what is missing


def fit(plan):
    """Write what the copy needs to start on this host into its configuration; before
    pitr_libraries reads the copy's settings, which a refused value hides too. Shared memory is
    fitted after pitr_libraries (fit_shared_memory)."""
    leave_out_includes(plan)
    if (postgres := _postgres(plan)) is None:
        return
    _fit_refused(plan, postgres)
    if configured(postgres, plan.datadir, "huge_pages") == "on":
        _write(plan, {"huge_pages": "try"})
        plan.notes.append(
            "production's huge_pages = on would stop the copy where this host reserved none:"
            " the copy uses huge pages if there are (try)"
        )
    _fit_sockets(plan, postgres)


def fit_shared_memory(plan):
    """After pitr_libraries.leave_out_missing: shared_memory_size is computed at run time, and
    postgres -C loads shared_preload_libraries for it (their code runs): only this host's are left."""
    if (postgres := _postgres(plan)) is not None:
        _fit_shared_memory(plan, postgres)


# Settings whose value on production's host this one may refuse ("invalid value for parameter"),
# and the value the copy takes: each changes how the copy formats, logs, compresses or reads its
# files, never which data it holds. io_uring needs a build with liburing (18).
REFUSED = {
    "io_method": "worker",
    "lc_monetary": "C",
    "lc_numeric": "C",
    "lc_time": "C",
    "timezone": "UTC",
    "log_timezone": "UTC",
    "max_stack_depth": "2MB",
    "wal_compression": "off",
    "default_toast_compression": "pglz",
}


def _fit_refused(plan, postgres):
    done = asked(postgres, plan.datadir, "port", "-c", "lc_messages=C")  # C: the messages read below
    if done is None or done.returncode == 0:
        return
    refused = {}
    for m in re.finditer(r'invalid value for parameter "(\w+)": "?([^"\n]*)"?', done.stderr):
        name = m.group(1)
        if name.lower() in REFUSED:
            refused[name] = m.group(2) + ("kB" if name.lower() == "max_stack_depth" else "")
    if not refused:
        return  # the start says what else is wrong
    _write(plan, {name: REFUSED[name.lower()] for name in refused})
    plan.warnings.append(
        "production's "
        + ", ".join(f"{name} = {walspool.conf_quote(value)}" for name, value in refused.items())
        + f" {'is' if len(refused) == 1 else 'are'} refused by this host's PostgreSQL (a locale, time zone,"
        " stack limit, I/O method or compression it lacks): the copy runs with "
        + ", ".join(f"{name} = {REFUSED[name.lower()]}" for name in refused)
        + "; where it needs production's, give this host what it lacks and ALTER SYSTEM RESET it there"
    )


def _fit_shared_memory(plan, postgres):
    segment = _number(configured(postgres, plan.datadir, "shared_memory_size"))  # MB, all of it
    dynamic = _number(configured(postgres, plan.datadir, "min_dynamic_shared_memory"))  # MB, inside segment
    if segment is None or dynamic is None:
        return
    memory = host_memory()
    share = memory // COPY_SHARE
    wanted = segment * MIB
    if wanted <= share:
        return
    blocks = _number(configured(postgres, plan.datadir, "shared_buffers"))
    block_size = _number(configured(postgres, plan.datadir, "block_size"))
    if blocks is None or block_size is None:
        return
    buffers = blocks * block_size
    rest = wanted - buffers - dynamic * MIB  # locks, connections, WAL buffers; dynamic is made 0 below
    fitted = max(SMALLEST_BUFFERS, (share - rest) // MIB * MIB)
    changes = {"shared_buffers": f"{fitted // MIB}MB"} if fitted < buffers else {}
    if dynamic:
        changes["min_dynamic_shared_memory"] = "0"
    if not changes:
        return
    _write(plan, changes)
    plan.warnings.append(
        f"production's shared memory ({filesizeformat(wanted)}) is more than a copy may take of this host's"
        f" {filesizeformat(memory)} (a {'quarter' if COPY_SHARE == 4 else f'1/{COPY_SHARE}'}): the copy runs with "
        + " and ".join(f"{name} = {value}" for name, value in changes.items())
        + "; ALTER SYSTEM RESET each where production's fits"
    )


# An include line of a configuration file (guc-file.l: the '=' is optional, a simple value unquoted).
INCLUDE = re.compile(
    rb"^[ \t\r]*(include_dir|include_if_exists|include)\b[ \t\r]*=?[ \t\r]*('(?:[^'\\\n]|''|\\.)*'|[^\s#']+)",
    re.IGNORECASE,
)
LEFT_OUT = b"# left out by backupportal's PITR restore, a file of production's host: "


def deescape(quoted):
    """A quoted value as PostgreSQL reads it (DeescapeQuotedString): \b \f \n \r \t, up to
    three octal digits, any other escaped character itself, '' a quote."""
    out, i, body = bytearray(), 0, quoted[1:-1]
    while i < len(body):
        c = body[i : i + 1]
        if c == b"\\" and i + 1 < len(body):
            i += 1
            c = body[i : i + 1]
            if c in b"01234567":  # never empty: a backslash is followed by one more byte here
                digits = re.match(rb"[0-7]{1,3}", body[i : i + 3]).group()
                out.append(int(digits, 8) & 0xFF)
                i += len(digits)
                continue
            out += {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t"}.get(c, c)
        elif c == b"'" and body[i + 1 : i + 2] == b"'":
            out += b"'"
            i += 1
        else:
            out += c
        i += 1
    return bytes(out)


def leave_out_includes(plan):
    """Comment out of the copy's configuration files (postgresql.conf, postgresql.auto.conf and
    every file they include from the data directory, as deep as they go) every include of a file
    or directory outside the data directory (production's files of its own host). A relative
    name is relative to the including file's directory, as PostgreSQL reads it."""
    home, left_out, seen = plan.datadir.resolve(), [], set()
    todo = [plan.datadir / "postgresql.conf", plan.datadir / "postgresql.auto.conf"]
    while todo:
        conf = todo.pop(0)
        real = conf.resolve() if _inside(conf, home) else None
        if real is None or real in seen or not real.is_file():
            continue
        seen.add(real)
        try:
            lines = read_as_db_user(conf).split(b"\n")  # PostgreSQL's only line break; as the files' owner
        except OSError:
            continue
        changed = False
        for i, line in enumerate(lines):
            m = INCLUDE.match(line)
            if m is None:
                continue
            raw = m.group(2)
            value = os.fsdecode(deescape(raw) if raw.startswith(b"'") else raw).split("\0", 1)[0]  # C's end
            place = conf.parent / value  # an absolute value replaces the directory
            if _inside(place, home):
                if m.group(1).lower() == b"include_dir":
                    if place.is_dir():
                        todo += sorted(p for p in place.iterdir() if p.name.endswith(".conf") and p.name[0] != ".")
                else:
                    todo.append(place)
                continue
            lines[i], changed = LEFT_OUT + line, True
            where = conf.relative_to(plan.datadir) if conf.is_relative_to(plan.datadir) else conf
            left_out.append(f"{m.group(1).decode().lower()} {walspool.conf_quote(value)} (in {where})")
        if changed:
            write_as_db_user(conf, b"\n".join(lines))  # the data directory's files: as its owner
    if left_out:
        plan.warnings.append(
            f"production's configuration names {', '.join(left_out)}, outside its data directory: not in the"
            " backup, and this host's file of that name is not production's; left out of the copy, whose"
            " settings there are PostgreSQL's defaults or those of production's other files (where the copy"
            " needs them, copy the file into its data directory and include it from there)"
        )


def _inside(place, home):
    """Whether `place` is inside the data directory `home`; a name that cannot be resolved (a
    symbolic link loop) is not."""
    try:
        return place.resolve().is_relative_to(home)
    except (ValueError, RuntimeError, OSError):
        return False


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
    made = ", ".join(f"{name} = {walspool.conf_quote(value)}" for name, value in changes.items())
    plan.notes.append(
        "production's Unix-domain sockets cannot be made on this host ("
        + ", ".join(f"{name} = {walspool.conf_quote(production[name])}" for name in changes)
        + (
            f"): the copy's are made with {made}"
            if changes.get("unix_socket_directories", True)
            else f"): the copy has none ({made}); connect to it on 127.0.0.1 port {plan.port}"
        )
    )


def _is_group(name):
    """Whether the database OS user is in group `name` (or group id): the server gives its
    sockets to it, which only a member may."""
    try:
        gid = int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
        user = pwd.getpwnam(DB_OS_USER)
    except (KeyError, ValueError):
        return False
    return gid in os.getgrouplist(DB_OS_USER, user.pw_gid)


def _writable(directory):
    """Whether the database OS user can make a socket in `directory`: an abstract one (@name,
    Linux) needs none; a relative one is in the data directory (production's files, not used
    here); a path too long for a socket's name fails as a missing one does."""
    if directory.startswith("@"):
        return True
    if not directory.startswith("/") or len(directory) + len("/.s.PGSQL.65535") >= SOCKET_PATH_MAX:
        return False
    done = _as_db_user(["test", "-d", directory, "-a", "-w", directory])
    return done is not None and done.returncode == 0


def _default(postgres, name):
    """The built-in default of a setting, as this host's PostgreSQL was built (postgres --describe-config)."""
    done = _as_db_user([postgres, "--describe-config"])
    for line in done.stdout.splitlines() if done is not None else []:
        fields = line.split("\t")
        if fields[0] == name and len(fields) > 4:
            return fields[4]
    return None


def host_memory(cgroups=Path("/proc/self/cgroup"), mounts=Path("/sys/fs/cgroup")):
    """Bytes of memory on this host, or less where this process's control group (v1 or v2, its own
    or a parent's, as a container or systemd's MemoryMax= sets it) is limited to less: the copy
    runs in the portal's."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2, mounted alone or beside v1 (unified)
            places, name = [mounts, mounts / "unified"], "memory.max"
        elif "memory" in controllers.split(","):
            places, name = [mounts / "memory"], "memory.limit_in_bytes"
        else:
            continue
        for place in places:
            directory = place / path.lstrip("/")
            for level in (directory, *directory.parents):
                limits.append(_limit(level / name))
                if level == place:
                    break
    return min(limit for limit in limits if limit is not None)


def _limit(path):
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return int(value) if value.isdigit() else None  # "max": none


def _write(plan, changes):
    lines = ["# production's value does not fit this host: written by backupportal's PITR restore\n"]
    lines += [f"{name} = {walspool.conf_quote(value)}\n" for name, value in changes.items()]
    write_as_db_user(plan.datadir / "postgresql.auto.conf", "".join(lines).encode(), append=True)


def _as_db_user(argv):
    try:
        return run_as_db_user(argv, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None


def _number(value):
    return int(value) if value is not None and value.isdigit() else None
