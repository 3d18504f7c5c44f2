"""Alert channels beyond email (Slack, Teams, Telegram, Discord, a JSON webhook) and what each is owed.

A channel is a row a Sysadmin edits in the admin. Its secret part (a webhook URL with its secret
path, a bot token) is sealed at rest (backupportal/lib/sealed.py) and never shown again: pages
show `secret_hint`, the part of it that names where messages go and holds no secret.

A `ChannelDelivery` is one message an alert owes one channel: "opened" when the alert opens,
"resolved" when it resolves (watching/channels.py). The row records what was sent, so a
channel that is down only delays its messages, and a message is never sent twice.
"""

from django.db import models
from django.utils import timezone

from backupportal.lib.sealed import seal, unseal


class AlertChannel(models.Model):
    class Kind(models.TextChoices):
        SLACK = "slack", "Slack"
        TEAMS = "teams", "Microsoft Teams (Power Automate workflow)"
        TELEGRAM = "telegram", "Telegram"
        DISCORD = "discord", "Discord"
        WEBHOOK = "webhook", "JSON webhook"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=12, choices=Kind.choices)
    enabled = models.BooleanField(default=True)
    target = models.CharField(
        max_length=200,
        blank=True,
        help_text="Telegram: the chat id (-100...) or @channel; Slack: a #channel (optional); others: empty",
    )
    # Sealed for the kind: a secret entered for a Slack webhook never opens as a Discord one.
    secret_sealed = models.TextField(blank=True, editable=False)
    secret_hint = models.CharField(
        max_length=300, blank=True, editable=False, help_text="where messages go, without the secret part"
    )
    conditions = models.JSONField(default=list, blank=True, help_text="alert conditions it receives; empty: all")
    servers = models.ManyToManyField(
        "backups.Server",
        blank=True,
        related_name="+",
        help_text="servers whose alerts it receives; empty: every server, and alerts of locations and tasks",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # The channel's health, for the admin list: kept by watching/channels.py after each attempt.
    last_sent_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_failed_at = models.DateTimeField(null=True, blank=True, editable=False)
    failures = models.PositiveIntegerField(
        default=0, editable=False, help_text="failed attempts since the last success"
    )
    last_error = models.TextField(blank=True, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return f"{self.name} ({self.get_kind_display()})"

    @property
    def secret(self) -> str:
        """The secret part, opened for this kind; SealError when it cannot be opened."""
        return unseal(self.secret_sealed, self._seal_context()) if self.secret_sealed else ""

    @secret.setter
    def secret(self, value):
        self.secret_sealed = seal(value, self._seal_context()) if value else ""

    def _seal_context(self):
        return f"alert channel {self.kind}"

    @property
    def status(self):
        """ "failing", "ok" or "not used yet", as the admin list shows it."""
        if self.failures:
            return "failing"
        return "ok" if self.last_sent_at else "not used yet"

    def receives(self, alert, server_ids):
        """Whether an alert is for this channel; `server_ids` are the channel's servers' ids."""
        if not self.enabled or (self.conditions and alert.condition not in self.conditions):
            return False
        return not server_ids or alert.server_id in server_ids


class ChannelDelivery(models.Model):
    """One message an alert owes a channel; sent once, retried with backoff until it goes."""

    class Event(models.TextChoices):
        OPENED = "opened", "Opened"
        RESOLVED = "resolved", "Resolved"

    alert = models.ForeignKey("watching.Alert", on_delete=models.CASCADE, related_name="deliveries")
    channel = models.ForeignKey(AlertChannel, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=8, choices=Event.choices)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "channel deliveries"
        constraints = [
            models.UniqueConstraint(fields=["alert", "channel", "event"], name="one_delivery_per_alert_channel_event")
        ]
        indexes = [
            # Used by channels.send_due() on every monitor pass: what is still owed.
            models.Index(fields=["next_attempt_at"], name="delivery_pending", condition=models.Q(sent_at=None)),
        ]

    def __str__(self):
        return f"{self.alert} {self.event} to {self.channel.name}"
