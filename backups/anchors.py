"""The journal's anchors in the storage locations (see backupportal/journal_anchors.py).

Registered with the journal from BackupsConfig.ready(): the journal may not import backups,
so it asks its registry, and this module answers with one anchor store per enabled location.
Written hourly (the "journal-anchors" schedule) and when a backup finishes.
"""

import logging

from django.conf import settings

from backupportal import journal
from backupportal.journal_anchors import AnchorUnreachable
from backups.models import WAL_LOCATION, StorageLocation
from backups.storage import FileStore, StorageError, store_for

log = logging.getLogger(__name__)


class LocationAnchors:
    """A storage location as the journal sees it: write an anchor once, list them all."""

    def __init__(self, location):
        self.name = location.name
        self.store = store_for(location)

    def put(self, key, data) -> bool:
        try:
            if self.store.exists(key):
                return False  # the journal has not moved since this anchor was written
            with self.store.writer(key) as out:
                out.write(data)
                out.commit()
            return True
        except (StorageError, OSError) as e:
            raise AnchorUnreachable(f"location {self.name}: {e}") from None

    def keys(self, prefix):
        try:
            return self._file_keys(prefix) if isinstance(self.store, FileStore) else self._s3_keys(prefix)
        except (StorageError, OSError) as e:
            raise AnchorUnreachable(f"location {self.name}: {e}") from None

    def _file_keys(self, prefix):
        top = self.store.path(prefix)
        if not top.is_dir():
            return []
        # Not the writers' temporary files (".NAME.partial"): only whole anchors.
        found = (p for p in top.rglob("*.json") if p.is_file() and not p.name.startswith("."))
        return [prefix + p.relative_to(top).as_posix() for p in found]

    def _s3_keys(self, prefix):
        store, keys, more = self.store, [], {}
        while True:
            # store.call turns any S3 failure into one StorageError line.
            page = store.call("list_objects_v2", Prefix=store.object_key(prefix), **more)
            keys += [o["Key"].removeprefix(store.prefix) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            more = {"ContinuationToken": page["NextContinuationToken"]}


def anchor_stores():
    """Every enabled location but the WAL archive, whose directory holds only WAL segments."""
    locations = StorageLocation.objects.filter(enabled=True).exclude(name=WAL_LOCATION).order_by("name")
    return [LocationAnchors(location) for location in locations]


def anchor_journal():
    """The hourly schedule: the journal's newest entry as an anchor in every location."""
    if not settings.JOURNAL_ANCHORS:
        return {"skipped": "JOURNAL_ANCHORS is off"}
    return journal.write_anchors()


def anchor_after_backup():
    """Called when a backup finishes; an anchor that cannot be written never fails the backup."""
    if not settings.JOURNAL_ANCHORS:
        return None
    try:
        return journal.write_anchors()
    except Exception as e:  # the backup's own outcome is what matters here; the hourly run retries
        log.warning("journal anchors not written after the backup: %s", e)
        return None
