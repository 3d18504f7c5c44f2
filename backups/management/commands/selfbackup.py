"""Back up the portal's own database (catalog and journal) to every location: manage.py selfbackup [--json].

The "selfbackup" schedule runs the same code daily (backups.tasks.selfbackup). Restore it on a
new host with `manage.py restoreportal FILE` (README, "Bringing the portal back").
"""

from backupportal.lib.commands import PortalCommand
from backupportal.lib.osuser import os_actor
from backups import selfbackup


class Command(PortalCommand):
    help = "Back up the portal's own database (catalog and journal), encrypted, to every storage location."

    def run(self, **options):
        result = selfbackup.as_dict(selfbackup.take(actor=os_actor()))
        if result["error"]:
            self.stderr.write(f"selfbackup failed: {result['error']}")
            result["exit_code"] = 1
        return result

    def describe(self, result):
        if result["error"]:
            return []
        lines = [
            f"Portal backup #{result['id']} ({result['engine']}): {result['size']} bytes, sha256 {result['sha256']}, "
            f"journal up to entry #{result['journal_entry']}, in {result['duration_s']} s"
        ]
        for c in result["copies"]:
            lines.append(f"  {c['location']} {c['uri']}: {c['status']} {c['error']}".rstrip())
        lines += [f"  removed portal backup #{pk} (more than SELFBACKUP_KEEP)" for pk in result["removed"]]
        return lines
