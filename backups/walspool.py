"""The WAL spool on the database host, and the archive command that fills it.

Segments reach the spool (WAL_SPOOL/<server>/) from the archive program (push) or from
pg_receivewal (pull). This module sets a spool up for either, installs the archive program
(backups/archive_wal.py) where the database server's user can run it, gives the
postgresql.conf lines that call it, and publishes the server's wal_segment_size into the
spool for the program, which has no database.
"""

import errno
import grp
import hashlib
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import stat
import time
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import psycopg
from django.conf import settings

from backupportal.lib.pgerrors import explain
from backups import archive_wal
from backups.models import Server
from backups.walnames import SEGMENT, WAL_FILE, WalError

logger = logging.getLogger(__name__)

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
    text = f"{server.wal_segment_size}\n"
    if read_small_file(spool / archive_wal.SIZE_FILE) == text:
        return
    try:
        folder = open_dir(spool)
        try:
            write_at(folder, archive_wal.SIZE_FILE, text)
        finally:
            os.close(folder)
    except (OSError, WalError):
        pass  # a spool the portal cannot write fails its ingest, which says so; ingest checks sizes anyway


def prepare_pull_spool(server) -> Path:
    """pg_receivewal runs as the portal's own user: its directory is private. A former push spool
    is postgres's, who could have left symbolic links for pg_receivewal to write through: root
    takes it back, and a link left in it is refused."""
    spool = spool_dir(server)
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.geteuid() == 0 and os.stat(spool).st_uid != 0:
        os.chown(spool, 0, 0)  # WAL_SPOOL/NAME: only the portal makes names in WAL_SPOOL
    os.chmod(spool, 0o700)
    for entry in os.scandir(spool):
        if entry.is_symlink():
            raise WalError(f"{entry.path} is {found_at(Path(entry.path))}, left in a former push spool: remove it")
    _make_dir(spool / "ingested", 0o700)
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


def _make_dir(path: Path, mode: int, owner_uid=None, gid=None, sticky=False, follow=False):
    """`path`, a directory of that owner (root only gives it), group and mode; `sticky` when the
    portal's user owns it. Changed through the directory opened without following it (not
    `follow`: inside a server's spool, where postgres could have put a symbolic link to any
    directory for root to chown); anything but a directory is refused."""
    if follow:
        path.mkdir(parents=True, exist_ok=True)
    else:
        with suppress(FileExistsError):
            os.mkdir(path, 0o700)
    fd = open_dir(path, follow=follow)
    try:
        if os.geteuid() == 0 and owner_uid is not None:
            os.fchown(fd, owner_uid, gid)
        elif gid is not None and os.fstat(fd).st_gid != gid:
            try:
                os.fchown(fd, -1, gid)
            except PermissionError:
                raise WalError(
                    f"cannot give {path} to group {grp.getgrgid(gid).gr_name}: add the portal's service user "
                    f"to that group (usermod -aG {grp.getgrgid(gid).gr_name} USER)"
                ) from None
        if sticky and os.fstat(fd).st_uid == os.geteuid():
            mode |= stat.S_ISVTX
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def prepare_push_spool(server, db_user="postgres") -> Path:
    """The server's spool and the archive program, installed where `db_user` can use them.

    The spool is in the database server's group (setgid): postgres writes segments, the portal
    (root, or a member of that group) reads and removes them. Nobody else can read WAL. Made by
    root, it is postgres's (2770): root cannot know which user its worker runs as, and sticky it
    would keep a worker that is only a member of the group from removing postgres's segments.
    Made by the portal's own user, it is that user's and sticky (3770): postgres adds files but
    cannot rename or remove the portal's (ingested/, segment_size, the ingest's locks), and the
    portal, owning the directory, still removes postgres's segments. Either way the portal never
    follows a name there (open_wal_file, open_dir, write_at). The program is copied out of the
    portal's checkout (which may be under /root, unreadable to postgres) next to the spool.
    """
    uid, gid = db_user_ids(db_user)
    root = spool_root()
    _make_dir(root, 0o755, follow=True)
    blocked = unreachable_by(root, uid, gid)
    if blocked is not None:
        raise WalError(
            f"the {db_user} user cannot reach {root} ({blocked} is closed to it): "
            "set WAL_SPOOL to a directory it can traverse, such as /var/lib/backupportal/walspool"
        )
    install_program()
    spool = spool_dir(server)
    _make_dir(spool, 0o2770, uid, gid, sticky=True)
    _make_dir(spool / "errors", 0o2770, uid, gid)
    _make_dir(spool / "ahead", 0o2770, uid, gid)
    _make_dir(spool / "ingested", 0o2750, None, gid)
    _give_markers(spool / "ingested", gid)
    publish_segment_size(server)
    return spool


