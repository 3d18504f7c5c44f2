"""manage.py monitor [--once]: evaluate every alert condition, open/resolve alerts, send mail."""

import getpass
import signal
import threading

from django.db import close_old_connections

from backupportal import journal
from backupportal.lib.commands import PortalCommand, fail
from watching import monitor


class Command(PortalCommand):
    help = "Evaluate the alert conditions and send alert mail: once (--once), or every minute until SIGTERM."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="one pass, then exit")
        parser.add_argument("--interval", type=int, default=60, help="seconds between passes (default 60)")

    def run(self, once=False, interval=60, **options):
        if interval < 1:
            fail(f"--interval {interval}: give a number of seconds of 1 or more")
        if once:
            result = monitor.run_once()
            # A pass someone ran by hand is journaled; the schedule's, once a minute, is not.
            journal.record(
                "monitor_run",
                actor=f"os:{getpass.getuser()}",
                outcome="failed" if result["errors"] else "ok",
                opened=result.get("opened", 0),
                resolved=result.get("resolved", 0),
                errors=result["errors"],
            )
            self.report_problems(result)
            return result | {"exit_code": 1 if result["errors"] or _mail_failed(result) else 0}
        self.loop(interval)
        return {"stopped": "SIGTERM"}

    def loop(self, interval):
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.stdout.write(f"monitor: a pass every {interval} s until SIGTERM")
        while not stop.is_set():
            close_old_connections()  # a long-lived process: never reuse a connection the server dropped
            try:
                result = monitor.run_once()
                for line in self.describe(result):
                    self.stdout.write(line)
                self.report_problems(result)
            except Exception as e:  # noqa: BLE001  the loop outlives a bad pass; the next may succeed
                self.stderr.write(f"monitor pass failed: {type(e).__name__}: {e}")
            self.stdout.flush()
            stop.wait(interval)
        self.stdout.write("monitor: stopped")

    def describe(self, result):
        if "stopped" in result:
            return []
        if "skipped" in result:
            return [f"monitor: skipped: {result['skipped']}"]
        mail = result["mail"]
        lines = [
            f"monitor: {len(result['checks'])} checks ({', '.join(result['checks'])}); "
            f"opened {result['opened']}, resolved {result['resolved']}, active {result['active']}; "
            f"mail sent {mail['sent']}, failed {mail['failed']}; "
            f"channels sent {result['channels']['sent']}, failed {result['channels']['failed']}"
        ]
        return lines

    def report_problems(self, result):
        """A check that failed or mail that could not go: on stderr, one line each."""
        mail_error = result.get("mail", {}).get("error")
        channel_errors = result.get("channels", {}).get("errors", [])
        for line in ([f"mail: {mail_error}"] if mail_error else []) + channel_errors + result["errors"]:
            self.stderr.write(line)


def _mail_failed(result):
    """Mail or a channel message that could not go: the pass ran, but someone was not told."""
    return bool(result.get("mail", {}).get("failed") or result.get("channels", {}).get("failed"))
