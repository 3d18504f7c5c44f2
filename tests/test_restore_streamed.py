"""A parallel logical restore loads the tables' rows by COPY while gpg still decrypts the dump
(restores.dumpstream), and builds a big table's indexes, keys and foreign keys as soon as what
they need is in: the copy must be the same as pg_restore alone makes it, rows, indexes, sequences,
large objects and all."""

import threading
import time

import psycopg
import pytest

from backups.models import Server
from backups.pipeline import Tool
from restores import dumparchive, dumpstream, targetdb
from tests import awkward_schema
from tests.helpers import restore_json, wait_for
from tests.stock import artifact
from tests.test_exact_restore import backup, protect, register  # noqa: F401

AWKWARD = r"""
CREATE TABLE public.big (id bigserial PRIMARY KEY, body text NOT NULL, at timestamptz DEFAULT now());
CREATE INDEX big_body ON public.big (body);
INSERT INTO public.big (body) SELECT md5(g::text) || repeat('x', g % 50) FROM generate_series(1, 30000) g;
CREATE TABLE public."Odd ""q"" name" (k int PRIMARY KEY, v text, twice int GENERATED ALWAYS AS (k * 2) STORED);
INSERT INTO public."Odd ""q"" name" (k, v) SELECT g, E'tab\there\nnewline \\ backslash \u00e9 \\.' FROM generate_series(1, 500) g;
CREATE TABLE public.empty (x int UNIQUE);
CREATE TABLE public.child (id bigint REFERENCES public.big (id), note text);
INSERT INTO public.child SELECT g, NULL FROM generate_series(1, 1000) g;
CREATE SEQUENCE public.counter;
SELECT setval('public.counter', 4242);
SELECT lo_from_bytea(0, 'large object'::bytea || '\x00ff'::bytea);
CREATE TABLE public.parted (id int, region text) PARTITION BY LIST (region);
CREATE TABLE public.parted_a PARTITION OF public.parted FOR VALUES IN ('a');
CREATE TABLE public.parted_b PARTITION OF public.parted DEFAULT;
CREATE INDEX parted_id ON public.parted (id);
INSERT INTO public.parted SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END FROM generate_series(1, 3000) g;
"""
TABLES = ["public.big", 'public."Odd ""q"" name"', "public.empty", "public.child", "public.parted"]
SCHEMA = (
    "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index"
    " WHERE indrelid::regclass::text NOT LIKE 'pg_%' ORDER BY 1"
)


def content(cluster, dbname):
    rows = {
        t: cluster.execute(
            f"SELECT count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {t} x", dbname=dbname
        )
        for t in TABLES
    }
    rows["schema"] = cluster.execute(SCHEMA, dbname=dbname)
    rows["constraints"] = cluster.execute(
        "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1",
        dbname=dbname,
    )
    rows["sequence"] = cluster.execute("SELECT last_value, is_called FROM public.counter", dbname=dbname)
    rows["large object"] = cluster.execute("SELECT lo_get(oid) FROM pg_largeobject_metadata", dbname=dbname)
    return rows


def dumped(cluster, name, options="", schema=AWKWARD):
    """A logical backup of a new database `name` holding `schema`."""
    protect(cluster, "source")
    cluster.execute(f"CREATE DATABASE {name} {options}")
    cluster.execute(schema, dbname=name)
    register(cluster, name, name, "source")
    return backup(name)


@pytest.fixture
def loaders(monkeypatch):
    """The Loaders a restore ran (observed, not changed), and every table's own post-data built early."""
    seen, real = [], dumpstream.Loader.run

    def run(self):
        seen.append(self)
        return real(self)

    monkeypatch.setattr(dumpstream.Loader, "run", run)
    monkeypatch.setattr(dumpstream, "EARLY_BYTES", 0)
    return seen


