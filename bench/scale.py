"""The portal at scale: page times and SQL query counts on a PostgreSQL catalog of millions of rows.

    python bench/scale.py --segments 1000000 --runs 20000 --journal 1000000 --out result.json

Makes its own throwaway cluster for the portal's database (never the machine's 5432), migrates
it, bulk-loads a small catalog, measures, tops it up to the full size with INSERT ... SELECT,
measures again. Pages go through Django's test Client in this process: the view, the ORM, the
templates, no network. Writes one JSON object; run.py turns it into RESULTS.md's table.
"""

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVERS = 10
# One segment a minute per server; the WAL page is asked for a day in the middle.
START = datetime(2025, 1, 1, tzinfo=UTC)
ACTORS = ["alice", "bob", "sam", "charlie", "job:backup", "job:monitor", "job:ingestwal", "os:root"]


def boot(cluster, work):
    cluster.create_database("portal")
    env = {k: v for k, v in os.environ.items() if k != "Q_BROKER_URL" and not k.startswith("PG")}
    env.update(
        DJANGO_SETTINGS_MODULE="backupportal.settings",
        DATABASE_URL=cluster.dsn("portal"),
        VAR_DIR=str(work),
        SECRET_KEY=secrets.token_urlsafe(40),
        BACKUP_ROOT=str(work / "backups"),
        JOURNAL_KEY_FILE=str(work / "journal.key"),
        JOURNAL_HEAD_FILE=str(work / "journal.head"),
        ALLOWED_HOSTS="testserver",
        SECURE_SSL_REDIRECT="false",
        WHITENOISE_USE_FINDERS="true",
        # The pages are timed for a signed-in DBA: with the second factor required (production's
        # default) every page would answer with the redirect to enrol one instead.
        REQUIRE_2FA="false",
    )
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    os.environ.update(env)
    import django

    django.setup()


def make_servers():
    from backups.models import Server

    return [
        Server.objects.create(name=f"srv{i}", dsn=f"postgresql://postgres@127.0.0.1:1/db{i}", pg_version=150004)
        for i in range(SERVERS)
    ]


def load(cursor_conn, servers, segments, runs, journal, start_at):
    """Add rows to reach the given totals (segments, runs, journal entries); start_at: rows already there."""
    from backups.models import BackupRun, StorageLocation

    wal_loc = StorageLocation.objects.get(name="wal").pk
    main_loc = StorageLocation.objects.get(name="primary").pk
    ids = [s.pk for s in servers]
    seg0, run0, j0 = start_at
    with cursor_conn.cursor() as cur:
        # Segment g: server g % N, its (g // N)-th, one a minute from START.
        cur.execute(
            """
            INSERT INTO backups_walsegment (server_id, timeline, name, segno, size, sha256, key, archived_at,
                                            ingested_at, source)
            SELECT (%(ids)s::int[])[1 + g %% %(n)s], 1,
                   '00000001' || lpad(to_hex((g / %(n)s) / 256), 8, '0') || lpad(to_hex((g / %(n)s) %% 256), 8, '0'),
                   g / %(n)s, 16777216, md5(g::text) || md5((g + 1)::text), 'wal/' || g,
                   %(start)s::timestamptz + (g / %(n)s) * interval '1 minute',
                   %(start)s::timestamptz + (g / %(n)s) * interval '1 minute' + interval '20 seconds', 'push'
            FROM generate_series(%(from)s, %(to)s - 1) g
            """,
            {"ids": ids, "n": len(ids), "start": START, "from": seg0, "to": segments},
        )
        cur.execute(
            """
            INSERT INTO backups_backupcopy (wal_segment_id, location_id, artifact, key, size, sha256, status,
                                            attempts, last_error, created_at, copied_at)
            SELECT w.id, %(loc)s, 'wal', w.key, w.size, w.sha256, 'ok', 1, '', w.ingested_at, w.ingested_at
            FROM backups_walsegment w
            WHERE NOT EXISTS (SELECT 1 FROM backups_backupcopy c WHERE c.wal_segment_id = w.id)
            """,
            {"loc": wal_loc},
        )
        cur.execute(
            """
            INSERT INTO backupportal_journalentry (at, actor, action, object_type, object_id, object_repr, server,
                                                   outcome, details, prev_hmac, hmac)
            SELECT %(start)s::timestamptz + g * interval '30 seconds', (%(actors)s::text[])[1 + g %% 8],
                   (ARRAY['backup_succeeded','wal_ingested','login','restore_requested','alert_opened'])[1 + g %% 5],
                   'backups.BackupRun', g::text, '#' || g, 'srv' || (g %% %(n)s), 'ok',
                   jsonb_build_object('size', g * 1000), md5(g::text) || md5(g::text), md5((g+1)::text) || md5(g::text)
            FROM generate_series(%(from)s, %(to)s - 1) g
            """,
            {"start": START, "actors": ACTORS, "n": len(ids), "from": j0, "to": journal},
        )
    made = []
    for g in range(run0, runs):
        at = START + timedelta(minutes=37 * g)
        made.append(
            BackupRun(
                server_id=ids[g % len(ids)],
                kind=("logical", "base", "incremental")[g % 3],
                status="failed" if g % 50 == 0 else "succeeded",
                trigger="schedule",
                requested_by="job:backup",
                created_at=at,
                started_at=at,
                finished_at=at + timedelta(minutes=3),
                key=f"srv/{g}.gpg",
                size=10_000_000 + g,
                bytes_done=10_000_000 + g,
                sha256=f"{g:064x}",
                details={"rows": {"users": g}},
            )
        )
    runs_made = BackupRun.objects.bulk_create(made, batch_size=5000)
    from backups.models import BackupCopy

    BackupCopy.objects.bulk_create(
        [
            BackupCopy(run=r, location_id=main_loc, key=r.key, size=r.size, sha256=r.sha256, status="ok", attempts=1)
            for r in runs_made
        ],
        batch_size=5000,
    )
    with cursor_conn.cursor() as cur:
        # As a catalog in use is: vacuumed and analysed. A table loaded in bulk and left to
        # autovacuum would be vacuumed during the timed requests, on the same two cores.
        cur.execute("VACUUM (ANALYZE)")


