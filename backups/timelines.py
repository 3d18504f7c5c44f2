"""Which timeline production is on, and which base backups are on its history.

After a failover the archive holds two branches of the same segment numbers: the old
primary's timeline past the switch point, and the new one's. A PITR to latest follows the
timeline production is on, through its .history file (a walchain.Lineage); the WAL gap check
and WAL retention must follow the same one, or a gap on the new timeline hides behind the old
timeline's segment of that number, and retention anchors on a base backup PITR never uses.
"""

from operator import attrgetter

import psycopg

from backupportal.lib.pgerrors import explain
from backups import manifests, walchain, walnames


def live_timeline(server):
    """(the timeline the source is on, "") or (None, why it could not be asked)."""
    try:
        with server.connect(connect_timeout=10) as conn:
            checkpoint, sysid, walfile = conn.execute(
                "SELECT c.timeline_id, s.system_identifier, CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
                "ELSE pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()) END "
                "FROM pg_catalog.pg_control_checkpoint() c, pg_catalog.pg_control_system() s"
            ).fetchone()
    except (psycopg.Error, OSError) as e:
        return None, explain(e, server) if isinstance(e, psycopg.Error) else str(e)
    known = manifests.known_system_identifier(server)
    if known and str(sysid) != known:
        return None, f"it answers as another cluster: system identifier {sysid}, its backups' {known}"
    # The checkpoint's timeline lags a promotion until the next checkpoint; the WAL being written does not.
    return max(int(checkpoint), walnames.timeline_of(walfile) if walfile else 0), ""


def production_timeline(server, bases):
    """(the timeline a PITR to latest follows, why the server could not be asked or ""): the one
    the server says it is on, else its newest base backup's (`bases` oldest first)."""
    live, why = live_timeline(server)
    return live or ((bases[-1].timeline or 1) if bases else 1), why


def production_lineage(server, bases, segment_size):
    """(walchain.Lineage a PITR to latest follows, why the server could not be asked or "").
    WalError when its timeline's history file is not catalogued."""
    timeline, why = production_timeline(server, bases)
    return walchain.Lineage.of(timeline, walchain.history_text(server, timeline), segment_size), why


def on_lineage(lineage, base):
    """Whether a PITR along `lineage` can start from `base`: not one taken on a branch it left."""
    if not base.timeline:
        return True  # recorded before timelines were: assumed production's
    if lineage.span(base.timeline) is None:
        return False
    if base.start_lsn and base.end_lsn:
        return lineage.holds(base.timeline, base.start_lsn, base.end_lsn)
    return True


def chain_gaps(server):
    """Missing WAL a PITR to latest cannot cross, since the oldest kept base backup it can start
    from: each segment named on the timeline the lineage takes it from (a segment of the same
    number on a branch production left is not it). The history file itself, when it is not
    catalogued: without it recovery cannot follow the switch."""
    size = server.wal_segment_size
    bases = sorted(server.runs.restorable_bases(), key=attrgetter("stop_time"))
    if not bases or not size:
        return []
    timeline, _ = production_timeline(server, bases)
    try:
        lineage = walchain.Lineage.of(timeline, walchain.history_text(server, timeline), size)
    except walnames.WalError:
        return [f"{timeline:08X}.history"]
    starts = [walnames.segno_of(b.start_wal, size) for b in bases if on_lineage(lineage, b)]
    last = walchain.last_segno(server, lineage)
    if not starts or last is None:
        return []
    return walchain.missing_segments(server, min(starts), last, lineage)
