"""Logging filters of the portal's handlers."""

import logging


class ForbiddenInOneLine(logging.Filter):
    """A 403 is a refusal the portal meant, not a bug: one line (path, user, reason), no traceback.

    Django logs every PermissionDenied with its traceback; a busy auditor's session would fill
    the log with them and hide the tracebacks that matter."""

    def filter(self, record):
        if getattr(record, "status_code", None) == 403 and record.exc_info:
            reason = " ".join(str(record.exc_info[1] or "").split())
            request = getattr(record, "request", None)
            user = getattr(getattr(request, "user", None), "username", "") or "-"
            record.msg = f"{record.getMessage()} user={user}" + (f" ({reason})" if reason else "")
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True
