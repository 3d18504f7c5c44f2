"""Unfinished multipart uploads of an S3 location: what a copy killed mid-upload leaves.

Such an upload is never an object (nothing lists or reads it as a copy), but S3 keeps and bills
its parts until it is aborted. Retention aborts the location's own (under its prefix, never
another's) once stale: started S3_STALE_UPLOAD_AGE ago with no part sent for as long, and not
being written by this process. A bucket's lifecycle rule (AbortIncompleteMultipartUpload, see
the README) catches what the portal cannot reach.
"""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

# Upload ids this process's S3Writers are writing now (backups.s3): never aborted here.
in_progress = set()


def abort_stale(store, now=None) -> int:
    """Abort the stale multipart uploads under `store`'s prefix; how many."""
    now = now or timezone.now()
    age = timedelta(seconds=settings.S3_STALE_UPLOAD_AGE)
    aborted = 0
    for upload in list(_uploads(store)):
        if upload["UploadId"] in in_progress or now - upload["Initiated"] < age:
            continue
        if any(now - part["LastModified"] < age for part in _parts(store, upload)):
            continue  # a worker elsewhere is still sending it
        store.call("abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])
        aborted += 1
    return aborted


def _uploads(store):
    marker = {}
    while True:
        page = store.call("list_multipart_uploads", Prefix=store.prefix, **marker)
        yield from (u for u in page.get("Uploads", []) if u["Key"].startswith(store.prefix))
        if not page.get("IsTruncated"):
            return
        marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def _parts(store, upload):
    marker = {}
    while True:
        page = store.call("list_parts", Key=upload["Key"], UploadId=upload["UploadId"], **marker)
        yield from page.get("Parts", [])
        if not page.get("IsTruncated"):
            return
        marker = {"PartNumberMarker": page["NextPartNumberMarker"]}
