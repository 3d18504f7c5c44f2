"""S3-compatible offsite storage (AWS S3, DigitalOcean Spaces, MinIO) through boto3.

S3Store has FileStore's interface. A writer streams a multipart upload, holding one part in
memory at a time, and aborts the upload on any failure, so a half-written object is never
visible. Credentials come only from boto3's own chain (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY in the environment, a profile, an instance role): never from the
database, settings or argv. Timeouts and retries are bounded so that a dead endpoint fails
a copy in seconds; the copy is then retried later by the worker.

On a location with Object Lock every object is put with its lock (mode and retain-until), and
the lock is read back from S3 before the write counts: the writer's `version_id` and
`retain_until` are what the catalog records. Reads and deletes of a catalogued copy name its
version; a delete refused by the lock is an ObjectLocked, never a credentials problem. Which
version a read by key alone gets, on a versioned bucket, is backups.s3versions'.
"""

import functools
import hashlib
import io
import re
from datetime import UTC
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url
from django.conf import settings
from django.utils import timezone
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from backupportal.lib import addresses
from backupportal.lib.redact import redact
from backups import s3uploads, s3versions
from backups.storage import MissingArtifact, ObjectLocked, StorageError, Store, safe_key

# S3 refuses parts under 5 MiB (all but the last) and more than 10,000 parts per object.
MIN_PART_SIZE = 5 * 1024 * 1024
# The part size doubles every this many parts: 8 MiB parts carry the first 8 GiB, and a
# stream of unknown length still fits in 10,000 parts up to about 8 TiB.
PARTS_PER_SIZE = 1000
# Objects written in these classes cannot be read back without a restore request, so they
# could neither be verified weekly nor restored from in an emergency.
UNREADABLE_STORAGE_CLASSES = {"GLACIER", "DEEP_ARCHIVE"}
SSE_CHOICES = {"AES256", "aws:kms", "aws:kms:dsse"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchVersion"}
_BAD_CREDENTIALS = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}


@functools.lru_cache(maxsize=16)
def _client(endpoint_url, region, addressing_style, connect_timeout, read_timeout, max_attempts, direct=False):
    # A session per client: boto3's default session is not thread-safe, clients are.
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        s3={"addressing_style": addressing_style},
        # An endpoint typed in the admin is reached directly, never through HTTPS_PROXY: the proxy
        # would resolve and connect where the connection guard cannot see.
        proxies={} if direct else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
    )


STORAGE_HOSTS = addresses.Policy("STORAGE_ALLOWED_HOSTS", "no storage location")
# A bucket name, not an ARN (an access point's ARN makes botocore connect to a host of its own,
# <name>-<account>.<endpoint host>, which the guard of the endpoint does not cover). Older
# buckets may hold capitals and underscores.
BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
# What a typed endpoint may not hold: where two URL parsers disagree on the host (urllib3 stops at
# a backslash, urlsplit at the last @), a user:password, a query, a zone (%), blanks.
_NOT_IN_ENDPOINT = set("\\@?#% \t\r\n") | {chr(c) for c in range(32)} | {chr(127)}


def endpoint_refusal(endpoint_url):
    """'' when the worker may send a location's requests (signed with the S3 credentials) to
    `endpoint_url`; else one line saying why not (backupportal.lib.addresses). AWS itself (no
    endpoint) and the environment's S3_ENDPOINT_URL, set by whoever runs the portal, are
    allowed; another endpoint inside the portal's network must be listed in STORAGE_ALLOWED_HOSTS.
    The line never repeats the URL: it may hold what was typed as a password."""
    if not endpoint_url or _same_endpoint(endpoint_url, settings.S3_ENDPOINT_URL):
        return ""
    host = endpoint_host(endpoint_url)
    if host is None:
        return (
            "refused: the endpoint URL must be scheme://host[:port][/path], with no user, password, query,"
            " backslash or blank: type it again"
        )
    return STORAGE_HOSTS.refusal(host)


def endpoint_host(endpoint_url):
    """The endpoint's host, when urlsplit and urllib3 (which botocore connects with) read the
    same host and port from it and it holds nothing else; None otherwise."""
    if any(char in _NOT_IN_ENDPOINT for char in endpoint_url):
        return None
    try:
        split, parsed = urlsplit(endpoint_url), parse_url(endpoint_url)
        port = split.port
    except (ValueError, LocationParseError):
        return None
    host = (split.hostname or "").lower()
    if split.scheme not in ("http", "https") or not host or (parsed.host or "").lower().strip("[]") != host:
        return None
    if not (is_valid_endpoint_url(endpoint_url) or is_valid_ipv6_endpoint_url(endpoint_url)):
        return None  # botocore would refuse it with a traceback at every use
    return host if parsed.port == port else None


