"""A parallel logical restore loads the tables' rows by COPY while gpg still decrypts the dump
(restores.dumpstream), and builds a big table's own indexes as soon as its rows are in: the copy
must be the same as pg_restore alone makes it, rows, indexes, sequences, large objects and all."""

import pytest

from restores import dumpstream
from tests.helpers import restore_json
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


def dumped(cluster, name, options=""):
    """A logical backup of a new database `name` holding AWKWARD."""
    protect(cluster, "source")
    cluster.execute(f"CREATE DATABASE {name} {options}")
    cluster.execute(AWKWARD, dbname=name)
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

    assert result["status"] == "succeeded", result
    assert content(pg_cluster, "streamed_copy") == content(pg_cluster, "streamed")
    (loader,) = loaders
    assert loader.error is None
    streamed = set(loader.rows)  # every table's rows were COPY, none left to pg_restore
    assert len(streamed) == 6 and streamed <= loader.done  # big, Odd, empty, child, parted_a, parted_b
    early = {i for ids in loader.own.values() for i in ids}
    assert early and early <= loader.done  # big's, Odd's and empty's primary keys and indexes
    assert pg_cluster.execute(
        "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'streamed_copy'"
    ) == [(encoding,)]


def test_without_streaming_pg_restore_loads_everything(pg_cluster, passphrase_file, backup_root, loaders, settings):
    settings.RESTORE_STREAM_DATA = False
    run = dumped(pg_cluster, "plain")

    result = restore_json(str(run.pk), "--into-database", "plain_copy")

    assert result["status"] == "succeeded", result
    assert content(pg_cluster, "plain_copy") == content(pg_cluster, "plain")
    assert loaders == []


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

    assert result["status"] == "succeeded", result
    assert content(pg_cluster, "raw_copy") == content(pg_cluster, "raw")
    (loader,) = loaders
    assert loader.done == set() and loader.error is None
