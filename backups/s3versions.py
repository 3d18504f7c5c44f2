"""Which version of an S3 object to read on a versioned bucket (as Object Lock makes it).

Object Lock stops a locked version from being deleted or changed, not from being hidden: anyone
with the portal's S3 keys can put a newer version over it (s3:PutObject), or a delete marker in
front of it. A catalogued copy is read by the version it recorded (backups.s3). What is read by
key alone (a WAL key file; everything a rebuilt catalog reads) is read in this order: the
versions that carry a lock first, then the others, newest first within each. The portal puts
every object of a locked location with its lock, so a newer version without one is someone
else's. A reader that can check what it reads (a manifest's signature, an artifact's sha256:
backups.rebuild) tries them in turn and takes the first that checks out.
"""

from datetime import datetime
from typing import NamedTuple

from django.utils import timezone


class Version(NamedTuple):
    """One version of an object as list_object_versions gives it."""

    id: str
    size: int
    rank: int  # 0 for the newest version of its key, 1 for the one before, ...
    # S3's Object Lock on it (an expired one too), read by head_object only where versions compete.
    retain_until: datetime | None = None

    @property
    def locked(self) -> bool:
        return self.retain_until is not None


def listed(store, prefix, page_size=1000):
    """({key: [Version, newest first]}, {keys whose newest entry is a delete marker}) under `prefix`."""
    found, hidden, page_at = {}, set(), {}
    while True:
        page = store.call("list_object_versions", Prefix=store.prefix + prefix, MaxKeys=page_size, **page_at)
        for version in page.get("Versions", []):
            found.setdefault(version["Key"].removeprefix(store.prefix), []).append(version)
        hidden |= {m["Key"].removeprefix(store.prefix) for m in page.get("DeleteMarkers", []) if m["IsLatest"]}
        if not page.get("IsTruncated"):
            break
        page_at = {"KeyMarker": page["NextKeyMarker"], "VersionIdMarker": page["NextVersionIdMarker"]}
    return {key: _newest_first(versions) for key, versions in found.items()}, hidden


def _newest_first(versions):
    # S3 lists a key's versions newest first; LastModified has whole seconds, so it only breaks no tie.
    ordered = sorted(versions, key=lambda v: v["LastModified"], reverse=True)
    return [Version(v["VersionId"], v["Size"], rank) for rank, v in enumerate(ordered)]


def reading_order(store, key, versions, hidden=False):
    """`versions` of `key` in the order to read them (see the module's docstring). Behind a delete
    marker (`hidden`), none unless S3 still locks one of them: an unlocked object behind a marker
    was deleted (by the portal's retention or pruning, or anyone) and stays deleted; a locked one
    was hidden by someone else, as the portal deletes a locked copy by version."""
    if len(versions) == 1 and not hidden:
        return versions  # nothing competes: no lock to ask for
    versions = [v._replace(retain_until=store.lock_of(key, v.id)["retain_until"]) for v in versions]
    now = timezone.now()
    if hidden and not any(v.locked and v.retain_until > now for v in versions):
        return []
    return sorted(versions, key=lambda v: not v.locked)  # stable: newest first within each


def surviving(store, prefix="", page_size=1000):
    """{key: [Version, in reading order]} of what a rebuilt catalog may read under `prefix`: every
    object list() shows, and each one hidden by a delete marker that S3 still locks a version of."""
    found, hidden = listed(store, prefix, page_size)
    ordered = {key: reading_order(store, key, versions, key in hidden) for key, versions in found.items()}
    return {key: versions for key, versions in ordered.items() if versions}


def to_read(store, key) -> str:
    """The version of `key` to read by key alone: the first in reading order, behind a delete
    marker too; "" when the key has no version that is an object."""
    versions = listed(store, key)[0].get(key, [])
    return reading_order(store, key, versions)[0].id if versions else ""


def every_version(store, key, page_size=1000):
    """(version ids, delete marker ids) of exactly `key`, "null" included: the object put before
    the bucket's versioning was turned on, which outlives every deletion but one that names it."""
    object_key, versions, markers, page_at = store.object_key(key), [], [], {}
    while True:
        page = store.call("list_object_versions", Prefix=object_key, MaxKeys=page_size, **page_at)
        versions += [v["VersionId"] for v in page.get("Versions", []) if v["Key"] == object_key]
        markers += [m["VersionId"] for m in page.get("DeleteMarkers", []) if m["Key"] == object_key]
        if not page.get("IsTruncated"):
            return versions, markers
        page_at = {"KeyMarker": page["NextKeyMarker"], "VersionIdMarker": page["NextVersionIdMarker"]}
