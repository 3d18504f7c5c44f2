"""The WAL spool on the database host, and the archive command that fills it.

Segments reach the spool (WAL_SPOOL/<server>/) from the archive program (push) or from
pg_receivewal (pull). This module sets a spool up for either, installs the archive program
(backups/archive_wal.py) where the database server's user can run it, gives the
postgresql.conf lines that call it, and publishes the server's wal_segment_size into the
spool for the program, which has no database.
"""

import grp
import json
import os
import pwd
import shlex
import shutil
import stat
import time
from datetime import timedelta
from pathlib import Path

import psycopg
from django.conf import settings

from backupportal.lib.pgerrors import explain
from backups import archive_wal
from backups.models import Server
from backups.walnames import WalError

PROGRAM_NAME = "archive_wal.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def spool_root() -> Path:
    return Path(settings.WAL_SPOOL)


def spool_dir(server) -> Path:
    return spool_root() / server.name


def program_path() -> Path:
    return spool_root() / PROGRAM_NAME


def segment_size(server, conn=None) -> int:
    """wal_segment_size in bytes, read from the server once and kept on the row."""
    if server.wal_segment_size:
        return server.wal_segment_size
    try:
        if conn is None:
            with server.connect() as own:
                size = read_segment_size(own)
        else:
            size = read_segment_size(conn)
    except psycopg.Error as e:
        raise WalError(explain(e, server)) from None
    Server.objects.filter(pk=server.pk).update(wal_segment_size=size)
    server.wal_segment_size = size
    publish_segment_size(server)
    return size


def read_segment_size(conn) -> int:
    # pg_settings reports it in bytes (unit B) on PostgreSQL 11 and newer.
    return int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'").fetchone()[0])


def publish_segment_size(server):
    """SPOOL/segment_size for the archive program, which has no database: it refuses a segment
    of another size (truncated) while PostgreSQL still has the whole one. Atomic, 0640 (postgres
    reads it through the spool's group); rewritten only when missing or different."""
    spool = spool_dir(server)
    if not server.wal_segment_size or not spool.is_dir():
        return
    path = spool / archive_wal.SIZE_FILE
    text = f"{server.wal_segment_size}\n"
    try:
        if path.read_text() == text:
            return
    except (OSError, ValueError):
        pass
    tmp = spool / f".{archive_wal.SIZE_FILE}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a spool the portal cannot write fails its ingest, which says so; ingest checks sizes anyway


def prepare_pull_spool(server) -> Path:
    """pg_receivewal runs as the portal's own user: its directory is private."""
    spool = spool_dir(server)
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(spool, 0o700)
    (spool / "ingested").mkdir(exist_ok=True, mode=0o700)
    return spool


def db_user_ids(db_user):
    try:
        pw = pwd.getpwnam(db_user)
    except KeyError:
        raise WalError(f"there is no OS user {db_user!r} on this host: give the database server's user") from None
    return pw.pw_uid, pw.pw_gid


def unreachable_by(path: Path, uid: int, gid: int):
    """The first of `path` and its parents that the user cannot traverse, or None."""
    groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    for p in (path, *path.parents):
        st = p.stat()
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH
        if uid != 0 and not st.st_mode & bit:
            return p
    return None


def _make_dir(path: Path, mode: int, owner_uid=None, gid=None):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and owner_uid is not None:
        os.chown(path, owner_uid, gid)
    elif gid is not None and os.stat(path).st_gid != gid:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise WalError(
                f"cannot give {path} to group {grp.getgrgid(gid).gr_name}: add the portal's service user "
                f"to that group (usermod -aG {grp.getgrgid(gid).gr_name} USER)"
            ) from None
    os.chmod(path, mode)


def prepare_push_spool(server, db_user="postgres") -> Path:
    """The server's spool and the archive program, installed where `db_user` can use them.

    The spool belongs to the database server's user and group (setgid, 2770): postgres writes
    segments, the portal (root, or a member of that group) reads and removes them. Nobody
    else can read WAL. The program is copied out of the portal's checkout (which may be under
    /root, unreadable to postgres) next to the spool.
    """
    uid, gid = db_user_ids(db_user)
    root = spool_root()
    _make_dir(root, 0o755)
    blocked = unreachable_by(root, uid, gid)
    if blocked is not None:
        raise WalError(
            f"the {db_user} user cannot reach {root} ({blocked} is closed to it): "
            "set WAL_SPOOL to a directory it can traverse, such as /var/lib/backupportal/walspool"
        )
    install_program()
    spool = spool_dir(server)
    _make_dir(spool, 0o2770, uid, gid)
    _make_dir(spool / "errors", 0o2770, uid, gid)
    _make_dir(spool / "ahead", 0o2770, uid, gid)
    _make_dir(spool / "ingested", 0o2750, None, gid)
    publish_segment_size(server)
    return spool


