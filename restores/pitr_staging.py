"""A PITR's WAL staging directory: the portal's own, under PITR_STAGING_ROOT, outside the new
cluster's data directory.

PostgreSQL requires a data directory to belong to the database OS user, so anything running as
that user (another cluster on this host, or the restored copy's superusers through COPY ...
PROGRAM) may rename and replace what is in it. The portal, as root, writes the staging area by
name: the prefetcher's segments, markers and heartbeat, the history files, the restore-point
search, and it removes the segments replay has passed. Inside the data directory, the staging
directory swapped for a symbolic link would have had root write WAL-named files into another
directory, and delete them from it (another cluster's pg_wal, say). Here nothing on the path
is that user's to change:

    PITR_STAGING_ROOT/          root's, 0711: traversed, never listed, by the database OS user
    restore-ID/                 root's, group the database OS user's, 0750
    restore-ID/unchecked/       root's, 0700: decrypted WAL not checked yet (pitr_prefetch)
    restore-ID/asked/           the database OS user's: restore_wal.py writes `requested` there

What recovery reads there (restore_wal.py, the staged segments, the history files, pg_verifybackup
through --wal-directory) is root's and readable by that user's group, never writable by it.
"""

import os
import stat
from pathlib import Path

from django.conf import settings

from backupportal.lib.osuser import DB_OS_USER, db_user_ids, only_root_can_change, remove_tree, unreachable_ancestor
from restores.pitr_plan import UNCHECKED, RestoreFailed
from restores.restore_wal import ASKED, REQUESTED


def staging_for(run_pk) -> Path:
    return Path(settings.PITR_STAGING_ROOT) / f"restore-{run_pk}"


def make(staging: Path) -> Path:
    """The staging directory, new (one left by this run's dead process goes first), with its
    unchecked and asked directories. RestoreFailed, in one line, when PITR_STAGING_ROOT is not a
    place the database OS user can reach and cannot change."""
    root = staging.parent
    if (ids := db_user_ids()) is not None:
        make_root(root)
    else:  # the portal runs as the database OS user itself: there is no one to keep out
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if staging.is_symlink() or staging.exists():
        remove(staging)
    staging.mkdir(mode=0o700)
    (staging / UNCHECKED).mkdir(mode=0o700)
    (staging / ASKED).mkdir(mode=0o700)
    if ids is not None:
        os.chown(staging / ASKED, *ids)
        os.chown(staging, 0, ids[1])
        os.chmod(staging, 0o750)
    return staging


def make_root(root: Path):
    """PITR_STAGING_ROOT, made if missing (its missing parents 0755, whatever the umask), 0711.

    Every directory from / to it must be root's, no link, and writable by no one else (a sticky
    directory such as /tmp excepted, above it only): else a process of the database OS user
    could move the staging directory away and put a link in its place."""
    where = f"PITR_STAGING_ROOT ({root})"
    for directory in reversed([d for d in (root, *root.parents) if not os.path.lexists(d)]):
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o755)
    for directory in (root, *root.parents):
        if why := only_root_can_change(directory, direct=root):
            raise RestoreFailed(
                f"{where}: {directory} {why}: the WAL a PITR stages there could be swapped; make it a directory"
                " of root's that no one else can write, or set PITR_STAGING_ROOT elsewhere"
            )
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o711)  # traversed, never listed, by the database OS user
    finally:
        os.close(fd)
    if (unreachable := unreachable_ancestor(root)) is not None:
        raise RestoreFailed(
            f"{where}: {unreachable} cannot be traversed by the {DB_OS_USER} OS user, whose recovery reads"
            " the WAL staged there: chmod o+x it, or set PITR_STAGING_ROOT elsewhere"
        )


def readable(path: Path):
    """A file root wrote into the staging directory, given to the database OS user to read only
    (its group: the file stays root's)."""
    if (ids := db_user_ids()) is not None:
        os.chown(path, 0, ids[1], follow_symlinks=False)
        os.chmod(path, 0o640)


def requested(staging: Path) -> str:
    """What restore_wal.py wrote into the asked directory (the database OS user's), read without
    following a link, waiting on a FIFO or reading more than a line; '' when there is nothing."""
    try:
        fd = os.open(staging / ASKED / REQUESTED, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)


def remove(staging: Path | None):
    """The staging directory and all in it (its asked/ is the database OS user's: osuser.remove_tree,
    which follows no link and waits on no FIFO); nothing when gone."""
    if staging is not None:
        remove_tree(staging, ignore_errors=True)
