"""Django's migrate, and then what the settings could not change: a storage location that holds
copies keeps its address (backups.models.StorageLocation.sync_from_settings), and migrate exits
1 saying so, after every app's post_migrate ran (raising in one would skip the apps after it)."""

from django.core.management.base import CommandError
from django.core.management.commands.migrate import Command as DjangoMigrate

from backups import apps


class Command(DjangoMigrate):
    def handle(self, *args, **options):
        apps.refused.clear()  # a flush in this process (tests) may have left some unsaid
        super().handle(*args, **options)
        if apps.refused:
            said = "; ".join(apps.refused)
            apps.refused.clear()
            raise CommandError(f"Settings: {said}.")
