"""The portal's work timed inside a process that is already running, as the worker runs it.

A django-q2 worker (`manage.py qcluster`) imports Django once and then runs tasks: an approved
restore request (restores.tasks.run_request, which calls restores.logical.run_logical, or
the same planning and run_plan of restores.pitr as restores.sandbox.restore_request for a PITR) or the
every-minute WAL ingest (backups.tasks.ingest_wal, which calls backups.walingest.ingest). A
`manage.py` command pays the interpreter's start, Django's set-up and, for the ingest, the
unwrapping of the WAL key (cached by the worker) on every call. This program is such a process:
started once with the portal's settings, it reads one JSON call per line on stdin, runs the same
function the task runs and answers one JSON line. What it leaves out is the queue's hand-over
(Redis hands a task at once; the ORM broker polls every second); the report says so.

    {"call": "restore", "run": 12, "into": "r_worker_0"}   -> run_logical, as run_request does
    {"call": "ingest", "server": "walc"}                    -> walingest.ingest, linger 0
    {"call": "pitr", "server": "b", "into": "/x/data", "port": 5999}
                                                            -> pitr.make_plan and run_plan, to the archive's end
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.db import close_old_connections

    for line in sys.stdin:
        call = json.loads(line)
        close_old_connections()  # as django-q2's worker does around each task
        started = time.monotonic()
        try:
            answer = {"result": CALLS[call["call"]](call)}
        except Exception as e:  # noqa: BLE001 - said to the bench, which fails the round with it
            answer = {"error": f"{type(e).__name__}: {e}"}
        answer["seconds"] = time.monotonic() - started
        print(json.dumps(answer, default=str), flush=True)


def restore(call):
    from backups.models import Server
    from restores import logical

    run = logical.restorable_run(call["run"])
    target = Server.objects.get(name=call["server"]) if call.get("server") else run.server
    done = logical.run_logical(run, target, call["into"], "bench:worker")
    return logical.summary(done)


def ingest(call):
    from backups import walingest
    from backups.models import Server

    return walingest.ingest(Server.objects.get(name=call["server"])).as_dict()  # the task's actor


def pitr(call):
    """A PITR through make_plan and run_plan, the functions restores.sandbox.restore_request calls
    for an approved request; with the command's target (the end of the archive, where an approved
    request names a time or a backup's end) and place, so that the two rows differ in the process
    alone."""
    from backups.models import Server
    from restores import pitr as pitrs

    target = pitrs.parse_target(target_time=None, target="latest", target_lsn=None, target_name=None)
    plan = pitrs.make_plan(Server.objects.get(name=call["server"]), target, call["into"], call["port"])
    return pitrs.run_plan(plan, "bench:worker")


CALLS = {"restore": restore, "ingest": ingest, "pitr": pitr}


class Resident:
    """The program above, started with the portal's environment; call() times one call."""

    def __init__(self, portal):
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            env=portal.env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, **call):
        """A Sample of one call, measured from this side: wall time and the machine's busy CPU
        from the request to the answer, the process tree's peak memory meanwhile."""
        from .measure import CommandFailed, Sample, Stopwatch, _Poller

        poller = _Poller(self.proc.pid)
        poller.start()
        watch = Stopwatch()
        self.proc.stdin.write(json.dumps(call) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        seconds, cpu = watch.read()
        poller.done.set()
        poller.join()
        if not line:
            raise CommandFailed(f"the resident portal process ended (exit {self.proc.wait()}) during {call}")
        answer = json.loads(line)
        if "error" in answer:
            raise CommandFailed(f"resident {call['call']}: {answer['error']}")
        result = answer["result"]
        if isinstance(result, dict) and result.get("status") not in ("succeeded", None):
            raise CommandFailed(f"resident {call['call']}: {result.get('status')} {result.get('error', '')}")
        return Sample(seconds, poller.peak, poller.hwm, extra={"result": result}, cpu=cpu)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backupportal.settings")
    main()