def bucket_refusal(bucket):
    """'' for a bucket name; else one line (an ARN, a path)."""
    if BUCKET_NAME.match(bucket or ""):
        return ""
    return "refused: the bucket must be a bucket's name (letters, digits, dots, hyphens), not an ARN or a path"


def _same_endpoint(one, other):
    def parts(url):
        split = urlsplit(url)
        return split.scheme.lower(), (split.hostname or "").rstrip("."), split.port, split.path.rstrip("/")

    try:
        return bool(other) and endpoint_host(one) is not None and parts(one) == parts(other)
    except ValueError:
        return False


class RefusedClient:
    """The client of a location whose endpoint is refused: every request is a StorageError."""

    def __init__(self, why):
        self.why = why

    def __getattr__(self, name):
        raise StorageError(self.why)


def _version(version):
    return {"VersionId": version} if version else {}


class S3Store(Store):
    """An S3-compatible location: bucket, prefix, endpoint and options from its StorageLocation."""

    def __init__(self, location):
        super().__init__(location)
        self.bucket = location.bucket
        prefix = location.prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint = location.endpoint_url or "AWS S3"
        refused = endpoint_refusal(location.endpoint_url) or bucket_refusal(location.bucket)
        if refused:  # saved before the rule, or its name resolves elsewhere now: nothing is sent
            self.client = RefusedClient(f"storage location {location.name}: {refused}")
            return
        typed = bool(location.endpoint_url) and not _same_endpoint(location.endpoint_url, settings.S3_ENDPOINT_URL)
        if typed:
            # Checked again on every connection, whichever thread makes it (a name that resolves
            # inside the network later gains nothing).
            split = urlsplit(location.endpoint_url)
            port = split.port or (443 if split.scheme == "https" else 80)
            addresses.guard_host(endpoint_host(location.endpoint_url), port, STORAGE_HOSTS)
        try:
            self.client = self._make_client(location, typed)
        except (ValueError, BotoCoreError) as e:  # a region botocore refuses, say
            self.client = RefusedClient(redact(f"storage location {location.name}: its S3 settings are refused ({e})"))

    @staticmethod
    def _make_client(location, typed):
        # MinIO and most S3-compatible services want path-style URLs; AWS prefers virtual hosts.
        return _client(
            location.endpoint_url,
            location.region,
            "path" if location.endpoint_url else "auto",
            settings.S3_CONNECT_TIMEOUT,
            settings.S3_READ_TIMEOUT,
            settings.S3_MAX_ATTEMPTS,
            typed,
        )

    def object_key(self, key) -> str:
        return self.prefix + safe_key(key)

    def uri(self, key) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def object_options(self) -> dict:
        options = {}
        if self.location.sse:
            options["ServerSideEncryption"] = self.location.sse
        if self.location.storage_class:
            options["StorageClass"] = self.location.storage_class
        return options

    def call(self, operation, **kwargs):
        """One S3 API call; any failure becomes a StorageError with one line saying what to do."""
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self.error(e, operation, kwargs.get("Key")) from None

    def error(self, e, operation, key=None):
        where = f"s3://{self.bucket}" + (f"/{key}" if key else "")
        if isinstance(e, NoCredentialsError):
            return StorageError(
                f"no S3 credentials for location {self.location.name}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY in the worker's environment (or give it an instance role)"
            )
        refused = addresses.refusal_in(e)
        if refused is not None:  # the connection guard's: where it would have gone, and what to do
            return StorageError(f"storage location {self.location.name}: {refused}")
        if not isinstance(e, ClientError):
            return StorageError(
                redact(
                    f"cannot reach the S3 endpoint {self.endpoint} ({operation} {where}): {e}: "
                    "check the endpoint URL and the network to it"
                )
            )
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500:
            # Still failing after boto3's own retries: the provider's fault, not the artifact's.
            return StorageError(
                redact(
                    f"the S3 endpoint {self.endpoint} answered {status} {code} to {operation} of {where}: "
                    "a fault at the storage provider; try again later and check its status page if it lasts"
                )
            )
        if code == "NoSuchBucket" or (code in _NOT_FOUND and key is None):
            return StorageError(
                f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}: create it, or correct the "
                f"bucket of storage location {self.location.name}"
            )
        if code in _NOT_FOUND:
            return MissingArtifact(f"{where} is missing from location {self.location.name}")
        if code in _BAD_CREDENTIALS:
            return StorageError(
                f"S3 refused access to {where} ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "in the worker's environment and the bucket's policy"
            )
        message = e.response.get("Error", {}).get("Message", "")
        return StorageError(redact(f"S3 {operation} of {where} failed: {code} {message}".strip()))

    def check(self):
        """Is the bucket there and ours to use (and, for a locked location, does it have Object
        Lock)? A StorageError with one line when not."""
        self.call("head_bucket")
        if self.location.locked:
            self.check_object_lock()

    def check_object_lock(self):
        try:
            config = self.call("get_object_lock_configuration")["ObjectLockConfiguration"]
        except StorageError as e:
            if "ObjectLockConfigurationNotFound" not in str(e):
                raise
            config = {}
        if config.get("ObjectLockEnabled") != "Enabled":
            raise StorageError(
                f"S3 bucket {self.bucket!r} does not have Object Lock enabled, which the {self.location.lock_mode} "
                f"lock of location {self.location.name} needs: enable it on the bucket (versioning on, then "
                "put-object-lock-configuration), use a bucket created with it, or set the location's lock to none"
            )

    def lock_options(self) -> dict:
        until = self.location.retain_until(timezone.now())
        if until is None:
            return {}
        return {"ObjectLockMode": self.location.lock_mode.upper(), "ObjectLockRetainUntilDate": until}

    def lock_of(self, key, version):
        """The lock S3 holds one version under, read back by head_object: {"mode", "retain_until"};
        mode "" and retain_until None when the version is not locked."""
        head = self.call("head_object", Key=self.object_key(key), **_version(version))
        until = head.get("ObjectLockRetainUntilDate")
        return {"mode": head.get("ObjectLockMode", ""), "retain_until": until.astimezone(UTC) if until else None}

    def writer(self, key):
        return S3Writer(self, self.object_key(key))

    def open(self, key, version=""):
        """A streaming GET (of one version, when given): a file-like object read in chunks.

        Read by key alone (a WAL key file: no catalogued version) from a versioned bucket, the
        version read is backups.s3versions': past a delete marker, and past a newer version without
        a lock put over a locked one.
        """
        if version:
            return self._get(key, version)
        try:
            response = self.call("get_object", Key=self.object_key(key))
        except MissingArtifact:
            # A fresh portal's location may not say it locks yet: the bucket's versioning does.
            survivor = self.surviving_version(key) if self.location.locked or self.versioned() else ""
            if not survivor:
                raise
            return self._get(key, survivor)
        newest = response.get("VersionId") or "null"
        if newest == "null" or response.get("ObjectLockMode"):
            return S3Body(self, response["Body"], self.object_key(key))  # no versions, or a locked one
        chosen = self.surviving_version(key)
        if chosen in ("", newest):
            return S3Body(self, response["Body"], self.object_key(key))
        response["Body"].close()
        return self._get(key, chosen)

    def _get(self, key, version):
        response = self.call("get_object", Key=self.object_key(key), VersionId=version)
        return S3Body(self, response["Body"], self.object_key(key))

    def surviving_version(self, key) -> str:
        """The version of `key` to read by key alone (backups.s3versions); "" when none is an object."""
        return s3versions.to_read(self, key)

    def exists(self, key, version="") -> bool:
        try:
            self.call("head_object", Key=self.object_key(key), **_version(version))
        except MissingArtifact:
            return False
        return True

    def list(self, prefix=""):
        """The keys (without the location's prefix) of every object under `prefix`, page by page."""
        token = {}
        while True:
            page = self.call("list_objects_v2", Prefix=self.prefix + prefix, **token)
            for item in page.get("Contents", []):
                yield item["Key"].removeprefix(self.prefix)
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def versioned(self) -> bool:
        # Credentials without s3:GetBucketVersioning read the bucket as unversioned: by key.
        try:
            return self.call("get_bucket_versioning").get("Status") == "Enabled"
        except StorageError:
            return False

    def _keeps_versions(self) -> bool:
        """Versioning on, or suspended (which keeps the versions made before); read as off where
        the credentials may not ask (s3:GetBucketVersioning), as versioned() reads it."""
        try:
            return self.call("get_bucket_versioning").get("Status") in ("Enabled", "Suspended")
        except StorageError:
            return False

    def surviving(self, prefix="", page_size=1000):
        """{key: [Version, in the order to read them]} of what a rebuilt catalog may read under
        `prefix` (backups.s3versions): every version of each object list() shows, and of each one
        hidden by a delete marker whose versions S3 still locks."""
        return s3versions.surviving(self, prefix, page_size)

    def delete(self, key, version=""):
        """Delete an object, or one version of it. By key alone, a versioned bucket only puts a
        delete marker in front of it; a version still locked raises ObjectLocked."""
        # Deleting a key that is not there succeeds in S3: deletion is idempotent.
        try:
            self.call("delete_object", Key=self.object_key(key), **_version(version))
        except StorageError:
            lock = self.lock_of(key, version) if version else None
            if lock and lock["retain_until"] and lock["retain_until"] > timezone.now():
                raise ObjectLocked(
                    f"{self.uri(key)} version {version} is locked ({lock['mode']}) until "
                    f"{lock['retain_until']:%Y-%m-%d %H:%M} UTC by S3 Object Lock in location {self.location.name}: "
                    "it can be deleted after then, not before",
                    lock["retain_until"],
                ) from None
            raise

    def remove_copy(self, key, version=""):
        """Delete a catalogued copy. On a bucket that keeps versions (versioning on, or suspended),
        every version of its key goes, then the delete markers in front of them: the catalogued
        version alone left the "null" one of a copy put before versioning was on, for ever. A
        version S3 still locks is never forced (no governance bypass): ObjectLocked once the
        others went, its delete markers left in place, and the deletion waits for the lock."""
        if not self._keeps_versions():
            return self.delete(key, version)
        versions, markers = s3versions.every_version(self, key)
        locked = []
        for version_id in versions:
            try:
                self.delete(key, version_id)
            except ObjectLocked as e:
                locked.append(e)
        if locked:
            raise max(locked, key=lambda e: e.retain_until)
        for marker in markers:
            self.delete(key, marker)

    def remove_leftovers(self) -> int:
        """Abort the stale multipart uploads of killed copies under the prefix (backups.s3uploads)."""
        return s3uploads.abort_stale(self)

    def usage(self):
        """(free, total) against the configured capacity; None when the bucket is unbounded."""
        if not self.location.capacity_bytes:
            return None
        return self.capacity_left(), self.location.capacity_bytes