def pages(servers, segments):
    per_server = segments // len(servers)
    day = (START + timedelta(minutes=per_server // 2)).date()
    sid = servers[3].pk
    return {
        "dashboard": "/",
        "server page (newest runs)": f"/servers/{servers[3].name}/",
        "runs list (admin)": "/admin/backups/backuprun/",
        "WAL list, one server and day (admin)": (
            # The list's own "day archived" filter (a range on the indexed archived_at).
            f"/admin/backups/walsegment/?server__id__exact={sid}&archived_on={day.isoformat()}"
        ),
        "journal, one user": "/journal/?actor=bob",
    }


def measure(client, urls, requests):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    results = {}
    for label, url in urls.items():
        for _ in range(2):  # warm caches, as a page that is in use has
            assert client.get(url).status_code == 200, url
        times, queries, sql_ms, slowest = [], 0, [], {}
        for _ in range(requests):
            t0 = time.perf_counter()
            with CaptureQueriesContext(connection) as captured:
                response = client.get(url)
            times.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200, (url, response.status_code)
            queries = len(captured)
            # The profile: how much of the page is SQL, and which query costs most.
            spent = [(float(q["time"]) * 1000, q["sql"]) for q in captured.captured_queries]
            sql_ms.append(sum(ms for ms, _ in spent))
            for ms, text in spent:
                slowest[text[:160]] = max(slowest.get(text[:160], 0), ms)
        times.sort()
        top = max(slowest.items(), key=lambda kv: kv[1]) if slowest else ("", 0)
        results[label] = {
            "url": url,
            "p50_ms": statistics.median(times),
            "p95_ms": times[max(0, round(0.95 * len(times)) - 1)],
            "queries": queries,
            "sql_ms_median": statistics.median(sql_ms),
            "slowest_sql": top[0],
            "slowest_sql_ms": top[1],
        }
    return results


def runs_list_alternatives():
    """The runs list's query as the admin builds it (the page's copies prefetched) against an
    earlier admin's Count of copies and per-row subqueries.

    Best of five, first page of 100; shows whether counting copies is what grows with the runs.
    """
    from django.db.models import Count, IntegerField, OuterRef, Q, Subquery

    from backups.admin import copies_prefetch
    from backups.models import BackupCopy, BackupRun

    def best(qs):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            list(qs[:100])
            times.append((time.perf_counter() - t0) * 1000)
        return min(times)

    def count(**only):
        copies = BackupCopy.objects.filter(run=OuterRef("pk"), **only).order_by().values("run")
        return Subquery(copies.annotate(n=Count("*")).values("n"), output_field=IntegerField())

    runs = BackupRun.objects.select_related("server").order_by("-created_at", "-id")
    return {
        "the page's copies prefetched (as the admin does now)": best(runs.prefetch_related(copies_prefetch())),
        "Count() annotation (an earlier admin)": best(
            runs.annotate(ok=Count("copies", filter=Q(copies__status="ok")), n=Count("copies"))
        ),
        "correlated Subquery counts (per row on the page)": best(runs.annotate(ok=count(status="ok"), n=count())),
        "no counts at all": best(runs),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--segments", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--journal", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--small", type=float, default=0.01, help="fraction loaded for the first measurement")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from backupportal.lib.pgcluster import Cluster

    work = Path(tempfile.mkdtemp(prefix="bp-bench-scale-"))
    cluster = Cluster.create(settings={"shared_buffers": "256MB", "max_wal_size": "4GB", "fsync": "off"})
    cluster.start()
    try:
        boot(cluster, work)
        from django.contrib.auth.models import Group, User
        from django.test import Client
        from django.test.utils import setup_test_environment

        setup_test_environment()
        servers = make_servers()
        user = User.objects.create_superuser("bench", "bench@example.mv", secrets.token_urlsafe(16))
        user.groups.add(Group.objects.get(name="DBA"))  # the portal's pages need a role, superuser or not
        client = Client()
        client.force_login(user)
        from backupportal.lib.serving import freeze_startup_objects

        freeze_startup_objects()  # as backupportal/wsgi.py does in each web server process
        result = {"sizes": [], "server": cluster.execute("SHOW server_version")[0][0]}
        done = (0, 0, 0)
        full = (args.segments, args.runs, args.journal)
        small = tuple(max(100, int(n * args.small)) for n in full)
        with cluster.connect("portal") as conn:
            for target in (small, full):
                t0 = time.monotonic()
                load(conn, servers, *target, start_at=done)
                loaded = time.monotonic() - t0
                done = target
                result["sizes"].append(
                    {
                        "segments": target[0],
                        "runs": target[1],
                        "journal": target[2],
                        "load_seconds": loaded,
                        "pages": measure(client, pages(servers, target[0]), args.requests),
                        "runs_query_ms": runs_list_alternatives(),
                    }
                )
        result["database_bytes"] = cluster.execute("SELECT pg_database_size('portal')")[0][0]
        Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