@pytest.mark.parametrize(("pg_major", "encoding"), [(15, "UTF8"), (15, "LATIN1"), (18, "UTF8")])
def test_rows_streamed_while_decrypting_make_the_same_copy(pg_cluster, passphrase_file, backup_root, loaders, encoding):
    run = dumped(pg_cluster, "streamed", f"ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")

    result = restore_json(str(run.pk), "--into-database", "streamed_copy")

    assert result["status"] == "succeeded", result["error"]
    assert content(pg_cluster, "streamed_copy") == content(pg_cluster, "streamed")
    (loader,) = loaders
    assert loader.error is None
    streamed = set(loader.rows)  # every table's rows were COPY, none left to pg_restore
    assert len(streamed) == 6 and streamed <= loader.done  # big, Odd, empty, child, parted_a, parted_b
    # Every table counts as big here: all their keys and indexes, and child's foreign key to big
    # (with the key it references), were built beside the loading, none left to pg_restore.
    built = {e.desc for e in loader.archive.entries if e.id in loader.wanted}
    assert loader.wanted == set(loader.early) and loader.wanted <= loader.done
    assert built == {b"CONSTRAINT", b"INDEX", b"FK CONSTRAINT"}, built
    # 18's dumps name an index's statistics as the index: the index, key or table is the one meant
    entries = {e.tag: e for e in loader.archive.entries if e.desc != b"STATISTICS DATA"}
    fk, pkey = loader.early[entries[b"child child_id_fkey"].id], entries[b"big big_pkey"].id
    assert fk.after == {pkey} and fk.exclusive and not loader.early[entries[b"big_body"].id].exclusive
    assert entries[b"parted_id"].id not in loader.early  # on a partitioned table: pg_restore's, after the rows
    assert pg_cluster.execute(
        "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'streamed_copy'"
    ) == [(encoding,)]


ONE_TABLE = r"""
CREATE TABLE public.only_one (id bigint, body text, note text);
INSERT INTO public.only_one SELECT g, md5(g::text), CASE WHEN g % 7 = 0 THEN E'line\nbreak\ttab \\ back' END
  FROM generate_series(1, 200000) g;
CREATE INDEX only_one_id ON public.only_one (id);
"""


def test_a_job_with_nothing_else_to_do_helps_load_the_table_another_reads(
    pg_cluster, passphrase_file, backup_root, loaders, monkeypatch
):
    """One table holds all the rows (one big table is common): pg_restore -j loads it on one job.
    Here the other job loads whole rows handed to it by the one reading them, by a COPY of its
    own: every row once, escaped newlines and all."""
    monkeypatch.setattr(dumpstream, "OUTPUT", 4096)  # many pieces: the helper is there for most
    run = dumped(pg_cluster, "one", schema=ONE_TABLE)

    result = restore_json(str(run.pk), "--into-database", "one_copy")

    assert result["status"] == "succeeded", result["error"]
    (loader,) = loaders
    (table,) = loader.rows
    assert loader.handed.get(table, 0) >= 10, f"{loader.handed} pieces were loaded by the other job"
    same = "SELECT count(*), count(DISTINCT id), md5(string_agg(x::text, '|' ORDER BY id)) FROM public.only_one x"
    assert pg_cluster.execute(same, dbname="one_copy") == pg_cluster.execute(same, dbname="one")
    assert pg_cluster.execute(same, dbname="one_copy")[0][:2] == (200000, 200000)


SEVERAL = r"""
CREATE TABLE public.a (id bigint, body text, note text);
INSERT INTO public.a SELECT g, md5(g::text), CASE WHEN g % 7 = 0 THEN E'x\ny\\z\t' END FROM generate_series(1, 600000) g;
CREATE INDEX a_id ON public.a (id);
CREATE TABLE public.b (id bigint PRIMARY KEY, body text);
INSERT INTO public.b SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 60000) g;
CREATE TABLE public.c (id bigint REFERENCES public.b, body text);
INSERT INTO public.c SELECT g, md5(g::text) FROM generate_series(1, 60000) g;
-- Rows longer than a piece, between short ones: each goes whole to one COPY.
CREATE TABLE public.wide (id int, body text);
INSERT INTO public.wide SELECT g, CASE WHEN g % 50 = 0 THEN repeat(md5(g::text) || E'\n', 20000 + g) ELSE md5(g::text) END
  FROM generate_series(1, 400) g;
"""


