"""The WAL catalog: one row per archived segment (or history file) of a server."""

from django.db import models
from django.utils import timezone

from backups.models.servers import Server


class WalSegment(models.Model):
    """One archived WAL segment (or history file) of a server."""

    server = models.ForeignKey(Server, on_delete=models.PROTECT, related_name="wal_segments")
    timeline = models.IntegerField()
    name = models.CharField(max_length=40, help_text="000000010000000000000001, or a .history / .partial file")
    # The segment's position in the WAL (whatever the timeline); empty for history, backup
    # and partial files. Gap checks and retention compare these numbers.
    segno = models.BigIntegerField(null=True, blank=True)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, verbose_name="SHA-256")
    key = models.CharField(max_length=500, blank=True)
    archived_at = models.DateTimeField(help_text="when PostgreSQL (or pg_receivewal) handed it over")
    ingested_at = models.DateTimeField(default=timezone.now)
    source = models.CharField(max_length=4, choices=[("push", "push"), ("pull", "pull")], default="push")
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["server", "timeline", "name"]
        constraints = [models.UniqueConstraint(fields=["server", "name"], name="one_segment_per_name")]
        verbose_name = "WAL segment"
        indexes = [
            # Used by the WAL list filtered by server and day, and by retention.
            models.Index(fields=["server", "archived_at"], name="wal_server_archived"),
            models.Index(fields=["archived_at"], name="wal_archived"),
            # Used by the gap check, the incremental runs, restores and retention.
            models.Index(fields=["server", "segno"], name="wal_server_segno"),
            # Whether a server's archive holds more than one timeline (retention.current_lineage,
            # on the server page): without it, 60 ms a page on a catalog of a million segments.
            models.Index(fields=["server", "timeline"], name="wal_server_timeline"),
            # Used by the WAL catalog's search by segment name, whatever the server.
            models.Index(fields=["name"], name="wal_name"),
        ]

    def __str__(self):
        return f"{self.server} {self.name}"
