"""The backup catalog, one module per concept: protected servers and their schedules, storage
the databases of each, locations, backup runs, WAL segments, copies, verifications.

Django registers the app's models from here; the rest of the project imports them from
`backups.models`.
"""

from backups.models.copies import BackupCopy
from backups.models.databases import Database
from backups.models.holds import BackupHold, ChangeRequest
from backups.models.keys import EncryptionKey
from backups.models.locations import WAL_LOCATION, LocationMoved, StorageLocation
from backups.models.lockchanges import LockChange
from backups.models.portal import PortalBackup
from backups.models.runs import BackupRun
from backups.models.servers import BackupSchedule, Server, default_critical_tables
from backups.models.verifications import Verification
from backups.models.walsegments import WalSegment

__all__ = [
    "WAL_LOCATION",
    "BackupCopy",
    "BackupHold",
    "BackupRun",
    "BackupSchedule",
    "ChangeRequest",
    "Database",
    "PortalBackup",
    "LockChange",
    "EncryptionKey",
    "Server",
    "LocationMoved",
    "StorageLocation",
    "Verification",
    "WalSegment",
    "default_critical_tables",  # named by migrations 0001 and 0006
]