@pytest.mark.parametrize("jobs", [2, 3])
def test_helpers_that_leave_for_other_work_and_rows_longer_than_a_piece_lose_no_row(
    pg_cluster, passphrase_file, backup_root, loaders, monkeypatch, settings, jobs
):
    """Found by review: rows longer than a piece (here up to 0.7 MB against pieces of 2 kB) were
    searched again for their end with each chunk inflated (32 MB: 31 s against 1 s before the
    help); each piece is now searched once. With three jobs, helpers join and leave tables for the
    others' rows and builds: every row arrives once."""
    monkeypatch.setattr(dumpstream, "OUTPUT", 2048)
    settings.RESTORE_JOBS = jobs
    run = dumped(pg_cluster, "several", schema=SEVERAL)

    result = restore_json(str(run.pk), "--into-database", "several_copy")

    assert result["status"] == "succeeded", result["error"]
    (loader,) = loaders
    if jobs == 3:  # with two, the other job is busy with the other tables most of the time
        assert loader.handed, "no piece was loaded by a helping job"
    for table in ("a", "b", "c", "wide"):
        same = f"SELECT count(*), count(DISTINCT id), md5(string_agg(x::text, '|' ORDER BY id)) FROM public.{table} x"
        assert pg_cluster.execute(same, dbname="several_copy") == pg_cluster.execute(same, dbname="several"), table


KEYS = r"""
CREATE TABLE public.z_keys (id int PRIMARY KEY, label text);
INSERT INTO public.z_keys SELECT g, 'key ' || g FROM generate_series(1, 100) g;
CREATE TABLE public.a_big (id bigint, key int REFERENCES public.z_keys, body text) WITH (fillfactor = 90);
INSERT INTO public.a_big SELECT g, g % 100 + 1, md5(g::text) FROM generate_series(1, 300000) g;
CREATE INDEX a_big_id ON public.a_big (id);
CREATE TABLE public.b_big (id bigint, key int REFERENCES public.z_keys, body text) WITH (autovacuum_enabled = true);
INSERT INTO public.b_big SELECT g, g % 100 + 1, md5(g::text) FROM generate_series(1, 300000) g;
"""


def test_a_small_table_whose_key_foreign_keys_reference_is_loaded_ahead_of_the_big_ones(
    pg_cluster, passphrase_file, backup_root, loaders, monkeypatch
):
    """pg_dump writes the tables by name: here the keys the big tables' foreign keys reference
    come last, when both jobs are loading a big table, and the one-core checks of those foreign
    keys would wait for both to end. A job reading a big table ends its COPY at a row's end, loads
    the small table, and goes on with a COPY of the rest: every row once, the checks made.
    Autovacuum is held off the tables loaded in several COPYs until they are whole (where the
    table does not set it itself), and their options are then as the dump made them."""
    monkeypatch.setattr(dumpstream, "OUTPUT", 4096)
    options = "SELECT relname, reloptions FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' ORDER BY 1"
    while_loading, release = [], dumpstream.Loader._release_autovacuum

    def released(self, held):
        while_loading.extend(pg_cluster.execute(options, dbname="keyed_copy"))
        return release(self, held)

    monkeypatch.setattr(dumpstream.Loader, "_release_autovacuum", released)
    monkeypatch.setattr(dumpstream, "EARLY_BYTES", 64 << 10)  # the big tables have their own builds
    run = dumped(pg_cluster, "keyed", schema=KEYS)

    result = restore_json(str(run.pk), "--into-database", "keyed_copy")

    assert result["status"] == "succeeded", result["error"]
    (loader,) = loaders
    names = {loader.archive.name(dump_id): dump_id for dump_id in loader.rows}
    assert loader.ahead == [names["public.z_keys"]], loader.ahead
    assert {e.tag for e in loader.archive.entries if e.id in loader.wanted} >= {
        b"a_big a_big_key_fkey",
        b"b_big b_big_key_fkey",
        b"z_keys z_keys_pkey",
    }
    for table in ("a_big", "b_big", "z_keys"):
        same = f"SELECT count(*), count(DISTINCT id), md5(string_agg(x::text, '|' ORDER BY id)) FROM public.{table} x"
        assert pg_cluster.execute(same, dbname="keyed_copy") == pg_cluster.execute(same, dbname="keyed"), table
    assert while_loading == [
        ("a_big", ["fillfactor=90", "autovacuum_enabled=false"]),
        ("b_big", ["autovacuum_enabled=true"]),  # its own: left alone
        ("z_keys", ["autovacuum_enabled=false"]),
    ]
    assert len(loader.held) == 2
    assert pg_cluster.execute(options, dbname="keyed_copy") == pg_cluster.execute(options, dbname="keyed")
    checks = "SELECT conname, convalidated FROM pg_constraint WHERE contype = 'f' ORDER BY 1"
    assert pg_cluster.execute(checks, dbname="keyed_copy") == [("a_big_key_fkey", True), ("b_big_key_fkey", True)]