def _give_markers(path: Path, gid):
    """The ingested/ markers a pull spool left (the portal's, group root) given to the database
    server's group: the archive program compares a segment PostgreSQL still has ready with its
    marker, and one it could not read failed with "Permission denied" for ever after a switch from
    pull to push (a probe's finding). Never through a link: a link there is left, unread."""
    folder = open_dir(path, own=True)
    try:
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_gid != gid:
                os.chown(entry.name, -1, gid, dir_fd=folder, follow_symlinks=False)
    finally:
        os.close(folder)


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
    """A postgresql.conf string: PostgreSQL reads backslash escapes in it (\\n, \\\\), so a
    backslash is doubled and a line break written as one, as ALTER SYSTEM writes them."""
    escaped = value.replace("\\", "\\\\").replace("'", "''").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


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


def source_of(server):
    """How the server's spool is filled, as pending_names reads it: "pull" (pg_receivewal) or "push"."""
    return "pull" if server.archiving == server.Archiving.PULL else "push"


def pending_names(spool: Path, source):
    """WAL files ready to ingest, oldest first. The newest .partial of pg_receivewal is still
    being written; an older one was left behind by a timeline switch and is final."""
    names = sorted(n for n in os.listdir(spool) if WAL_FILE.match(n))
    partials = [n for n in names if n.endswith(".partial")]
    if source == "pull" and partials:
        names.remove(partials[-1])
    return names


def leave_spool(path: Path, sha256):
    mark_ingested(path.parent, path.name, sha256)
    path.unlink()
    # The archive program's marker (it copied this segment ahead), best effort: with the segment
    # gone from the spool the shell's test fails anyway, and a re-archived file of this name goes
    # through the program and its sha256 check. A portal user outside the spool's group may not
    # remove it; nothing depends on that.
    folder = _open_quietly(path.parent / archive_wal.AHEAD_DIR)
    if folder is not None:
        try:
            os.unlink(path.name, dir_fd=folder)
        except OSError:
            pass
        finally:
            os.close(folder)


def forget_ingested(server, names):
    """Remove the ingested/ markers of `names` (WAL retention), through the directory opened
    without following a link: a linked ingested/ must not cost another directory its files."""
    folder = _open_quietly(spool_dir(server) / "ingested")
    if folder is None:
        return
    try:
        for name in names:
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder)
    finally:
        os.close(folder)


def mark_ingested(spool: Path, name, sha256):
    """SPOOL/ingested/NAME holds the sha256: the archive program compares a re-archived file with it.
    ingested/ must be the portal's own directory (postgres could rename it away and put its own)."""
    path = spool / "ingested"
    with suppress(FileExistsError):
        os.mkdir(path, 0o750)
    folder = open_dir(path, own=True)
    try:
        write_at(folder, name, sha256 + "\n")
    finally:
        os.close(folder)


def write_error_marker(spool: Path, name, reason, message):
    """SPOOL/errors/NAME.json for the monitor. errors/ is shared with the archive program (which
    replaces and removes markers there): not owned by the portal, only never followed."""
    path = spool / "errors"
    with suppress(FileExistsError):
        os.mkdir(path)
    folder = open_dir(path)
    try:
        write_at(folder, f"{name}.json", json.dumps({"segment": name, "reason": reason, "message": message}))
    finally:
        os.close(folder)


def clear_error_marker(spool: Path, name):
    folder = _open_quietly(spool / "errors")
    if folder is None:
        return  # none, or not a directory the portal writes through (write_error_marker says so)
    try:
        os.unlink(f"{name}.json", dir_fd=folder)
    except FileNotFoundError:
        pass
    finally:
        os.close(folder)


def clear_settled_conflicts(spool: Path):
    """A conflict's marker (a file come again with other content) goes once a DBA removed the file:
    it kept archive_failing open for ever (a probe's finding). Read never through a link."""
    errors = spool / "errors"
    for marker in errors.glob("*.json") if errors.is_dir() and not errors.is_symlink() else ():
        said = read_small_file(marker, 4096) or ""
        if '"reason": "conflict"' in said and not os.path.lexists(spool / marker.name.removesuffix(".json")):
            marker.unlink(missing_ok=True)


def remove_stale_tmp(spool: Path):
    cutoff = time.time() - STALE_TMP.total_seconds()
    for entry in os.scandir(spool):
        if not (entry.name.endswith(".tmp") and entry.name.startswith(".")):
            continue
        try:
            st = entry.stat(follow_symlinks=False)  # a link's own age: never its target's, nor a dangling one's error
            if (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) and st.st_mtime < cutoff:
                os.unlink(entry.path)  # a link itself, never what it names
        except OSError:
            pass  # gone meanwhile, or another user's in a sticky spool


# --- Never through a name postgres controls -----------------------------------------------------
#
# postgres owns a push spool made by root (and can add names to any push spool): whoever runs as
# it (any PostgreSQL superuser, through COPY ... TO PROGRAM) can put a symbolic link, a FIFO or a
# directory under any name there. The portal, which may be root, opens every name in a spool
# without following it; reads only regular files of a size their kind can have; writes files
# under fresh names (O_EXCL) renamed into place (a rename replaces a link, it does not follow
# it), relative to the directory opened; and refuses what it did not expect in one line that
# says what it found, leaving it for a human: nothing there is followed or removed blindly.

