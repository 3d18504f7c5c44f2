"""backupportal's restore_command during a PITR: hand recovery one WAL file from the staging area.

PostgreSQL runs it as its own OS user, once per file it wants, with none of the portal's
environment (restores/pitr_prefetch.py copies it into the staging directory and writes):

    /usr/bin/env -i /usr/bin/python3 -I -S STAGING/restore_wal.py STAGING %f %p

Standard library only, no Django, no database, no keys: the portal's prefetcher fetches,
verifies and decrypts the WAL into STAGING a bounded window ahead of replay, while recovery
runs. This program only waits for the file and copies it into %p. What it finds in STAGING:

    plan             the names of every file this restore provides, one a line
    NAME             a staged file, complete (renamed into place)
    NAME.failed      the prefetcher could not provide NAME: one line saying why
    prefetcher.alive touched by the prefetcher every second while it runs
    asked/requested  written here: the newest planned file recovery asked for (the prefetcher
                     keeps its window ahead of it, and fetches again a file it had removed)

All of STAGING is root's and only readable by the database OS user, except asked/, the one
place it writes (restores/pitr_staging.py says why).

Exit 0: %p holds the file. Exit 1: not in the plan (a future timeline's history file, the
segment after the last one): recovery ends there or looks for another timeline, as PostgreSQL
expects of "not found". Exit 126: the file is planned but cannot be had (the prefetcher failed
or stopped): PostgreSQL treats a status above 125 as fatal and stops, instead of ending recovery
early and promoting a cluster short of its target.
"""

import os
import sys
import time

NOT_FOUND = 1
FATAL = 126
PLAN = "plan"
ALIVE = "prefetcher.alive"
ASKED = "asked"
REQUESTED = "requested"
# A prefetcher that has not touched its heartbeat for this long has stopped (the portal died).
SILENT_S = 60
# Even with the prefetcher alive, no single file is waited for longer than this.
WAIT_S = 3600


def planned(staging):
    """The plan's names. Unreadable, it raises: "not found" for every file would end recovery at
    once and promote the cluster short of its target."""
    with open(os.path.join(staging, PLAN)) as f:
        return {line.strip() for line in f}


def note_request(staging, name):
    """Tell the prefetcher where replay is (atomically: it may read while this writes)."""
    tmp = os.path.join(staging, ASKED, f".{REQUESTED}.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
        os.replace(tmp, os.path.join(staging, ASKED, REQUESTED))
    except OSError:
        pass  # only an optimisation: the window then moves on its own


def silent_for(staging):
    try:
        return time.time() - os.stat(os.path.join(staging, ALIVE)).st_mtime
    except OSError:
        return float("inf")


def copy_into(source, target):
    """Copy under a temporary name next to %p, then rename: recovery never sees half a file."""
    tmp = f"{target}.restoring"
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(dst.fileno(), src.fileno(), offset, size - offset)
            if sent == 0:
                break
            offset += sent
    os.replace(tmp, target)


def fail(message):
    print(f"restore_wal: {message}", file=sys.stderr)
    return FATAL


def restore(staging, name, target):
    if name not in planned(staging):
        return NOT_FOUND
    if len(name) == 24:  # a segment, not a history file
        note_request(staging, name)
    path = os.path.join(staging, name)
    deadline = time.monotonic() + WAIT_S
    pause = 0.01
    while True:
        try:
            with open(f"{path}.failed") as f:
                return fail(f.read().strip() or f"the portal could not fetch {name}")
        except FileNotFoundError:
            pass
        if os.path.exists(path):
            try:
                copy_into(path, target)
            except FileNotFoundError:
                continue  # removed between the two looks: it is fetched again (requested)
            return 0
        if silent_for(staging) > SILENT_S:
            return fail(f"{name} is not staged and the portal's WAL prefetcher stopped: see the PITR's error")
        if time.monotonic() > deadline:
            return fail(f"{name} was not staged within {WAIT_S} s: see the PITR's error")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def main(argv):
    if len(argv) != 4:
        print("usage: restore_wal.py STAGING_DIR %f %p", file=sys.stderr)
        return FATAL
    try:
        return restore(*argv[1:])
    except OSError as e:
        return fail(f"{argv[2]}: {e}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