SMALL_REFERENCES = r"""
CREATE TABLE public.z_keys (id int PRIMARY KEY);
INSERT INTO public.z_keys SELECT generate_series(1, 10);
CREATE TABLE public.a_big (id bigint, body text);
INSERT INTO public.a_big SELECT g, md5(g::text) FROM generate_series(1, 200000) g;
CREATE TABLE public.b_big (id bigint, body text);
INSERT INTO public.b_big SELECT g, md5(g::text) FROM generate_series(1, 200000) g;
CREATE TABLE public.small (key int REFERENCES public.z_keys);
INSERT INTO public.small SELECT generate_series(1, 10);
"""


def test_a_key_only_small_tables_reference_is_not_loaded_ahead_and_autovacuum_given_back_or_the_restore_fails(
    pg_cluster, passphrase_file, backup_root, loaders, monkeypatch
):
    """Found by review: a big table's COPY was split for a key whose only foreign key is from a
    small table, which waits for the final pg_restore anyway. And when autovacuum_enabled cannot be
    given back (here the table is gone), the restore fails and says so, rather than leaving a copy
    whose options differ from the dump's."""
    monkeypatch.setattr(dumpstream, "OUTPUT", 4096)
    monkeypatch.setattr(dumpstream, "EARLY_BYTES", 64 << 10)
    run = dumped(pg_cluster, "small_refs", schema=SMALL_REFERENCES)

    result = restore_json(str(run.pk), "--into-database", "small_refs_copy")

    assert result["status"] == "succeeded", result["error"]
    assert loaders[0].ahead == [] and len(loaders[0].held) == 4
    release = dumpstream.Loader._release_autovacuum

    def dropped_first(self, held):
        pg_cluster.execute("DROP TABLE public.b_big", dbname="small_refs_again")
        return release(self, held)

    monkeypatch.setattr(dumpstream.Loader, "_release_autovacuum", dropped_first)
    result = restore_json(str(run.pk), "--into-database", "small_refs_again")

    assert result["status"] == "failed"
    assert "giving a restored table its autovacuum setting back" in result["error"], result["error"]
    assert pg_cluster.execute("SELECT count(*) FROM pg_database WHERE datname = 'small_refs_again'") == [(0,)]


def test_a_foreign_keys_check_starts_first_then_the_key_one_waits_for(tmp_path):
    """Among the builds ready to start: a foreign key's check (one core, beside what is left),
    then a key a wanted foreign key references, then indexes and other keys, each only when no
    running build holds its table."""
    scratch = tmp_path / "dump"
    scratch.write_bytes(b"")
    loader = dumpstream.Loader(scratch, threading.Event(), None, None, b"", 2, None)
    index, key, foreign, other_key = 1, 2, 3, 4
    loader.early = {
        index: dumparchive.Early(frozenset({10}), frozenset(), False),
        key: dumparchive.Early(frozenset({11}), frozenset(), True),
        foreign: dumparchive.Early(frozenset({10, 11}), frozenset({key}), True, foreign=True),
        other_key: dumparchive.Early(frozenset({12}), frozenset(), True),
    }
    loader.awaited = {key}
    loader.tasks = [index, other_key, key]
    assert loader._ready_build() == key
    loader.tasks = [index, other_key, key, foreign]
    assert loader._ready_build() == foreign
    loader.running = {foreign: loader.early[foreign]}  # holds tables 10 and 11
    loader.tasks = [index, key, other_key]
    assert loader._ready_build() == other_key


GUARDED = r"""
-- The first session to check a row holds the lock: a second COPY's rows (a helper's) are refused.
CREATE FUNCTION public.first_session_only(x int) RETURNS bool LANGUAGE plpgsql AS $$
BEGIN
  IF current_database() <> 'guarded' AND NOT pg_try_advisory_lock(4242) THEN
    RAISE EXCEPTION 'row % refused on a second session', x;
  END IF;
  RETURN true;
END $$;
CREATE TABLE public.guarded (id bigint CHECK (public.first_session_only(id::int)), body text);
INSERT INTO public.guarded SELECT g, md5(g::text) FROM generate_series(1, 40000) g;
CREATE INDEX guarded_id ON public.guarded (id);
"""


