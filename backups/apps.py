from django.apps import AppConfig
from django.db.models.signals import post_migrate


def sync_locations(sender, **kwargs):
    from backups.models import BackupSchedule, StorageLocation
    from backups.tasks import ensure_global_schedules, sync_schedule

    StorageLocation.sync_from_settings()
    ensure_global_schedules()
    # Rows written before their arguments were plain strings never ran: an upgrade's migrate mends them.
    for schedule in BackupSchedule.objects.select_related("server"):
        sync_schedule(schedule)


class BackupsConfig(AppConfig):
    name = "backups"
    verbose_name = "Backups"

    def ready(self):
        # The locations the environment describes exist after every migrate.
        post_migrate.connect(sync_locations, sender=self, dispatch_uid="backups.sync_locations")
