"""How the journal behaves with a million entries on a PostgreSQL portal database.

    /tmp/venvprobe/bin/python bench/journal_million.py [N]

Makes a throwaway cluster, migrates a portal database, loads N (default 1,000,000) correctly
chained and signed entries with COPY, then times: the auditor's pages (each filter, first and
deep pages, with EXPLAIN of the page query), the streamed CSV export of everything, and
`verifyjournal`. Prints one line per measurement; nothing is kept.
"""

import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(n):
    from backupportal.lib.pgcluster import Cluster

    work = Path(tempfile.mkdtemp(prefix="bp-journal-bench-"))
    cluster = Cluster.create()
    cluster.start()
    try:
        cluster.create_database("portal")
        env = dict(os.environ)
        env |= {
            "DJANGO_SETTINGS_MODULE": "backupportal.settings",
            "DATABASE_URL": cluster.dsn("portal"),
            "VAR_DIR": str(work),
            "JOURNAL_KEY_FILE": str(work / "journal.key"),
            "JOURNAL_HEAD_FILE": str(work / "journal.head"),
            "ALLOWED_HOSTS": "testserver",
            "SECURE_SSL_REDIRECT": "false",
            "WHITENOISE_USE_FINDERS": "true",
        }
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        os.environ.update(env)
        import django

        django.setup()
        load(cluster, n, work)
        measure(n)
    finally:
        cluster.destroy()


def load(cluster, n, work):
    from backupportal import journal

    key = journal._read_key()
    start = datetime(2025, 1, 1, tzinfo=UTC)
    actors, actions, servers = (
        ["alice", "bob", "sam", "job:backup", "job:monitor"],
        list(journal.ACTIONS),
        ["maldives", "atoll", "reef", ""],
    )
    buf, prev = io.StringIO(), journal.GENESIS
    t0 = time.monotonic()
    for i in range(1, n + 1):
        row = type("Row", (), {})()
        row.id, row.at = i, start + timedelta(seconds=30 * i)
        row.actor, row.action, row.server = actors[i % 5], actions[i % len(actions)], servers[i % 4]
        row.object_type, row.object_id, row.object_repr = "backups.BackupRun", str(i), f"#{i} run"
        row.outcome, row.details, row.prev_hmac = "ok", {"size": i * 1000, "seconds": i / 7}, prev
        row.hmac = hmac.new(key, journal.canonical(row), hashlib.sha256).hexdigest()
        prev = row.hmac
        cols = [row.id, row.at.isoformat(), row.actor, row.action, row.object_type, row.object_id, row.object_repr]
        cols += [row.server, row.outcome, json.dumps(row.details), row.prev_hmac, row.hmac]
        buf.write("\t".join(str(c) for c in cols) + "\n")
    journal._write_head(n, prev)
    print(f"signed {n} entries in {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    with cluster.connect("portal") as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY backupportal_journalentry (id, at, actor, action, object_type, object_id, object_repr, server,"
            " outcome, details, prev_hmac, hmac) FROM STDIN"
        ) as copy:
            copy.write(buf.getvalue())
        cur.execute("SELECT setval('backupportal_journalentry_id_seq', %s)", [n])
        cur.execute("ANALYZE backupportal_journalentry")
    print(f"loaded with COPY in {time.monotonic() - t0:.1f} s")


def measure(n):
    from django.contrib.auth.models import Group, User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, setup_test_environment

    setup_test_environment()  # so that responses carry their template context
    user = User.objects.create_superuser("bench", "b@example.mv", "x" * 20)
    user.groups.add(Group.objects.get(name="Auditor"))  # the journal is a portal page: it needs a role
    client = Client()
    client.force_login(user)
    cases = {
        "no filter": "",
        "user": "actor=bob",
        "action": "action=backup_failed",
        "server": "server=atoll",
        "date range": "date_from=2025-03-01&date_to=2025-03-31",
        "all four": "date_from=2025-03-01&date_to=2025-06-30&actor=alice&action=login&server=maldives",
    }
    for label, query in cases.items():
        cursor = None
        for page in range(3):
            t0 = time.monotonic()
            with CaptureQueriesContext(connection) as queries:
                response = client.get(f"/journal/?{query}" + (f"&older_than={cursor}" if page else ""))
            took = (time.monotonic() - t0) * 1000
            assert response.status_code == 200
            cursor = response.context["older"]
            sqls = [q["sql"] for q in queries.captured_queries]  # the next request resets the log
            print(
                f"page {page + 1:>2} {label:<11} {took:7.1f} ms  {len(queries)} queries  rows={len(response.context['entries'])}"
            )
        # A deep page: jump far into the filtered view by cursor.
        deep = n // 2 if "date" not in query else cursor
        t0 = time.monotonic()
        response = client.get(f"/journal/?{query}&older_than={deep}")
        print(f"deep     {label:<11} {(time.monotonic() - t0) * 1000:7.1f} ms")
        with connection.cursor() as cur:
            cur.execute("EXPLAIN ANALYZE " + page_sql(sqls))
            plan = [r[0] for r in cur.fetchall()]
        print(
            "         plan: "
            + " | ".join(p.strip() for p in plan if "Index" in p or "Seq" in p or "Execution" in p)[:300]
        )
    t0 = time.monotonic()
    response = client.get("/journal/export.csv")
    size = sum(len(chunk) for chunk in response.streaming_content)
    print(f"CSV export of everything: {size / 1e6:.0f} MB in {time.monotonic() - t0:.1f} s (streamed)")
    t0 = time.monotonic()
    from backupportal import journal

    ok, message, count = journal.verify()
    print(f"verifyjournal: {message} in {time.monotonic() - t0:.1f} s")


def page_sql(sqls):
    return next(sql for sql in reversed(sqls) if "backupportal_journalentry" in sql and "LIMIT 51" in sql)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