def install_program() -> Path:
    """Copy archive_wal.py next to the spool (atomically; readable, never writable, by others)."""
    source = Path(__file__).with_name(PROGRAM_NAME)
    target = program_path()
    if target.exists() and target.read_bytes() == source.read_bytes():
        return target
    tmp = target.with_name(f".{PROGRAM_NAME}.tmp")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def archive_command(server) -> str:
    """The archive_command line.

    A segment the program copied ahead during an earlier call (in the spool, fsynced, then
    marked by SPOOL/ahead/NAME) is acknowledged by the shell alone when that marker is newer
    than %p: %p was not written after the copy was durable. `test` is a builtin of every
    /bin/sh, so such a segment costs no process at all (it cost cmp reading both files and a
    sync before). Anything else goes to the program, which alone decides (conflicts, sizes,
    error markers): the system Python, an empty environment, no site packages.
    """
    program, spool = _command_paths(server)
    already = f"test -f {spool}/%f && test {spool}/ahead/%f -nt %p"
    # In braces, one command: chained with another tool's (`A && B`, `B && A`), a failure of
    # either fails the line. No `exec`: it would skip whatever is chained after it.
    return f"{{ {already} || {program_command(program, spool)}; }}"


def earlier_archive_commands(server):
    """Lines an earlier portal wrote; still correct, only slower: checkserver warns about them."""
    program, spool = _command_paths(server)
    cmp_form = f"test -f {spool}/%f && /usr/bin/cmp -s {spool}/%f %p && /usr/bin/sync {spool}/%f {spool}"
    return (f"{{ {cmp_form} || {program_command(program, spool)}; }}", program_command(program, spool))


def _command_paths(server):
    # `%` is archive_command's escape character: a literal one in a path must be doubled.
    return tuple(shlex.quote(str(p)).replace("%", "%%") for p in (program_path(), spool_dir(server)))


def program_command(program, spool):
    return f"/usr/bin/env -i {SYSTEM_PYTHON} -I -S {program} {spool} %p %f"


def is_portal_command(server, command):
    """The current archive_command, or one an earlier portal wrote (still correct)."""
    return command == archive_command(server) or command in earlier_archive_commands(server)


def conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def archive_settings(server):
    """The postgresql.conf lines for push archiving, in order, with why."""
    timeout = min(60, server.rpo_minutes * 60 // 4)
    return [
        ("wal_level", "replica", "restart"),
        ("archive_mode", "on", "restart"),
        ("archive_command", conf_quote(archive_command(server)), "reload"),
        ("archive_timeout", str(timeout), "reload"),
        ("max_wal_senders", "10", "restart"),
    ]


# --- What the ingest leaves in a spool (backups.walingest) --------------------------------------

# Temporary files a killed archive program left behind are removed after this long.
STALE_TMP = timedelta(minutes=10)


def leave_spool(path: Path, sha256):
    mark_ingested(path.parent, path.name, sha256)
    path.unlink()
    # The archive program's marker (it copied this segment ahead), best effort: with the segment
    # gone from the spool the shell's test fails anyway, and a re-archived file of this name goes
    # through the program and its sha256 check. A portal user outside the spool's group may not
    # remove it; nothing depends on that.
    try:
        (path.parent / "ahead" / path.name).unlink(missing_ok=True)
    except OSError:
        pass


def mark_ingested(spool: Path, name, sha256):
    """SPOOL/ingested/NAME holds the sha256: the archive program compares a re-archived file with it."""
    folder = spool / "ingested"
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(sha256 + "\n")
    os.replace(tmp, folder / name)


def write_error_marker(spool: Path, name, reason, message):
    folder = spool / "errors"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"segment": name, "reason": reason, "message": message}))


def clear_error_marker(spool: Path, name):
    (spool / "errors" / f"{name}.json").unlink(missing_ok=True)


def remove_stale_tmp(spool: Path):
    cutoff = time.time() - STALE_TMP.total_seconds()
    for entry in os.scandir(spool):
        if entry.name.endswith(".tmp") and entry.name.startswith(".") and entry.stat().st_mtime < cutoff:
            os.unlink(entry.path)