class S3Body(io.IOBase):
    """A GET's body as a binary file: read(n), close(), a context manager; errors as StorageError."""

    def __init__(self, store, body, object_key):
        super().__init__()
        self.store, self.body, self.object_key = store, body, object_key

    def read(self, n=-1):
        try:
            return self.body.read(n if n and n > 0 else None)
        except (BotoCoreError, OSError) as e:
            raise self.store.error(e, "get_object", self.object_key) from None

    def close(self):
        self.body.close()
        super().close()


class S3Writer:
    """write(chunk) / commit() -> (size, sha256) / abort(), like AtomicWriter.

    Small objects go up in one PUT at commit. Past the multipart threshold, each full part
    is uploaded as soon as it is buffered, so memory holds one part whatever the file's size.
    """

    def __init__(self, store, object_key):
        self.store, self.object_key = store, object_key
        self.threshold = settings.S3_MULTIPART_THRESHOLD
        self.base_part_size = max(settings.S3_PART_SIZE, MIN_PART_SIZE)
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.buffer = bytearray()
        self.upload_id = None
        self.parts = []
        self.done = False
        self.capacity_left = store.capacity_left()
        self.lock = store.lock_options()  # fixed when the upload starts, like its retain-until
        # After commit: the version S3 made (on a versioned bucket) and the retain-until S3 holds it under.
        self.version_id, self.retain_until = "", None

    def write(self, chunk: bytes):
        if self.capacity_left is not None and self.size + len(chunk) > self.capacity_left:
            raise StorageError(
                f"location {self.store.location.name} reached its configured capacity: raise it in the admin or free space"
            )
        self.sha256.update(chunk)
        self.size += len(chunk)
        self.buffer += chunk
        if len(self.buffer) >= max(self.threshold, self.part_size) or (
            self.upload_id and len(self.buffer) >= self.part_size
        ):
            self._upload_parts(final=False)

    @property
    def part_size(self):
        return self.base_part_size * 2 ** (len(self.parts) // PARTS_PER_SIZE)

    def _upload_parts(self, final):
        if self.upload_id is None:
            response = self.store.call(
                "create_multipart_upload", Key=self.object_key, **self.store.object_options(), **self.lock
            )
            self.upload_id = response["UploadId"]
            s3uploads.in_progress.add(self.upload_id)  # retention leaves it alone while this process writes
        while len(self.buffer) >= self.part_size or (final and self.buffer):
            with memoryview(self.buffer) as view:
                body = bytes(view[: self.part_size])  # one copy, not a slice and then a copy
            del self.buffer[: self.part_size]
            number = len(self.parts) + 1
            response = self.store.call(
                "upload_part", Key=self.object_key, UploadId=self.upload_id, PartNumber=number, Body=body
            )
            self.parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def commit(self):
        if self.upload_id is None and self.size < self.threshold:
            # boto3 sends a checksum with the PUT, which S3 requires of an upload with a lock.
            response = self.store.call(
                "put_object",
                Key=self.object_key,
                Body=bytes(self.buffer),
                **self.store.object_options(),
                **self.lock,
            )
        else:
            self._upload_parts(final=True)
            response = self.store.call(
                "complete_multipart_upload",
                Key=self.object_key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        self.done = True
        s3uploads.in_progress.discard(self.upload_id)
        self.buffer = bytearray()
        self.version_id = response.get("VersionId", "")
        if self.lock:
            self._confirm_lock()
        return self.size, self.sha256.hexdigest()

    def _confirm_lock(self):
        """Read the lock back: a copy counts as locked only when S3 says so. A service that took
        the lock headers of a multipart upload without applying them (moto does) gets the
        retention set on the version itself."""
        key = self.object_key.removeprefix(self.store.prefix)
        where = f"{self.store.uri(key)} in location {self.store.location.name}"
        if not self.version_id:
            raise StorageError(
                f"S3 made no version of {where}, which is set to lock its objects: is Object Lock enabled on the bucket?"
            )
        lock = self.store.lock_of(key, self.version_id)
        if lock["retain_until"] is None:
            retention = {"Mode": self.lock["ObjectLockMode"], "RetainUntilDate": self.lock["ObjectLockRetainUntilDate"]}
            self.store.call("put_object_retention", Key=self.object_key, VersionId=self.version_id, Retention=retention)
            lock = self.store.lock_of(key, self.version_id)
        if lock["retain_until"] is None:
            raise StorageError(f"S3 did not lock {where}: check that the bucket has Object Lock enabled")
        self.retain_until = lock["retain_until"]

    @property
    def multipart(self):
        return self.upload_id is not None

    def abort(self):
        """Drop the upload: S3 keeps no object and discards the parts sent so far."""
        self.buffer = bytearray()
        if self.upload_id is not None and not self.done:
            try:
                self.store.call("abort_multipart_upload", Key=self.object_key, UploadId=self.upload_id)
            except StorageError:
                # The endpoint is gone too: the parts stay invisible (never an object) until the
                # bucket's lifecycle rule for incomplete uploads removes them.
                pass
        s3uploads.in_progress.discard(self.upload_id)
        self.done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.done:
            self.abort()
        return False


def check_options(location):
    """Static checks of an S3 location's fields (no network): a ValidationError naming the field."""
    from django.core.exceptions import ValidationError

    if location.sse and location.sse not in SSE_CHOICES:
        raise ValidationError(
            {"sse": f"Unknown server-side encryption {location.sse!r}: use AES256 or aws:kms, or leave it empty."}
        )
    if location.storage_class.upper() in UNREADABLE_STORAGE_CLASSES:
        raise ValidationError(
            {
                "storage_class": f"{location.storage_class} objects cannot be read without a restore request, so "
                "they could not be verified or restored from: use STANDARD_IA or GLACIER_IR."
            }
        )
    if location.endpoint_url and not location.endpoint_url.startswith(("https://", "http://")):
        raise ValidationError(
            {"endpoint_url": "The endpoint URL must start with https:// (or http:// for a local test)."}
        )
    # A name that does not resolve from here is let through: it is checked again on every use.
    refused = endpoint_refusal(location.endpoint_url)
    if refused:
        raise ValidationError({"endpoint_url": refused})
    refused = bucket_refusal(location.bucket)
    if refused:
        raise ValidationError({"bucket": refused})