def test_a_helper_whose_rows_are_refused_fails_the_restore_and_its_table_is_never_done(
    pg_cluster, passphrase_file, backup_root, loaders, monkeypatch
):
    """Found by review: the helper's COPY ended (counted as no longer loading) before its error
    stopped the others, so the table could count as loaded, and its index be built, without the
    helper's rows. Here the helper's error takes two seconds more to reach the other threads: the
    error is recorded and everything stopped before the helper counts as done."""
    monkeypatch.setattr(dumpstream, "OUTPUT", 4096)
    real = dumpstream.Loader._help

    def slow_to_tell(self, *args):
        try:
            return real(self, *args)
        except Exception:
            time.sleep(2)
            raise

    monkeypatch.setattr(dumpstream.Loader, "_help", slow_to_tell)
    run = dumped(pg_cluster, "guarded", schema=GUARDED)

    result = restore_json(str(run.pk), "--into-database", "guarded_copy")

    assert result["status"] == "failed", result
    assert result["error"].startswith("loading the rows of public.guarded failed:"), result["error"]
    assert "refused on a second session" in result["error"]
    (loader,) = loaders
    (table,) = loader.rows
    assert table not in loader.done and loader.wanted.isdisjoint(loader.done)
    assert pg_cluster.execute("SELECT count(*) FROM pg_database WHERE datname = 'guarded_copy'") == [(0,)]


def test_without_streaming_pg_restore_loads_everything(pg_cluster, passphrase_file, backup_root, loaders, settings):
    settings.RESTORE_STREAM_DATA = False
    run = dumped(pg_cluster, "plain")

    result = restore_json(str(run.pk), "--into-database", "plain_copy")

    assert result["status"] == "succeeded", result["error"]
    assert content(pg_cluster, "plain_copy") == content(pg_cluster, "plain")
    assert loaders == []


def test_many_tables_whose_schema_outlasted_the_decryption_are_left_to_pg_restore(
    pg_cluster, passphrase_file, backup_root, loaders, monkeypatch
):
    """Nothing is left to overlap then, and pg_restore -j loads many small tables faster (the
    MANY_TABLES rule): here six tables count as many, and the loading starts after the decryption."""
    monkeypatch.setattr(dumpstream, "MANY_TABLES", 5)
    ran = dumpstream.Loader.run  # the fixture's, which notes each Loader

    def after_the_decryption(self):
        wait_for(self.file.decrypted.is_set, what="the decryption to end")
        return ran(self)

    monkeypatch.setattr(dumpstream.Loader, "run", after_the_decryption)
    run = dumped(pg_cluster, "many")

    result = restore_json(str(run.pk), "--into-database", "many_copy")

    assert result["status"] == "succeeded", result["error"]
    assert content(pg_cluster, "many_copy") == content(pg_cluster, "many")
    (loader,) = loaders
    assert len(loader.rows) == 6 and loader.done == set() and loader.error is None


def test_a_corrupt_copy_fails_the_streamed_restore_and_leaves_no_database(
    pg_cluster, passphrase_file, backup_root, loaders
):
    run = dumped(pg_cluster, "flipped")
    path = artifact(run)
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x40  # in the rows of big, read as they are decrypted
    path.write_bytes(bytes(data))

    result = restore_json(str(run.pk), "--into-database", "flipped_copy")

    assert result["status"] == "failed", result
    assert "sha256" in result["error"] or "corrupt" in result["error"], result["error"]
    assert pg_cluster.execute("SELECT count(*) FROM pg_database WHERE datname = 'flipped_copy'") == [(0,)]


def test_an_uncompressed_dump_is_left_to_pg_restore(pg_cluster, passphrase_file, backup_root, loaders, settings):
    """pg_dump -Z0 writes a chunk a row: read here chunk by chunk they would cost more than they save."""
    settings.PG_DUMP_COMPRESS = 0
    run = dumped(pg_cluster, "raw")

    result = restore_json(str(run.pk), "--into-database", "raw_copy")

    assert result["status"] == "succeeded", result["error"]
    assert content(pg_cluster, "raw_copy") == content(pg_cluster, "raw")
    (loader,) = loaders
    assert loader.done == set() and loader.error is None


