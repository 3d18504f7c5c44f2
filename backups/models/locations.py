"""Storage locations: the primary directory, the WAL archive, a NAS mirror, S3-compatible storage."""

import os
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from backups.models.servers import name_validator
from backups.storage import check_storage_path, store_for

# The name of the primary location that holds the WAL archive (WAL_ROOT).
WAL_LOCATION = "wal"


class StorageLocation(models.Model):
    """Where artifacts are kept: the primary directory, a NAS mirror, S3-compatible storage."""

    class Kind(models.TextChoices):
        PRIMARY = "primary", "Primary (local)"
        NAS = "nas", "NAS mirror"
        S3 = "s3", "S3-compatible offsite"

    class LockMode(models.TextChoices):
        # S3 Object Lock: governance may be lifted by an account holding s3:BypassGovernanceRetention
        # (never the portal); compliance by nobody, the root account included, until it expires.
        NONE = "none", "No lock"
        GOVERNANCE = "governance", "Governance"
        COMPLIANCE = "compliance", "Compliance"

    # Restores read the first healthy copy in this order.
    READ_ORDER = {Kind.PRIMARY: 0, Kind.NAS: 1, Kind.S3: 2}
    # The strategy's alert condition: less than 20% free.
    LOW_FREE = 0.20
    # The dashboard's amber, on the way there. A constant of its own: 1.5 * 0.20 is a hair over
    # 0.30 in floating point, which made exactly 30% free amber.
    WARN_FREE = 0.30

    name = models.CharField(max_length=63, unique=True, validators=[name_validator])
    kind = models.CharField(max_length=7, choices=Kind.choices)
    path = models.CharField(
        max_length=500,
        blank=True,
        help_text="Filesystem locations: a directory under BACKUP_ROOT, WAL_ROOT or NAS_ROOT.",
    )
    bucket = models.CharField(max_length=255, blank=True)
    prefix = models.CharField(max_length=255, blank=True)
    endpoint_url = models.CharField(max_length=255, blank=True, verbose_name="endpoint URL")
    region = models.CharField(max_length=64, blank=True)
    sse = models.CharField("server-side encryption", max_length=32, blank=True)
    storage_class = models.CharField(max_length=32, blank=True)
    capacity_bytes = models.BigIntegerField(
        verbose_name="capacity (bytes)",
        null=True,
        blank=True,
        help_text="The space the portal may use here; counted against the 20% free rule.",
    )
    lock_mode = models.CharField(
        "object lock",
        max_length=10,
        choices=LockMode.choices,
        default=LockMode.NONE,
        db_default=LockMode.NONE,
        help_text="S3 only: every object the portal puts here is locked (write once, read many) for the lock days.",
    )
    lock_days = models.PositiveIntegerField(
        "lock days", default=0, db_default=0, help_text="How long each object stays locked after it is written."
    )
    enabled = models.BooleanField(default=True)

    # A lock longer than this is a typo (or a bill for a century of storage).
    MAX_LOCK_DAYS = 3650
    # Shortening is a destructive change (models.holds.ChangeRequest): a weaker mode or fewer days.
    LOCK_STRENGTH = {LockMode.NONE: 0, LockMode.GOVERNANCE: 1, LockMode.COMPLIANCE: 2}
    # The fields that say where a location's data is: copies are catalogued by key relative to it,
    # so a new address leaves every one of them out of reach (the location is retired in effect)
    # and sends new copies and anchors wherever it now points.
    ADDRESS = ("kind", "path", "bucket", "prefix", "endpoint_url", "region")

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def clean(self):
        self.clean_lock()
        if self.kind == self.Kind.S3:
            if not self.bucket:
                raise ValidationError({"bucket": "An S3 location needs a bucket name."})
            from backups.s3 import check_options  # boto3 is loaded only where an S3 location is used

            check_options(self)
            self.check_apart_in_s3()
            return
        if not self.path:
            raise ValidationError({"path": "A filesystem location needs a directory path."})
        check_storage_path(self.path)
        if self.kind == self.Kind.NAS:
            self.check_apart()

    def nested(self):
        """{key prefix: location} of the other locations whose directories lie inside this one
        (WAL_ROOT under BACKUP_ROOT by default): their keys in this tree are theirs."""
        if self.kind == self.Kind.S3 or not self.path:
            return {}
        mine = Path(self.path).resolve()
        inside = {}
        for other in StorageLocation.objects.exclude(pk=self.pk).exclude(kind=self.Kind.S3).exclude(path=""):
            theirs = Path(other.path).resolve()
            if mine in theirs.parents:
                inside[theirs.relative_to(mine).as_posix() + "/"] = other
        return inside

    def check_apart(self):
        """A NAS location in a directory of its own: at another location's path, a copy made there
        is the other's file under the same key (the copy found it "already there", removed it as a
        leftover, and the only copy was gone); inside a primary location (or around it) its keys
        and the primary's share one tree. NAS locations side by side under NAS_ROOT are apart."""
        mine = Path(self.path).resolve()
        others = StorageLocation.objects.exclude(pk=self.pk).exclude(kind=self.Kind.S3).exclude(path="")
        for other in others:
            theirs = Path(other.path).resolve()
            nested = theirs in mine.parents or mine in theirs.parents
            if mine == theirs or (nested and other.kind == self.Kind.PRIMARY):
                raise ValidationError(
                    {
                        "path": f"{self.path} overlaps location {other.name} ({other.path}): a copy in one would be "
                        "taken for the other's; give the NAS a directory of its own, outside the primary locations"
                    }
                )

    def check_apart_in_s3(self):
        """An S3 location in a place of its own: another location on the same bucket and endpoint
        whose prefix is this one's, or holds it, shares its keys. Found by a probe: the second one's
        copy found the first's object "already there", removed it as a leftover, then failed its own
        write, and the first's copy stayed catalogued good over nothing (check_apart, for S3)."""

        def place(location):
            return location.endpoint_url.strip().rstrip("/").lower(), location.prefix.strip("/")

        endpoint, prefix = place(self)
        for other in StorageLocation.objects.exclude(pk=self.pk).filter(kind=self.Kind.S3, bucket=self.bucket):
            their_endpoint, theirs = place(other)
            nested = (
                not prefix
                or not theirs
                or f"{prefix}/".startswith(f"{theirs}/")
                or f"{theirs}/".startswith(f"{prefix}/")
            )
            if their_endpoint == endpoint and nested:
                raise ValidationError(
                    {
                        "prefix": f"s3://{self.bucket}/{self.prefix} overlaps location {other.name} ({other.address()}): "
                        "a copy in one would be taken for the other's; give it a prefix of its own, beside the other's"
                    }
                )

    def clean_lock(self):
        if self.lock_mode == self.LockMode.NONE:
            if self.lock_days:
                raise ValidationError(
                    {"lock_days": "Lock days without a lock mode: choose governance or compliance, or set 0."}
                )
            return
        if self.kind != self.Kind.S3:
            raise ValidationError(
                {"lock_mode": "Object Lock is an S3 feature: set the lock on an S3 location, or choose no lock."}
            )
        if not 1 <= self.lock_days <= self.MAX_LOCK_DAYS:
            raise ValidationError(
                {"lock_days": f"A locked location needs between 1 and {self.MAX_LOCK_DAYS} lock days."}
            )

    @property
    def locked(self) -> bool:
        return self.lock_mode != self.LockMode.NONE

    def retain_until(self, now):
        """The retain-until date of an object written `now`, or None when the location does not lock."""
        return now + timedelta(days=self.lock_days) if self.locked else None

    def shortens_lock(self, mode, days) -> bool:
        """Would changing the lock to (mode, days) protect what is written from now on for less,
        in strength or in time? Compliance for 1 day after governance for 30 is shorter: each
        weakening asks for a second person, whatever else the change makes stronger."""
        if not self.locked:
            return False
        return self.LOCK_STRENGTH[mode] < self.LOCK_STRENGTH[self.lock_mode] or days < self.lock_days

    @property
    def read_order(self):
        return self.READ_ORDER[self.kind]

    def usage(self):
        """(free bytes, total bytes), or None where it cannot be told (S3 without a configured capacity)."""
        return store_for(self).usage()

    def catalogued_bytes(self) -> int:
        """What the catalog says the portal keeps here (copies not yet deleted)."""
        return self.copies.kept().aggregate(n=models.Sum("size"))["n"] or 0

    def health(self):
        """Free space for the dashboard: red under the strategy's 20%, amber under 30%."""
        figure = {"location": self, "free": None, "total": None, "ratio": None, "colour": "grey", "error": ""}
        try:
            usage = self.usage()
        except OSError as e:
            return figure | {"colour": "red", "error": f"cannot read its free space: {e}"}
        if not usage or not usage[1]:
            return figure
        free, total = usage
        ratio = free / total
        colour = "red" if ratio < self.LOW_FREE else "amber" if ratio < self.WARN_FREE else "green"
        return figure | {"free": free, "total": total, "ratio": ratio, "colour": colour}

    @classmethod
    def check_storage(cls):
        """Measure every location's free space: one dict per location ("ok": not under LOW_FREE).

        Filesystem locations count their filesystem (or their configured capacity); an S3 bucket
        counts only against a configured capacity, and is otherwise unbounded. A location whose
        free space cannot be read says why ("error"). The monitor turns these into storage_low.
        """
        results = []
        for location in cls.objects.all():
            figure = (
                location.health() if location.enabled else {"free": None, "total": None, "ratio": None, "error": ""}
            )
            ratio = figure["ratio"]
            ok = not figure["error"] and (ratio is None or ratio >= cls.LOW_FREE)
            free_pct = round(100 * ratio, 1) if ratio is not None else None
            results.append(
                {"location": location.name, "free": figure["free"], "total": figure["total"], "free_pct": free_pct}
                | {"ok": ok, "error": figure["error"], "ratio": ratio}
            )
        return results

    def holdings(self):
        """What this location holds at its stored address, as a DBA reads it ("" when nothing): its
        catalogued copies (deleted ones aside; a locked one waiting for its date counts), else the
        journal's anchors, which the catalog does not list."""
        from backupportal.journal_anchors import PREFIX as ANCHORS
        from backups.storage import StorageError

        copies = self.copies.exclude(status="deleted").count()
        if copies:
            return f"{copies} catalogued cop{'y' if copies == 1 else 'ies'}"
        try:
            anchored = next(iter(store_for(self).list(ANCHORS)), None)
        except (StorageError, OSError):
            # Nothing listed, nothing to lose by a correction: a location saved with a wrong address
            # (a typo in a disabled one) is what this leaves correctable.
            return ""
        return "the journal's anchors" if anchored else ""

    def found_at(self, path):
        """Were this location's files moved to directory `path`? Each good copy is there under its
        key with its size, none is still being written, and `path` is no other location's (a NAS
        mirror's copies have the same keys and sizes) nor inside or around one. Then the location
        may follow them. A location holding anchors alone, or nothing good, never moves so."""
        new = Path(path).resolve()
        for other in StorageLocation.objects.exclude(pk=self.pk).exclude(kind=self.Kind.S3).exclude(path=""):
            theirs = Path(other.path).resolve()
            if new == theirs or new.is_relative_to(theirs) or theirs.is_relative_to(new):
                return False
        if self.copies.filter(status__in=("pending", "copying")).exists():
            return False
        copies = self.copies.filter(status="ok").values_list("key", "size")
        if not copies.exists():
            return False
        store = store_for(StorageLocation(kind=self.kind, path=path))
        try:
            return all(store.path(key).stat().st_size == size for key, size in copies.iterator())
        except OSError:
            return False

    def address(self):
        """Where its data is, as the settings would say it: s3://bucket/prefix or the path."""
        if self.kind == self.Kind.S3:
            where = f"s3://{self.bucket}/{self.prefix}"
            return where + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        return self.path

    @classmethod
    def sync_from_settings(cls):
        """Create or update the locations that BACKUP_ROOT, WAL_ROOT, NAS_ROOT and S3_BUCKET describe.

        A location that holds copies or the journal's anchors keeps its address, as in the admin:
        settings that point it elsewhere (a BACKUP_ROOT edited, a mount moved) would put every copy
        out of reach and send new ones to the new place. Every other location is synced first; then
        LocationMoved says which setting moved it and what to do."""
        refused = [why for name, values in cls._described_by_settings() if (why := cls._sync_one(name, values))]
        if refused:
            raise LocationMoved("; ".join(refused))

    @classmethod
    def _described_by_settings(cls):
        """(name, field values) of each location the settings describe."""
        yield "primary", {"kind": cls.Kind.PRIMARY, "path": str(settings.BACKUP_ROOT)}
        # The WAL archive's own primary location (the strategy's separate partition).
        yield WAL_LOCATION, {"kind": cls.Kind.PRIMARY, "path": str(settings.WAL_ROOT)}
        if settings.NAS_ROOT:
            yield "nas", {"kind": cls.Kind.NAS, "path": str(settings.NAS_ROOT)}
        if settings.S3_BUCKET:
            yield (
                "s3",
                {
                    "kind": cls.Kind.S3,
                    "bucket": settings.S3_BUCKET,
                    "prefix": settings.S3_PREFIX,
                    "endpoint_url": settings.S3_ENDPOINT_URL,
                    "region": os.environ.get("AWS_DEFAULT_REGION", ""),
                    "sse": settings.S3_SSE,
                    "storage_class": settings.S3_STORAGE_CLASS,
                },
            )

    @classmethod
    def _sync_one(cls, name, values):
        """Create or update one location; a refusal's sentence when its address is kept, else ""."""
        location = cls.objects.filter(name=name).first()
        if location is None:
            cls.objects.create(name=name, **values)
            return ""
        moved = [f for f in cls.ADDRESS if f in values and getattr(location, f) != values[f]]
        held = location.holdings() if moved else ""
        refusal = ""
        if held and not (moved == ["path"] and location.found_at(values["path"])):
            named = " and ".join(sorted({SETTING_OF.get((name, f), SETTING_OF.get(f, f)) for f in moved}))
            refusal = f"location '{name}' holds {held} at {location.address()}, but {named} now says otherwise"
            if moved == ["path"]:
                refusal += (
                    f": its address is kept. Set {named} back, or move every file there first (the same "
                    "names under the new directory): the location then follows"
                )
            else:
                refusal += (
                    f": its address is kept. Set {named} back; another bucket, prefix or endpoint is a new "
                    "location (add it in the admin)"
                )
            values = {f: v for f, v in values.items() if f not in cls.ADDRESS}
        changed = [f for f, v in values.items() if getattr(location, f) != v]
        for f in changed:
            setattr(location, f, values[f])
        if changed:
            location.save(update_fields=changed)
        return refusal


class LocationMoved(Exception):
    """The settings give a location that holds copies (or anchors) a new address: it was kept."""


# Which setting gives each address field (the path's depends on the location).
SETTING_OF = {
    ("primary", "path"): "BACKUP_ROOT",
    (WAL_LOCATION, "path"): "WAL_ROOT",
    ("nas", "path"): "NAS_ROOT",
    "bucket": "S3_BUCKET",
    "prefix": "S3_PREFIX",
    "endpoint_url": "S3_ENDPOINT_URL",
    "region": "AWS_DEFAULT_REGION",
    "kind": "the location's kind",
}
