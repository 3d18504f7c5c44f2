"""What every management command shares: --json output and one-line errors."""

import json
import sys

from django.core.management.base import BaseCommand, CommandError
from django.db import InterfaceError, OperationalError

from backupportal.lib.redact import redact


class PortalCommand(BaseCommand):
    """A command that prints one JSON object as its last stdout line with --json.

    Subclasses implement `run(**options)` returning a dict, and `describe(result)` for
    the human-readable lines. Errors are CommandError: Django prints them as one line on
    stderr and exits 1.
    """

    json_option = True
    # Not Django's system checks before each command: they import every view and URL (half a
    # second of a PITR's start-up, measured), and find programming errors, which the suite
    # catches, not this host's configuration; `manage.py check --deploy` checks that.
    requires_system_checks = []

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        if self.json_option:
            parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
            usage_error = parser.error

            def error(message):  # a wrong option or argument: argparse exits 2 before handle() runs
                if getattr(self, "_called_from_command_line", False) and _asks_json(sys.argv[2:]):
                    self.stdout.write(json.dumps({"status": "refused", "error": message, "exit_code": 2}))
                usage_error(message)

            parser.error = error
        return parser

    def handle(self, *args, **options):
        try:
            result = self._run(**options)
        except CommandError as e:
            if options.get("json"):  # a refusal too ends stdout with its JSON object (`| tail -1 | jq`)
                self.stdout.write(json.dumps({"status": "refused", "error": str(e), "exit_code": 1}))
            raise
        if options.get("json"):
            self.stdout.write(json.dumps(result, default=str))
        else:
            for line in self.describe(result):
                self.stdout.write(line)
        if result.get("exit_code"):
            raise SystemExit(result["exit_code"])

    def _run(self, **options):
        try:
            return self.run(**options)
        except (OperationalError, InterfaceError) as e:
            # The portal's own catalog is down (not a protected server: those raise psycopg's errors).
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            fail(
                f"the portal's own database cannot be used ({redact(first)}): "
                "check that it is running and that DATABASE_URL points at it, then try again"
            )

    def run(self, **options):
        raise NotImplementedError

    def describe(self, result):
        return [json.dumps(result, default=str, indent=2)]


def _asks_json(argv):
    """Whether the command line gives --json, as argparse reads it: abbreviated too (--js)."""
    return any(len(arg) > 3 and "--json".startswith(arg) for arg in argv if arg.startswith("--"))


def fail(message):
    """One line: what is wrong and what to do."""
    raise CommandError(message.replace("\n", " "))