REFUSED = r"""
CREATE FUNCTION public.guard(x int) RETURNS bool LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF x = 90000 AND current_database() <> 'refused' THEN RAISE EXCEPTION 'row % refused', x; END IF;
  RETURN true;
END $$;
CREATE TABLE public.a_slow (id int);
INSERT INTO public.a_slow SELECT generate_series(1, 60000);
CREATE INDEX a_slow_idx ON public.a_slow (id);
CREATE TABLE public."b.Guarded" (id int CHECK (public.guard(id)), v text);
INSERT INTO public."b.Guarded" SELECT g, md5(g::text) FROM generate_series(1, 100000) g;
"""


def test_rows_the_target_refuses_fail_the_restore_at_once_naming_the_table(
    pg_cluster, passphrase_file, backup_root, loaders
):
    """Found by review: the first error waited for every early index build already running (a
    big table's, minutes). Here a session holds a lock the early build of a_slow's index waits on,
    and "b.Guarded"'s rows are refused (named as SQL reads it: the dot is in the name): the restore fails while that lock is still held."""
    run = dumped(pg_cluster, "refused", schema=REFUSED)
    release = threading.Event()

    # Locked once a_slow's rows are loading (or in): the schema is in then. Locked as soon as the
    # table existed, the lock could come before pre-data's ALTER TABLE ... OWNER, which then
    # waited on it for the whole minute (seen once in CI, under load).
    loading = (
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = 'refused_copy' AND query LIKE 'COPY public.a_slow %')"
        " OR (to_regclass('public.a_slow') IS NOT NULL AND EXISTS (SELECT FROM public.a_slow))"
    )

    def hold():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not release.is_set():
            try:
                with psycopg.connect(pg_cluster.dsn("refused_copy"), autocommit=False) as conn:
                    if conn.execute(loading).fetchone()[0]:
                        conn.execute("LOCK TABLE public.a_slow IN ROW EXCLUSIVE MODE")
                        release.wait(60)
                        return
            except psycopg.Error:
                pass
            time.sleep(0.005)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        result = restore_json(str(run.pk), "--into-database", "refused_copy")
        still_held = not release.is_set() and holder.is_alive()
    finally:
        release.set()
        holder.join()

    assert result["status"] == "failed", result
    assert result["error"].startswith('loading the rows of public."b.Guarded" failed:'), result["error"]
    assert "row 90000 refused" in result["error"]
    assert still_held  # it did not wait for a_slow's index build
    assert pg_cluster.execute("SELECT count(*) FROM pg_database WHERE datname = 'refused_copy'") == [(0,)]


def test_an_archive_before_1_13_or_a_corrupt_chunk_length_is_not_read_on(tmp_path):
    """Found by review: before 1.13 pg_restore set the search_path for each entry (names were not
    schema-qualified): left to it. A flipped byte in a chunk's length is said at once, not read
    into memory until the sha256 fails."""
    path = tmp_path / "dump"
    decrypted = threading.Event()
    decrypted.set()
    path.write_bytes(b"PGDMP" + bytes([1, 12, 0, 4, 8, 1]) + b"\0" * 64)
    with pytest.raises(dumparchive.Unsupported, match="archive version 1.12"):
        dumparchive.Archive(dumparchive.Cursor(dumparchive.GrowingFile(path, decrypted, threading.Event()), 0))
    path.write_bytes(b"\x00" + (0x7F000000).to_bytes(4, "little") + b"x" * 1000)
    cursor = dumparchive.Cursor(dumparchive.GrowingFile(path, decrypted, threading.Event()), 0)
    with pytest.raises(dumparchive.Ended, match="a data chunk of 2130706432 bytes: the copy is corrupt"):
        cursor.chunk_length()


class SlowStart(Tool):
    """A long program standing in for an early index build, slow to start (the start is where
    stop_now could miss it)."""

    starting = None

    def start(self):
        self.starting.set()
        time.sleep(0.5)
        return super().start()


