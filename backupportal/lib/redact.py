"""Keep secrets out of logs, messages and the journal.

A DSN may arrive with a password in it (`postgresql://user:secret@host/db`); everything the
portal prints or stores passes through here first.
"""

import logging
import re

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_KEYWORD_PASSWORD = re.compile(r"\b(password|passphrase|secret|aws_secret_access_key)\s*=\s*('[^']*'|\S+)", re.I)


def redact(text: str) -> str:
    """Replace passwords in URLs and `password=...` pairs with ***."""
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _KEYWORD_PASSWORD.sub(lambda m: f"{m.group(1)}=***", text)


class RedactFilter(logging.Filter):
    """Logging filter: redact the rendered message before any handler sees it."""

    def filter(self, record):
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is the caller's bug; leave it to logging
            return True
        record.msg, record.args = redact(message), ()
        return True
