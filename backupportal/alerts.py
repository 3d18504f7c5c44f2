"""Opening and resolving alerts: one open alert per condition and subject."""

from django.db import IntegrityError, transaction
from django.utils import timezone

from backupportal import journal
from backupportal.models import Alert


def subject_of(server=None, location=None, subject=None):
    if subject:
        return subject
    if server is not None:
        return f"server:{server.name}"
    if location is not None:
        return f"location:{location.name}"
    return "portal"


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
        outcome="failed",
        condition=condition,
        message=message,
    )
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
    return alert
