"""manage.py verifyevidence FILE --key PUBLIC_KEY [--signature FILE.sig]: check an evidence pack.

The ZIP's detached signature, SHA256SUMS's signature inside it, and every member against
SHA256SUMS, all with the public key the auditor was given (never one from inside the pack); then
whether the journal was intact when the pack was made (journal-check.json).
Exit 0 when every check passes, 1 naming each that failed.
"""

from pathlib import Path

from backupportal.lib.commands import PortalCommand, fail
from watching import evidence_pack


class Command(PortalCommand):
    help = "Verify an evidence pack: its signature, the signature of its SHA256SUMS, and every member's sha256."

    def add_arguments(self, parser):
        parser.add_argument("file", help="the evidence pack (ZIP)")
        parser.add_argument("--key", required=True, help="the portal's public signing key (signing-public.asc)")
        parser.add_argument("--signature", default="", help="the ZIP's detached signature (default: FILE.sig)")

    def run(self, file="", key="", signature="", **options):
        path = Path(file)
        signature_path = Path(signature) if signature else evidence_pack.signature_path(path)
        data = _read(path, "the evidence pack", "give the ZIP's path")
        sig = _read(signature_path, "the ZIP's signature", "give it with --signature FILE.sig")
        public_key = _read(Path(key), "the public key", "give the portal's signing-public.asc with --key").decode(
            "utf-8", "replace"
        )
        checks = evidence_pack.verify(data, sig, public_key)
        ok = all(c.ok for c in checks)
        for check in checks:  # on stderr with --json too: one line per failed check
            if not check.ok:
                self.stderr.write(f"FAILED {check.what}: {check.detail}")
        return {
            "ok": ok,
            "file": str(path),
            "checks": [{"check": c.what, "ok": c.ok, "detail": c.detail} for c in checks],
            "exit_code": 0 if ok else 1,
        }

    def describe(self, result):
        lines = [f"ok {c['check']}: {c['detail']}" for c in result["checks"] if c["ok"]]
        verdict = "verified" if result["ok"] else "NOT verified"
        return [*lines, f"{result['file']}: {verdict}"]


def _read(path, what, todo):
    try:
        return path.read_bytes()
    except OSError as e:
        fail(f"{what} {path} cannot be read ({e.strerror}): {todo}")
