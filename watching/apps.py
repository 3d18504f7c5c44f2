from django.apps import AppConfig
from django.db.models.signals import post_migrate


class WatchingConfig(AppConfig):
    """Watching stands on top of backups and restores: it reads their rows and alone opens alerts."""

    name = "watching"
    verbose_name = "Watching"

    def ready(self):
        from watching import monitor, tasks

        # Conditions that backups and restores record on their own rows are re-checked at once.
        monitor.listen()
        post_migrate.connect(tasks.ensure_schedules, sender=self, dispatch_uid="watching.ensure_schedules")
