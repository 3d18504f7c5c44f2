"""A restore test compares the critical tables' rows, not only their counts: the backup digests
them in its own snapshot (backups.tables.content_digest), the test digests the restored copy's.
Found by review: a copy whose rows differed from production's with the same count passed."""

import pytest

from backups.models import BackupRun, Database, Server
from restores.restoretest import run_restore_test
from tests.helpers import run_command

pytestmark = pytest.mark.django_db
DB = "reliabilitymaldives"

# A column computed through a function that says IMMUTABLE but reads the session's TimeZone:
# pg_dump stores no value for a generated column, and pg_restore computes it again in its own
# session. The application wrote in its own time zone: the same rows counted, other contents.
GENERATED = """
CREATE FUNCTION public.local_hour(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE
  AS $$ SELECT to_char(t, 'YYYY-MM-DD HH24') $$;
CREATE TABLE public.invoices(id int PRIMARY KEY, at timestamptz NOT NULL, amount money, paid float8,
  local_hour text GENERATED ALWAYS AS (public.local_hour(at)) STORED);
SET TimeZone = 'Pacific/Kiritimati';
INSERT INTO public.invoices(id, at, amount, paid)
  SELECT g, '2026-01-01 00:00+00'::timestamptz + g * interval '1 hour', g * 1.5, g / 3.0 FROM generate_series(1, 100) g;
"""


def critical(server, *names):
    Database.of_dsn(server)
    Database.objects.filter(server=server, name=DB).update(critical_tables=list(names))


def test_a_copy_whose_critical_rows_differ_with_the_same_count_fails_the_restore_test(
    server, sample_cluster, passphrase_file, backup_root
):
    sample_cluster.execute(GENERATED, dbname=DB)
    critical(server, "public.invoices", "public.users")
    assert run_command("backup", "maldives")["status"] == "succeeded"
    run = BackupRun.objects.get(kind="logical", status="succeeded")
    assert set(run.details["content_digests"]) == {"public.invoices", "public.users"}
    assert run.details["content_digests"]["public.invoices"].startswith("100:")
    test = run_restore_test(Server.objects.get(), actor="test")
    checks = {c["name"]: c for c in test.checks}
    assert test.status == "failed"
    assert not checks["content of public.invoices"]["ok"]
    assert "differ from those the backup read" in checks["content of public.invoices"]["detail"]
    assert checks["rows in public.invoices"]["ok"] and checks["content of public.users"]["ok"]


def test_the_same_rows_digest_alike_whatever_the_sessions_settings(
    server, sample_cluster, passphrase_file, backup_root
):
    """A copy restored exactly passes, the two digests read in sessions set differently (the
    database's DateStyle and float digits at the backup, the role's TimeZone and money format at
    the test): the digest's own settings decide the rows' text."""
    sample_cluster.execute(GENERATED.replace("GENERATED ALWAYS AS (public.local_hour(at)) STORED", ""), dbname=DB)
    critical(server, "public.invoices")
    sample_cluster.execute(
        f"ALTER DATABASE {DB} SET DateStyle = 'SQL, DMY'; ALTER DATABASE {DB} SET extra_float_digits = 0"
    )
    assert run_command("backup", "maldives")["status"] == "succeeded"
    role = server.user
    sample_cluster.execute(
        f"ALTER ROLE {role} SET TimeZone = 'Asia/Kathmandu'; ALTER ROLE {role} SET lc_monetary = 'C.UTF-8'"
    )
    try:
        test = run_restore_test(Server.objects.get(), actor="test")
    finally:
        sample_cluster.execute(f"ALTER ROLE {role} RESET TimeZone; ALTER ROLE {role} RESET lc_monetary")
    assert test.status == "passed", test.checks
    assert {c["name"]: c["ok"] for c in test.checks}["content of public.invoices"] is True


INHERIT = """
CREATE TABLE public.ledger(id int);
CREATE TABLE public.ledger_2026(note text) INHERITS (public.ledger);
ALTER TABLE public.ledger ADD COLUMN amount int;
INSERT INTO public.ledger_2026(id, note, amount) SELECT g, 'n' || g, g FROM generate_series(1, 50) g;
"""

PARTITION = """
CREATE TABLE public.events(id int, body text) PARTITION BY RANGE (id);
CREATE TABLE public.events_1(body text, id int);
ALTER TABLE public.events ATTACH PARTITION public.events_1 FOR VALUES FROM (0) TO (1000);
INSERT INTO public.events SELECT g, 'b' || g FROM generate_series(1, 50) g;
"""


@pytest.mark.parametrize("setup,name", [(INHERIT, "public.ledger_2026"), (PARTITION, "public.events_1")])
def test_an_exact_restore_of_a_table_whose_columns_pg_dump_reorders_passes_the_content_check(
    server, sample_cluster, passphrase_file, backup_root, setup, name
):
    """Found by review: an inheritance child with a column its parent gained later comes back with
    its columns in another order; its rows' text differed and an exact restore failed."""
    sample_cluster.execute(setup, dbname=DB)
    critical(server, name)
    assert run_command("backup", "maldives")["status"] == "succeeded"
    run = BackupRun.objects.get(kind="logical", status="succeeded")
    assert run.details["content_digests"][name]
    test = run_restore_test(Server.objects.get(), actor="test")
    checks = {c["name"]: c for c in test.checks}
    assert checks[f"rows in {name}"]["ok"], checks
    assert checks[f"content of {name}"]["ok"], checks[f"content of {name}"]
    assert test.status == "passed", test.checks
