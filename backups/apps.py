from django.apps import AppConfig
from django.db.models.signals import post_migrate


def sync_locations(sender, **kwargs):
    from backups.models import StorageLocation
    from backups.tasks import ensure_global_schedules

    StorageLocation.sync_from_settings()
    ensure_global_schedules()


class BackupsConfig(AppConfig):
    name = "backups"
    verbose_name = "Backups"

    def ready(self):
        # The locations the environment describes exist after every migrate.
        post_migrate.connect(sync_locations, sender=self, dispatch_uid="backups.sync_locations")
