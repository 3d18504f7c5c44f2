"""manage.py evidencepack [--from DATE --to DATE] --output FILE: an auditor's evidence pack of a period.

Writes FILE (the ZIP) and FILE.sig (its detached signature by the portal's signing key); the
period defaults to the last complete quarter. Journaled as evidence_pack_made.
"""

import getpass
from datetime import date
from pathlib import Path

from backupportal.lib.commands import PortalCommand, fail
from backupportal.lib.signing import SigningError
from watching import evidence, evidence_pack


class Command(PortalCommand):
    help = "Make the signed evidence pack (ZIP + FILE.sig) of a period: a PDF summary, the journal extract, SHA256SUMS."

    def add_arguments(self, parser):
        parser.add_argument("--from", dest="first", default="", help="first day, YYYY-MM-DD (default: last quarter's)")
        parser.add_argument("--to", dest="last", default="", help="last day, included, YYYY-MM-DD")
        parser.add_argument("--output", required=True, help="the ZIP to write; its signature goes to FILE.sig")

    def run(self, first="", last="", output="", **options):
        period = period_from(first, last)
        if not output.strip():
            fail("--output is empty: name the ZIP to write, e.g. --output evidence-2026q3.zip")
        path = Path(output)
        for target in (path, evidence_pack.signature_path(path)):
            if target.exists():
                fail(f"{target} exists: choose another --output or move it away (a pack is never overwritten)")
        if not path.parent.is_dir():
            fail(f"--output {output}: the directory {path.parent} does not exist: create it or choose another")
        try:
            pack = evidence_pack.build(period)
        except SigningError as e:
            fail(f"the pack cannot be signed: {e}")
        try:
            evidence_pack.write(pack, path, actor=f"os:{getpass.getuser()}")
        except OSError as e:
            fail(f"--output {output}: cannot be written ({e.strerror or e}): choose a directory you may write to")
        return {
            "output": str(path),
            "signature": str(evidence_pack.signature_path(path)),
            "period": str(period),
            "sha256": pack.sha256,
            "size": len(pack.data),
            "signer": pack.signer,
        }

    def describe(self, result):
        return [
            f"evidence pack {result['period']}: {result['output']} ({result['size']} bytes, sha256 {result['sha256']})",
            f"signature: {result['signature']} (key {result['signer']})",
        ]


def period_from(first, last):
    """The period the options name; both or neither (the last complete quarter)."""
    if not first and not last:
        return evidence.last_quarter()
    if not first or not last:
        fail("give both --from and --to (YYYY-MM-DD), or neither for the last complete quarter")
    days = []
    for option, value in (("--from", first), ("--to", last)):
        try:
            days.append(date.fromisoformat(value))
        except ValueError:
            fail(f"{option} {value!r} is not a date: give YYYY-MM-DD")
    if problem := evidence.period_problem(*days):
        fail(f"--from {first} --to {last}: {problem}")
    return evidence.Period(*days)
