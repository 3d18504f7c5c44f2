"""A condition the monitor watches was just recorded on its own row: the monitor looks now.

Backups and restores record what happened on their own rows (a failed run, a failed restore
test, a bad or failed copy, an error marker in a WAL spool). The monitor (watching/) alone
opens and resolves alerts, deriving them from those rows every minute; this signal lets it
look at once, so an alert opens as promptly as when each writer opened its own, with the
monitor's one message per condition. The ground sends nothing itself and imports no app.
"""

from django.dispatch import Signal

# Sent with condition= (an Alert condition, e.g. "backup_failed"), server= and location=.
recorded = Signal()


def changed(condition, *, server=None, location=None):
    """`condition` may have begun or ended for `server` (or `location`): the monitor re-checks it."""
    recorded.send(sender=condition, condition=condition, server=server, location=location)
