"""The database OS user, for production and tests alike: run a program as that user, give it
files, find a free port, and the one wrapper of pg_ctl.

The portal runs as root or as its own user; PostgreSQL refuses to run as root, so a server's
programs (pg_ctl, tar into a data directory, pg_verifybackup) run as ``postgres`` through
``runuser`` when we are root. Standard library only: the demo and the benchmarks use it
without Django. backups.binaries.pg_ctl chooses the binaries of a cluster's own version;
backupportal.lib.pgcluster (the throwaway clusters of tests, demo and benchmarks) passes its own.
"""

import errno
import getpass
import os
import pwd
import secrets
import socket
import stat
import struct
import subprocess
from pathlib import Path

from backupportal.lib.childenv import child_env

#: OS user that owns data directories and runs the server when we are root.
DB_OS_USER = "postgres"


def is_root() -> bool:
    return os.geteuid() == 0


def as_db_user(argv: list[str]) -> list[str]:
    """``argv`` to run as the database OS user: prefixed with runuser when we are root."""
    if is_root():
        return ["runuser", "-u", DB_OS_USER, "--", *argv]
    return list(argv)


def as_db_user_tied(argv: list[str]) -> list[str]:
    """``argv`` to run as the database OS user for a long run that must end with the process
    that started it (a worker killed, or subprocess's timeout, kills only its own child). When
    root: setpriv changes user and then runs the program itself, with a parent-death signal set
    after the change (a change of user clears one set before); runuser would fork it and leave it
    running on as an orphan. Otherwise the caller's preexec_fn (backups.crypto.die_with_parent)
    sets it on the program itself."""
    if is_root():
        ids = [f"--reuid={DB_OS_USER}", f"--regid={DB_OS_USER}", "--init-groups"]
        return ["setpriv", *ids, "--pdeathsig=KILL", "--", *argv]
    return list(argv)


def db_user_ids() -> tuple[int, int] | None:
    """(uid, gid) of the database OS user when we are root, whose files must be given to it;
    None otherwise (what we write is ours, as the programs we start as that user)."""
    if not is_root():
        return None
    pw = pwd.getpwnam(DB_OS_USER)
    return pw.pw_uid, pw.pw_gid


