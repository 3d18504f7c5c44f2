"""Opening and resolving alerts (one open alert per condition and subject), and their mail."""

import smtplib

from django.conf import settings
from django.core import mail
from django.db import IntegrityError, transaction
from django.template.loader import render_to_string
from django.utils import timezone

from backupportal import journal
from backupportal.lib.redact import redact
from watching import channels
from watching.models import MAIL_PENDING, Alert

# A message names at most this many things (databases, failed runs, gaps), then how many more:
# whoever may create databases on a cluster must not make one mail the length of a catalog.
LISTED = 10


def subject_of(server=None, location=None, subject=None):
    if subject:
        return subject
    if server is not None:
        return f"server:{server.name}"
    if location is not None:
        return f"location:{location.name}"
    return "portal"


def listed(items, more):
    """The first LISTED of `items` joined by "; ", then "; and K more <more>" for the rest."""
    items = list(items)
    shown = "; ".join(items[:LISTED])
    rest = len(items) - LISTED
    return f"{shown}; and {rest} more {more}" if rest > 0 else shown


def raise_alert(condition, *, message, server=None, location=None, subject=None):
    """Open the alert, or refresh the one already open. Returns (alert, opened_now)."""
    subject = subject_of(server, location, subject)
    now = timezone.now()
    open_alerts = Alert.objects.filter(condition=condition, subject=subject).exclude(state=Alert.State.RESOLVED)
    if open_alerts.update(last_seen_at=now, message=message):
        return open_alerts.first(), False
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                condition=condition,
                subject=subject,
                server=server,
                location=location,
                message=message,
                opened_at=now,
                last_seen_at=now,
            )
    except IntegrityError:  # opened by someone else a moment ago
        return open_alerts.first(), False
    journal.record(
        "alert_opened",
        actor="job:monitor",
        obj=alert,
        server=server or "",
        # The monitor did its job: what failed is recorded on the row the alert is about.
        outcome="info",
        condition=condition,
        message=message,
    )
    channels.owe(alert, "opened")  # the channels' messages, as the mail's, are sent after the checks
    return alert, True


def resolve_alert(condition, *, server=None, location=None, subject=None):
    """Resolve the open alert for this condition and subject, if any. Returns it or None."""
    subject = subject_of(server, location, subject)
    alert = Alert.objects.filter(condition=condition, subject=subject).exclude(state=Alert.State.RESOLVED).first()
    if alert is None:
        return None
    alert.state, alert.resolved_at = Alert.State.RESOLVED, timezone.now()
    alert.save(update_fields=["state", "resolved_at"])
    journal.record("alert_resolved", actor="job:monitor", obj=alert, server=server or "", condition=condition)
    channels.owe(alert, "resolved")
    return alert


# --- Mail to the admins -----------------------------------------------------------------------
# Every opened alert owes one mail, every resolved alert another; the row records what was
# sent (opened_mail_sent_at, resolved_mail_sent_at), so an SMTP outage only delays the mail:
# each monitor pass retries what is owed, and the error stays on the row for the alert page.


def send_pending_mail():
    """Send every mail alerts owe, over one SMTP connection. Returns {"sent", "failed", "error"}."""
    result = {"sent": 0, "failed": 0, "error": ""}
    owed = list(Alert.objects.filter(MAIL_PENDING).select_related("server", "location").order_by("opened_at", "pk"))
    if not owed:
        return result
    if not settings.ALERT_EMAILS:  # said on each alert and journaled: not a mail merely delayed
        result["error"] = "ALERT_EMAILS is empty: no one to mail; set it in the portal's environment"
        for alert in owed:  # a setting left empty (the demo's), not a send that failed: no failed count
            _mail_failed(alert, result["error"])
        return result
    connection = mail.get_connection(fail_silently=False)
    try:
        connection.open()
        for index, alert in enumerate(owed):
            for kind in alert.pending_mails():
                try:
                    _send(connection, alert, kind)
                except (OSError, smtplib.SMTPException) as e:
                    # The server or the connection is gone: what is left waits for the next pass.
                    result["error"] = _mail_error(e)
                    result["failed"] = sum(_mail_failed(a, result["error"]) for a in owed[index:])
                    return result
                result["sent"] += 1
    except (OSError, smtplib.SMTPException) as e:
        result["error"] = _mail_error(e)
        result["failed"] = sum(_mail_failed(a, result["error"]) for a in owed)
    finally:
        connection.close()
    return result


def _send(connection, alert, kind):
    message = mail.EmailMessage(
        subject=mail_subject(alert, kind),
        body=render_to_string("emails/alert.txt", mail_context(alert, kind)),
        to=settings.ALERT_EMAILS,
        connection=connection,
    )
    if message.send() != 1:
        raise smtplib.SMTPException("the mail backend accepted no message")
    now = timezone.now()
    field = "opened_mail_sent_at" if kind == "opened" else "resolved_mail_sent_at"
    setattr(alert, field, now)
    alert.mail_attempts += 1
    alert.mail_error = ""
    alert.save(update_fields=[field, "mail_attempts", "mail_error"])
    journal.record(
        "alert_mail_sent",
        actor="job:monitor",
        obj=alert,
        server=alert.server or "",
        mail=kind,
        recipients=len(settings.ALERT_EMAILS),
        attempts=alert.mail_attempts,
    )


def _mail_failed(alert, error):
    """Note the failure on the row; journal it when it is new (not on every retry, once a minute)."""
    first_time = alert.mail_error != error
    alert.mail_attempts += 1
    alert.mail_error = error
    alert.save(update_fields=["mail_attempts", "mail_error"])
    if first_time:
        journal.record(
            "alert_mail_failed",
            actor="job:monitor",
            obj=alert,
            server=alert.server or "",
            outcome="failed",
            error=error,
            attempts=alert.mail_attempts,
        )
    return 1


def _mail_error(exc):
    return redact(f"cannot send alert mail: {type(exc).__name__}: {exc}")[:500]


def mail_subject(alert, kind):
    prefix = "[backupportal] RESOLVED " if kind == "resolved" else "[backupportal] "
    return f"{prefix}{alert.subject_label}: {alert.get_condition_display()}"


def mail_context(alert, kind):
    return {
        "alert": alert,
        "kind": kind,
        "url": settings.SITE_URL + alert.get_absolute_url(),
        "time_zone": settings.TIME_ZONE,
    }
