from django.apps import AppConfig
from django.db.models.signals import post_migrate

from backupportal.lib.sealed import create_key, key_path


def sync_locations(sender, **kwargs):
    from backups.models import LocationMoved, StorageLocation
    from backups.schedules import mend_all
    from backups.tasks import ensure_global_schedules

    try:
        StorageLocation.sync_from_settings()
    except LocationMoved as e:
        refused.append(str(e))
    ensure_global_schedules()
    # Rows written before their arguments were plain strings never ran, and rows of a server
    # renamed before schedules followed it fail: an upgrade's migrate mends them.
    mend_all()


# The settings' locations the last post_migrate kept at their address: `manage.py migrate` (ours,
# backups/management/commands/migrate.py) says them and exits 1 once every app's post_migrate ran.
refused = []


def create_secrets_key_on_migrate(sender, verbosity=1, stdout=None, **kwargs):
    """A new portal's migrate makes the key that seals passwords; a portal that has sealed ones never
    gets a new key (they would no longer open): the missing one must be put back."""
    server = kwargs.get("apps", sender.apps).get_model("backups", "Server")  # as migrated so far
    if key_path().exists() or not hasattr(server, "password_sealed"):
        return  # a key already, or a migrate that stopped short of sealed passwords
    if server.objects.exclude(password_sealed="").exists():
        return
    if create_key() and verbosity and stdout:
        stdout.write(
            f"Created the secrets key {key_path()} (mode 0600) that seals the servers' passwords: keep a copy "
            "away from the database and its backups, and copy it to every worker host"
        )


def server_names():
    """The registered servers, for the journal's server filter (the ground cannot ask us)."""
    from backups.models import Server

    return list(Server.objects.values_list("name", flat=True))


class BackupsConfig(AppConfig):
    name = "backups"
    verbose_name = "Backups"

    def ready(self):
        # The locations the environment describes exist after every migrate.
        post_migrate.connect(sync_locations, sender=self, dispatch_uid="backups.sync_locations")
        post_migrate.connect(create_secrets_key_on_migrate, sender=self, dispatch_uid="backups.secrets_key")
        # The journal (the ground) writes and reads its anchors in our locations through its registry.
        from backupportal import journal, journal_anchors
        from backups.anchors import anchor_stores

        journal_anchors.register(anchor_stores)
        journal.register_server_names(server_names)
        # A server's schedules follow it through every save, rename and delete.
        # changes: how each kind of approved change request is made (registered on import).
        # checks: registered on import, for `manage.py check --deploy`.
        from backups import binaries, changes, checks, schedules  # noqa: F401  (schedules: its signal receivers)

        binaries.warn_missing()