@pytest.mark.parametrize("tool", [Tool, SlowStart])
def test_stop_now_ends_an_early_build_even_one_starting(tmp_path, tool):
    """Found by review: a build noted before its program started was skipped by stop_now, and a
    failed restore waited for the whole build."""
    (tmp_path / "dump").write_bytes(b"")
    build = tool(["sleep", "60"], {})
    build.starting = threading.Event()
    loader = dumpstream.Loader(tmp_path / "dump", threading.Event(), None, lambda dump_id: build, b"", 1, None)
    raised = []
    building = threading.Thread(target=lambda: raised.append(pytest.raises(dumpstream.Ended, loader._build, 7)))
    building.start()
    if tool is SlowStart:
        wait_for(build.starting.is_set, what="the build to be starting")
    else:
        wait_for(lambda: build in loader.building, what="the build to be running")
    loader.stop_now()
    building.join(30)
    assert not building.is_alive() and raised and build.proc.returncode == -9  # killed, not waited for


COMMENTED = r"""
CREATE TABLE public.a (id int PRIMARY KEY, body text);
INSERT INTO public.a SELECT g, md5(g::text) FROM generate_series(1, 1000) g;
CREATE INDEX a_body ON public.a (body);
CREATE TABLE public.b (id int REFERENCES public.a, note text);
INSERT INTO public.b SELECT g, 'n' FROM generate_series(1, 1000) g;
COMMENT ON INDEX public.a_body IS 'the index''s own comment';
COMMENT ON CONSTRAINT a_pkey ON public.a IS 'the key''s';
COMMENT ON CONSTRAINT b_id_fkey ON public.b IS 'the foreign key''s';
"""


@pytest.mark.parametrize("pg_major", [15, 18])
def test_the_comments_on_indexes_and_keys_built_early_are_restored(pg_cluster, passphrase_file, backup_root, loaders):
    """Found by probing: the final pg_restore's use-list left out what was built early, and
    pg_restore -L moves what a list leaves out to the front of its table of contents: a comment
    on such an index or key then followed a pre-data entry, counted as pre-data, and was skipped
    by --section=data --section=post-data. The copy lost every such comment."""
    run = dumped(pg_cluster, "commented", schema=COMMENTED)

    result = restore_json(str(run.pk), "--into-database", "commented_copy")

    assert result["status"] == "succeeded", result["error"]
    (loader,) = loaders
    built = {e.tag for e in loader.archive.entries if e.id in loader.wanted and e.desc != b"STATISTICS DATA"}
    assert built == {b"a_body", b"a a_pkey", b"b b_id_fkey"}, built
    assert awkward_schema.schema(pg_cluster, "commented_copy") == awkward_schema.schema(pg_cluster, "commented")


def test_a_parallel_restore_by_a_role_without_superuser_or_replication_waits_for_its_database(
    pg_cluster, passphrase_file, backup_root, loaders, monkeypatch
):
    """Found by probing: the schema's pg_restore was made ready (its password checked by a
    connection to the new database) while CREATE DATABASE still ran beside the decryption. Only a
    role that may connect for replication got past the "does not exist"; any other restoring role
    failed every parallel restore, naming a database that was about to be there."""
    run = dumped(pg_cluster, "by_role", schema=COMMENTED)
    # Not a superuser; a member of the role owning the dump's objects, to give them back to it.
    pg_cluster.execute("CREATE ROLE restorer LOGIN CREATEDB PASSWORD 'restorer-Pw-5' IN ROLE postgres")
    register_as = Server(name="as_restorer", dsn=pg_cluster.dsn("postgres", user="restorer"), password="restorer-Pw-5")
    register_as.save()
    slow, create = [], targetdb.create_database

    def slow_create(*args, **kwargs):  # as on a busy server: the copy of template1 takes a moment
        slow.append(time.sleep(1))
        return create(*args, **kwargs)

    monkeypatch.setattr(targetdb, "create_database", slow_create)

    result = restore_json(str(run.pk), "--into-database", "by_role_copy", "--into-server", "as_restorer")

    assert result["status"] == "succeeded", result["error"]
    assert slow and loaders[0].done
    same = "SELECT count(*), sum(id) FROM public.a"
    assert pg_cluster.execute(same, dbname="by_role_copy") == pg_cluster.execute(same, dbname="by_role")
