"""Jobs run under `strace -f -e trace=execve`, for the tests that read every program's argv and environment."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import portal_env

ROOT = Path(__file__).resolve().parent.parent

EXECVE = re.compile(r'^(\d+)\s+execve\("([^"]*)", \[(.*?)\], (\[.*?\]|0x[0-9a-f]+)')


def traced(settings, trace, *args, env=None):
    """manage.py ARGS --json under strace (`env`: settings of its own); returns (its --json result,
    its stdout+stderr, the execs).

    A PITR leaves its restored server running, and a job's first gpg starts a gpg-agent that stays:
    strace -f would follow them for ever (a backup run first in its worker hung until the timeout).
    Once manage.py itself has exited, strace is stopped (its tracees are detached and run on).
    """
    env = portal_env(settings, **(env or {}))
    argv = ["strace", "-f", "-v", "-q", "-e", "trace=execve", "-s", "4096", "-o", str(trace)]
    argv += [sys.executable, str(ROOT / "manage.py"), *args, "--json"]
    out, err = trace.with_suffix(".out"), trace.with_suffix(".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        strace = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=stdout, stderr=stderr)
    deadline = time.monotonic() + 300
    try:
        while strace.poll() is None and not manage_exited(trace):
            assert time.monotonic() < deadline, f"{args} did not finish in 300 s"
            time.sleep(0.2)
    finally:
        if strace.poll() is None:
            # strace acts on SIGTERM only at its tracees' next event: an idle server may never have one.
            # Killed, it leaves them detached and running (no PTRACE_O_EXITKILL).
            strace.kill()
        strace.wait(timeout=30)
    output = out.read_text() + err.read_text()
    result = json.loads(out.read_text().strip().splitlines()[-1]) if out.read_text().strip() else {}
    return result, output, execs(trace.read_text())


def manage_exited(trace):
    text = trace.read_text() if trace.exists() else ""
    first = EXECVE.search(text)
    return first is not None and re.search(rf"^{first.group(1)}\s+\+\+\+ exited with", text, re.M) is not None


def execs(text):
    """(pid, program, argv text, envp text) of every execve in a trace, the traced manage.py first."""
    found = []
    for line in text.splitlines():
        match = EXECVE.match(line)
        if match:
            found.append(match.groups())
    assert found, "the trace holds no execve"
    return found
