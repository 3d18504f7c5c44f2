"""The databases of a server's cluster: what logical backups protect, a run per database.

The physical side (base backups, WAL, PITR) belongs to the server, which is the cluster. A
database row is never deleted while its cluster is registered: a dropped database keeps its
backups under retention and is shown as gone (backups/databases.py keeps the rows in step).
"""

from django.db import models
from django.utils import timezone

from backups.models.servers import Server, default_critical_tables
from backups.tables import validate_table_list


class Database(models.Model):
    class State(models.TextChoices):
        PRESENT = "present", "Present"
        UNREACHABLE = "unreachable", "Cannot be backed up"
        GONE = "gone", "Dropped"

    server = models.ForeignKey(Server, on_delete=models.CASCADE, related_name="databases")
    name = models.CharField(max_length=63)
    protected = models.BooleanField(default=True, help_text="dumped by the server's logical backups")
    state = models.CharField(max_length=11, choices=State.choices, default=State.PRESENT)
    problem = models.CharField(max_length=500, blank=True, help_text="why it cannot be backed up")
    first_seen_at = models.DateTimeField(default=timezone.now)
    gone_at = models.DateTimeField(null=True, blank=True, verbose_name="dropped at")
    critical_tables = models.JSONField(
        default=default_critical_tables,
        blank=True,
        validators=[validate_table_list],
        help_text=(
            'Tables that must never be empty or shrink past the server\'s threshold, as a list: ["public.users", '
            '"sales.orders"]. Empty: none (every table\'s row count is compared by restore tests anyway).'
        ),
    )

    class Meta:
        ordering = ["server__name", "name"]
        constraints = [models.UniqueConstraint(fields=["server", "name"], name="database_per_server")]

    def __str__(self):
        return f"{self.server}/{self.name}"

    @classmethod
    def of_dsn(cls, server):
        """The database the server's DSN names: what a logical run is of unless told otherwise."""
        return cls.objects.get_or_create(server=server, name=server.dbname)[0]

    @property
    def is_backed_up(self):
        """Chosen and not dropped: owed good backups and passing restore tests."""
        return self.protected and self.state != self.State.GONE

    @property
    def is_gap(self):
        """Protected, still there, and yet not backed up: shown, alerted, never skipped silently."""
        return self.protected and self.state == self.State.UNREACHABLE

    def latest_good_backup(self):
        return self.runs.good().order_by("-finished_at").first()