# .history and .backup files are a few lines of text.
SMALL_WAL_FILE = 1 << 20
# initdb's largest --wal-segsize: a segment's bound while the server's own is not known.
MAX_SEGMENT = 1 << 30
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO's open never waits
KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of(mode):
    return next((what for test, what in KINDS if test(mode)), "not a file")


def found_at(path: Path):
    """What `path` is, in words, looked at without following it."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return f"a symbolic link to {os.readlink(path)}"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return kind_of(st.st_mode)


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def open_dir(path: Path, own=False, follow=False):
    """`path` opened as a directory, never through a symbolic link (unless `follow`); `own`: it must
    be the portal's user's. Anything else is a WalError naming it."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise WalError(
            f"{path} is {found_at(path)}, not a directory: the portal does not follow it; remove it"
        ) from None
    owner = os.fstat(fd).st_uid
    if own and owner != os.geteuid():
        os.close(fd)
        raise WalError(
            f"{path} belongs to {user_name(owner)}, not to the portal's user {user_name(os.geteuid())}: "
            "the portal writes only into a directory of its own there; look at it, then remove it"
        )
    return fd


def write_at(folder, name, text, mode=0o640):
    """NAME in the directory open as `folder`, whole or not at all: written under a fresh name
    (O_EXCL, never through what is there), then renamed over NAME (replacing a link, not following
    it). `mode` whatever the umask: postgres reads segment_size and ingested/ through the group."""
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=folder)
        raise


def _open_quietly(path: Path):
    """open_dir(path), or None when it is missing or refused (logged): for best-effort removals."""
    try:
        return open_dir(path)
    except WalError as e:
        logger.warning("%s", e)
    except OSError:
        pass
    return None


def read_small_file(path: Path, most=64):
    """The text of a small regular file, never through a link (nor a FIFO, nor /dev/zero); None otherwise."""
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError:
        return None
    try:
        return os.read(fd, most + 1).decode(errors="replace") if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


def open_lock(spool: Path, name):
    """SPOOL/NAME, a lock file of the portal's (flock), opened or made: never through a symbolic
    link, and refused unless a regular file of the portal's user (one of postgres's could be held
    locked by postgres forever)."""
    path = spool / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        raise WalError(
            f"{path} is {found_at(path)}, not the portal's lock file: it does not follow it; remove it"
        ) from None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
        os.set_blocking(fd, True)
        return fd
    os.close(fd)
    what = f"a file of {user_name(st.st_uid)}" if stat.S_ISREG(st.st_mode) else kind_of(st.st_mode)
    raise WalError(f"{path} is {what}, not the portal's lock file: it does not use it; remove it")


def kind_of_wal(name):
    if name.endswith(".history"):
        return "timeline history file"
    if name.endswith(".backup"):
        return "backup history file"
    return "partial WAL segment" if name.endswith(".partial") else "WAL segment"


def wal_file_limit(name, segment_size=None):
    """The most bytes a spool file of this name can hold: a segment (or a .partial) its server's
    segment size (initdb's largest while unknown), a .history or .backup file SMALL_WAL_FILE."""
    if name.endswith((".history", ".backup")):
        return SMALL_WAL_FILE
    return segment_size or MAX_SEGMENT


def check_length(path: Path, size, limit):
    """Refuses a spool file found (or read) longer than its kind can be."""
    if size > limit:
        raise WalError(
            f"{path} is longer than the {limit} bytes a {kind_of_wal(path.name)} can be: it is not one; it is "
            "left there for you to look at and remove, and the WAL after it waits until then"
        )


def open_wal_file(path: Path, segment_size=None):
    """A spool file opened to read, and the most bytes to read of it: (fd, limit). Never through a
    symbolic link, nor a FIFO; a regular file, no longer than its kind can be (a full segment's
    exact size is backups.walcheck.check_segment_size). Anything else is a WalError saying what was
    found, left where it is. OSError when it cannot be opened at all (gone, unreadable)."""
    limit = wal_file_limit(path.name, segment_size)
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO):  # a symbolic link; a socket
            raise
        raise WalError(not_wal(path, found_at(path))) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WalError(not_wal(path, kind_of(st.st_mode)))
        if not SEGMENT.match(path.name):
            check_length(path, st.st_size, limit)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, limit


def not_wal(path, found):
    return (
        f"{path} is {found}, not a WAL file: the portal neither follows nor reads it (whoever runs as the "
        "database server's OS user can put anything in the spool); it is left there for you to look at and "
        "remove, and the WAL after it waits until then"
    )


def wal_file_size(path: Path, segment_size=None):
    """The size of a spool file, opened as open_wal_file() does."""
    fd, _ = open_wal_file(path, segment_size)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def sha256_of_wal_file(path: Path, segment_size=None):
    """The sha256 of a spool file (archive_wal.sha256_of's, opened as open_wal_file() does, read no
    further than its kind can be)."""
    fd, limit = open_wal_file(path, segment_size)
    digest, size = hashlib.sha256(), 0
    try:
        while size <= limit and (chunk := os.read(fd, archive_wal.CHUNK)):
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    check_length(path, size, limit)
    return digest.hexdigest()
