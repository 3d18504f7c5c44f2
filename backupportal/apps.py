from django.apps import AppConfig
from django.db.models.signals import post_migrate


class BackupportalConfig(AppConfig):
    name = "backupportal"
    verbose_name = "Operations"

    def ready(self):
        from backupportal import roles, signals  # noqa: F401  (signals registers its receivers)

        # New models bring new view permissions: keep the groups exact after every migrate.
        post_migrate.connect(roles.sync_groups, sender=self, dispatch_uid="backupportal.sync_groups")