def chown_to_db_user(path) -> None:
    """``chown -R`` ``path`` to the database OS user when root; no-op otherwise.

    Symlinks are changed themselves, never followed. Each directory is walked from its parent's
    descriptor (os.fwalk): one that the database OS user swaps for a link while the walk is in it
    (a data directory is that user's) leads the chown nowhere else. An entry gone between the
    listing and its chown was renamed or removed meanwhile (the early manifest's fetch commits its
    file while the restore gives files away): there is nothing left to give, and whoever renamed
    it gives its new name away itself.
    """
    if (ids := db_user_ids()) is None:
        return
    root = Path(path)
    os.lchown(root, *ids)
    if root.is_symlink() or not root.is_dir():
        return
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(root):
        for name in dirnames + filenames:
            try:
                os.chown(name, *ids, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue


def give_to_db_user(path) -> None:
    """The one entry ``path`` (never what a link leads to, nor what a directory holds) to the
    database OS user when root: in a directory that user owns, a walk could meet a FIFO it put
    there in place of a subdirectory and wait on it for ever."""
    if (ids := db_user_ids()) is not None:
        os.chown(path, *ids, follow_symlinks=False)


def read_as_db_user(path) -> bytes:
    """The file ``path`` of a directory that is the database OS user's, read as that user when we
    are root (cat): a link put there leads the read nowhere that user could not read itself.
    OSError, in one line, when it cannot be read."""
    if not is_root():
        return Path(path).read_bytes()
    return _file_as_db_user(["cat", "--", str(path)], "read", path)


def read_regular(path, limit: int, tail=False) -> bytes:
    """A regular file of a directory that is the database OS user's (a restored copy's log, its
    postmaster.pid, its backup_manifest), read by root without following a link, waiting on a
    FIFO or reading without end: OSError for anything else; at most `limit` bytes (the last
    ones when `tail`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if tail and st.st_size > limit:
            os.lseek(fd, st.st_size - limit, os.SEEK_SET)
        chunks, left = [], limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# How a directory being removed is opened: never through a link, never waiting on a FIFO put
# in its place (O_DIRECTORY fails on one before it is opened), relative to its parent.
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Descriptors held at once: a directory deeper below the top is moved up into it and removed on a
# later pass, so that no depth the database OS user makes can stop the removal. A tree still not
# gone after PASSES passes (that user adding to it all along) is an error: tried again later.
DEEPEST, PASSES = 64, 64


def remove_tree(path, ignore_errors=False) -> None:
    """``path`` and all in it, as root may remove a tree the database OS user can change (a
    restored copy's data directory, a chain's extracted links). shutil.rmtree (Python 3.11) opens
    each subdirectory with neither O_NONBLOCK nor O_DIRECTORY: a FIFO swapped in for one after
    its lstat made it wait for ever. Here an entry swapped for a FIFO or a link is unlinked
    itself. As rmtree, it removes all it can: the first error is raised at the end (that user
    adding files meanwhile), unless ``ignore_errors``. Nothing when ``path`` is gone."""
    try:
        parent = os.open(Path(path).parent, _DIRECTORY & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    errors = []
    try:
        _remove(parent, Path(path).name, errors)
    finally:
        os.close(parent)
    errors = [e for e in errors if not isinstance(e, FileNotFoundError)]
    if errors and not ignore_errors:
        raise errors[0]


def _remove(dir_fd, name, errors):
    """The entry `name` of the directory `dir_fd`: a directory with all in it, else itself."""
    top, again = _open_or_unlink(dir_fd, name, errors)
    if top is None:
        if again:
            errors.append(OSError(errno.EISDIR, "a directory took the place of a file", name))
        return
    try:
        for _ in range(PASSES):
            said = []  # what the last pass could not remove is what is left
            if not _empty(top, top, 1, said):
                break
        else:
            said.append(OSError(errno.EBUSY, f"still not empty after {PASSES} passes", name))
        errors += said
    finally:
        os.close(top)
    _rmdir(dir_fd, name, errors)


def _empty(fd, top, depth, errors) -> bool:
    """Remove what the directory `fd` holds; a directory DEEPEST levels below `top` is moved up
    into it instead (by root's descriptor of `top`: no path), for the next pass. True when a next
    pass is needed (that, or a directory put in a file's place meanwhile)."""
    moved = False
    try:
        entries = list(os.scandir(fd))
    except OSError as e:
        errors.append(e)
        return False
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if not is_dir:
            moved |= _unlink(fd, entry.name, errors)
        elif depth >= DEEPEST:
            try:
                os.rename(entry.name, f".removing-{secrets.token_hex(8)}", src_dir_fd=fd, dst_dir_fd=top)
                moved = True
            except OSError as e:
                errors.append(e)
        else:
            moved |= _remove_below(fd, entry.name, top, depth, errors)
    return moved


def _open_or_unlink(fd, name, errors):
    """(the descriptor of the directory `name` in `fd`, or None; whether a next pass is needed).
    A file, a FIFO or a link found there (swapped in since the listing) is unlinked itself."""
    try:
        return os.open(name, _DIRECTORY, dir_fd=fd), False
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            return None, _unlink(fd, name, errors)
        errors.append(e)
        return None, False


def _remove_below(fd, name, top, depth, errors) -> bool:
    child, again = _open_or_unlink(fd, name, errors)
    if child is None:
        return again
    try:
        moved = _empty(child, top, depth + 1, errors)
    finally:
        os.close(child)
    _rmdir(fd, name, errors)
    return moved


def _rmdir(fd, name, errors):
    try:
        os.rmdir(name, dir_fd=fd)
    except OSError as e:
        errors.append(e)


def _unlink(fd, name, errors) -> bool:
    """True when a directory took the file's place since the listing: the next pass removes it."""
    try:
        os.unlink(name, dir_fd=fd)
    except IsADirectoryError:
        return True
    except OSError as e:
        errors.append(e)
    return False


def only_root_can_change(path, direct=None) -> str:
    """'' when only root can rename or replace what is in the directory ``path``: root's, not a
    link, writable by no other user or group, by mode or by ACL (a sticky directory, such as
    /tmp, excepted unless it is ``direct``, whose entry is another user's). Else why, briefly."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (give the path it leads to)"
    if st.st_uid != 0:
        return f"belongs to {_user_name(st.st_uid)}"
    writable = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0)
    if (writable or _acl_grants_write(path, st.st_gid)) and not (st.st_mode & stat.S_ISVTX and path != direct):
        return "can be written by a user other than root"
    return ""


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _acl_grants_write(path, gid) -> bool:
    """Whether the directory's POSIX ACL lets a named user or group (not root's), or its owning
    group (not root's), write: the mode bits show only the mask then."""
    try:
        raw = os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except OSError:
        return False  # no ACL beyond the mode, or a filesystem without them
    entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    mask = next((perm for tag, perm, _ in entries if tag == 0x10), 7)
    named = [perm for tag, perm, who in entries if (tag in (0x02, 0x08) and who != 0) or (tag == 0x04 and gid != 0)]
    return any(perm & mask & 2 for perm in named)


def write_as_db_user(path, data: bytes, append=False) -> None:
    """``data`` into the file ``path`` of a directory that is the database OS user's (a restored
    data directory), written as that user when we are root (tee): a link put there, or a
    directory swapped for one, then leads the write nowhere that user could not write itself. A
    file it makes is that user's. OSError, in one line, when the write fails."""
    if not is_root():
        with open(path, "ab" if append else "wb") as f:
            f.write(data)
        return
    # A read-only file of production's (0440 under configuration management) is its owner's to
    # make writable: the copy's, as the owner, not root overwriting it.
    tee = f'exec tee {"-a " if append else ""}-- "$1" >/dev/null'
    _file_as_db_user(
        ["sh", "-c", f'test ! -e "$1" -o -w "$1" || chmod u+w -- "$1"; {tee}', "sh", str(path)], "write", path, data
    )


def _file_as_db_user(argv, doing, path, data=None) -> bytes:
    """``argv`` (cat, tee) run as the database OS user on ``path``: its output, or OSError in one
    line naming the file and the program's last word."""
    proc = subprocess.run(
        as_db_user(argv), input=data, capture_output=True, cwd="/", env=child_env(), timeout=120, check=False
    )
    if proc.returncode != 0:
        said = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"could not {doing} {path} as the {DB_OS_USER} OS user: {said[-1] if said else proc.returncode}")
    return proc.stdout


def unreachable_ancestor(path: Path) -> Path | None:
    """First directory in ``path`` and its parents the db user cannot traverse (root only).

    Root can enter any directory, so a mistake here (e.g. pytest's 0700
    ``/tmp/pytest-of-root``) would otherwise surface later as an obscure
    initdb or pg_ctl "Permission denied".
    """
    if not is_root():
        return None
    pw = pwd.getpwnam(DB_OS_USER)
    gids = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_uid == pw.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return p
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0).

    Another process may take it before the server binds it; Cluster.start()
    retries with a new port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_as_db_user(argv, cwd="/", timeout=120) -> subprocess.CompletedProcess:
    """Run ``argv`` as the database OS user, output captured as text.

    From ``cwd`` (the caller's own, say /root, may be closed to that user), with a clean
    environment: a server it starts runs on as another user and gets none of our secrets.
    """
    return subprocess.run(
        as_db_user([str(a) for a in argv]),
        check=False,  # callers read returncode and raise with context
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
    )


def pg_ctl(program, datadir, *args, cwd="/", timeout=120) -> subprocess.CompletedProcess:
    """``program`` (a pg_ctl) ``args -D datadir`` as the database OS user (run_as_db_user)."""
    return run_as_db_user([program, *args, "-D", datadir], cwd=cwd, timeout=timeout)


def os_actor() -> str:
    """The journal's actor for a command run from a shell: "os:" and the OS user who ran it
    (its uid when the name cannot be told, as in a container without a passwd entry)."""
    try:
        return f"os:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - getpass raises OSError or KeyError depending on the platform
        return f"os:{os.getuid()}"
