from django.apps import AppConfig
from django.db.models.signals import post_migrate


def sync_locations(sender, **kwargs):
    from backups.models import StorageLocation

    StorageLocation.sync_from_settings()


def sync_storage_schedules(sender, **kwargs):
    from backups.tasks import ensure_storage_schedules

    ensure_storage_schedules()


class BackupsConfig(AppConfig):
    name = "backups"
    verbose_name = "Backups"

    def ready(self):
        # The locations the environment describes exist after every migrate.
        post_migrate.connect(sync_locations, sender=self, dispatch_uid="backups.sync_locations")
        # Copy retries every minute and the weekly verification: rows of django-q2's Schedule.
        post_migrate.connect(sync_storage_schedules, sender=self, dispatch_uid="backups.sync_storage_schedules")
