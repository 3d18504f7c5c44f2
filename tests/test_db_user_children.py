"""A long program run as the database OS user (pg_combinebackup, pg_verifybackup) ends with the
worker that started it: killed, the worker leaves nothing writing on in a restore's directories."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from backupportal.lib.osuser import db_user_ids, is_root
from tests.helpers import wait_for

STARTER = textwrap.dedent(
    """
    import subprocess, sys
    from backupportal.lib.osuser import {wrap}
    from backups.crypto import die_with_parent
    child = subprocess.Popen({wrap}(["sleep", "{seconds}"]), preexec_fn=die_with_parent)
    print(child.pid, flush=True)
    child.wait()
    """
)


def sleeping(seconds):
    """Pids of the `sleep seconds` processes running now."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", str(seconds).encode()]:
                    found.append(int(pid))
        except OSError:
            continue
    return found


def start(wrap, seconds):
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER.format(wrap=wrap, seconds=seconds)], stdout=subprocess.PIPE, text=True
    )
    starter.stdout.readline()
    wait_for(lambda: sleeping(seconds), timeout=10, what="the program to start")
    return starter


def uid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


def test_a_program_run_as_the_database_user_dies_with_the_process_that_started_it():
    starter = start("as_db_user_tied", 301)
    (program,) = sleeping(301)
    assert uid_of(program) == (db_user_ids()[0] if is_root() else os.getuid())
    assert program == int(
        open(f"/proc/{starter.pid}/task/{starter.pid}/children").read().split()[0]
    )  # no runuser between

    starter.send_signal(signal.SIGKILL)
    starter.wait()

    wait_for(lambda: not sleeping(301), timeout=10, what="the program to end with its starter")


def test_runuser_alone_would_leave_it_running_which_is_why_long_runs_are_tied():
    if not is_root():
        return  # no runuser in between: die_with_parent alone is enough
    starter = start("as_db_user", 302)
    try:
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        time.sleep(0.5)
        assert sleeping(302), "runuser's child ended with the starter: as_db_user_tied would not be needed"
    finally:
        for pid in sleeping(302):
            os.kill(pid, signal.SIGKILL)
