from django.apps import AppConfig
from django.conf import settings
from django.db.models.signals import post_migrate


class BackupportalConfig(AppConfig):
    name = "backupportal"
    verbose_name = "Operations"

    def ready(self):
        # logins, signals and twofactor register receivers.
        from backupportal import logins, roles, signals, twofactor  # noqa: F401

        # New models bring new view permissions: keep the groups exact after every migrate.
        post_migrate.connect(roles.sync_groups, sender=self, dispatch_uid="backupportal.sync_groups")
        post_migrate.connect(create_journal_key, sender=self, dispatch_uid="backupportal.create_journal_key")


def create_journal_key(sender, using="default", verbosity=1, stdout=None, **kwargs):
    """The first migrate of a new portal makes the journal's key; nothing else ever does."""
    from backupportal import journal

    if journal.create_key_on_first_migrate(using) and verbosity and stdout:
        stdout.write(
            f"Created the journal key {settings.JOURNAL_KEY_FILE} (mode 0600): keep a copy away from "
            "the database and its backups, and copy it to every worker host"
        )
