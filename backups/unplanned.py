"""Reading a table without planning a query over it, where the planner would run its owner's code.

To plan any query on a table PostgreSQL loads its index expressions, partial-index predicates
and expression statistics (and a partitioned table's key) and folds their constants: an
IMMUTABLE function of the owner's, called there with constant arguments, runs as whoever plans,
the portal's role, often a superuser (a read-only transaction still lets a superuser's
`COPY ... TO PROGRAM` through). `COPY table TO` plans nothing, as pg_dump's own reads do: such
tables are counted and digested with it. The others keep the batched count(*) (bench/ROWCOUNTS.md).

A table is judged on the latest catalog, under a SHARE UPDATE EXCLUSIVE lock taken first: the
planner reads the latest catalog, not the snapshot's, and CREATE INDEX or CREATE STATISTICS,
which the backup's ACCESS SHARE lets through, would otherwise land between the check and the plan.
"""

import hashlib

import psycopg

# The tables among the oids whose planning would run code from outside pg_catalog (only a
# superuser puts anything there): a function, an operator or a type's input function in an index,
# a partial index's WHERE, expression statistics, or (the table's own) a partition key. With
# `descendants`, each table stands for itself and every table under it, as a planned FROM t has it.
OWNER_CODE = """
WITH RECURSIVE rel(root, oid) AS (
  SELECT r, r FROM pg_catalog.unnest(%(oids)s::pg_catalog.oid[]) r
  UNION SELECT rel.root, i.inhrelid FROM rel JOIN pg_catalog.pg_inherits i ON i.inhparent OPERATOR(pg_catalog.=) rel.oid
  WHERE %(descendants)s
), obj(root, classid, objid, own) AS (
  SELECT root, 'pg_catalog.pg_class'::pg_catalog.regclass, oid, true FROM rel
  UNION ALL SELECT rel.root, 'pg_catalog.pg_class'::pg_catalog.regclass, i.indexrelid, false
  FROM rel JOIN pg_catalog.pg_index i ON i.indrelid OPERATOR(pg_catalog.=) rel.oid
  UNION ALL SELECT rel.root, 'pg_catalog.pg_statistic_ext'::pg_catalog.regclass, s.oid, false
  FROM rel JOIN pg_catalog.pg_statistic_ext s ON s.stxrelid OPERATOR(pg_catalog.=) rel.oid
)
SELECT DISTINCT obj.root FROM obj
JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) obj.classid AND d.objid OPERATOR(pg_catalog.=) obj.objid
LEFT JOIN pg_catalog.pg_proc p
  ON d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid OPERATOR(pg_catalog.=) d.refobjid
LEFT JOIN pg_catalog.pg_operator o
  ON d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_operator'::pg_catalog.regclass AND o.oid OPERATOR(pg_catalog.=) d.refobjid
LEFT JOIN pg_catalog.pg_type t  -- a table's own columns' types run nothing when it is read
  ON d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_type'::pg_catalog.regclass AND t.oid OPERATOR(pg_catalog.=) d.refobjid
  AND NOT obj.own
WHERE p.pronamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace
   OR o.oprnamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace
   OR t.typnamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace
"""

# The column COPY writes least of (fixed-width, the narrowest first): counting needs the rows,
# not their values. Generated columns cannot be copied. None: COPY the table with no column list.
NARROWEST = """
SELECT pg_catalog.convert_to(pg_catalog.quote_ident(attname), pg_catalog.pg_client_encoding())
FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=) %s AND attnum OPERATOR(pg_catalog.>) 0
  AND NOT attisdropped AND attgenerated OPERATOR(pg_catalog.=) ''
ORDER BY attlen OPERATOR(pg_catalog.<) 0, attlen, attnum LIMIT 1
"""

# What a v2 digest reads: the table and every table under it (a planned FROM t reads them all),
# each with the columns of the table digested, in name order. Generated columns cannot be copied.
COPIED = """
WITH RECURSIVE rel(oid) AS (
  SELECT %(oid)s::pg_catalog.oid
  UNION SELECT i.inhrelid FROM rel JOIN pg_catalog.pg_inherits i ON i.inhparent OPERATOR(pg_catalog.=) rel.oid
)
SELECT pg_catalog.convert_to(pg_catalog.format('%%I.%%I', n.nspname, c.relname), pg_catalog.pg_client_encoding())
FROM rel JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) rel.oid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE c.relkind OPERATOR(pg_catalog.=) 'r' ORDER BY 1
"""
COPIED_COLUMNS = """
SELECT pg_catalog.convert_to(pg_catalog.quote_ident(attname), pg_catalog.pg_client_encoding())
FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=) %s AND attnum OPERATOR(pg_catalog.>) 0
  AND NOT attisdropped AND attgenerated OPERATOR(pg_catalog.=) '' ORDER BY attname COLLATE "C"
"""

V2 = "v2:"  # the prefix of a digest made by COPY (digest_by_copy); older ones have none


def planned_safely(conn, catalog, oids, from_clauses, descendants=False):
    """The oids, of `oids`, whose planning runs no owner's code, in `conn`'s transaction, which
    holds each of them (and, with `descendants`, the tables under them) until it ends, so that no
    index or statistics come in before the plan. `catalog`: a session that sees the latest
    catalog (`conn` itself when its transaction is READ COMMITTED). A table that cannot be locked
    at once (VACUUM or CREATE INDEX running on it, a role without the right) is read by COPY:
    the backup waits on nothing of production's and holds up nothing for long."""
    only = b"" if descendants else b"ONLY "
    locked = _locked(conn, [only + clause for clause in from_clauses])
    oids = [oid for oid, ok in zip(oids, locked, strict=True) if ok]
    if not oids:
        return set()
    unsafe = {row[0] for row in catalog.execute(OWNER_CODE, {"oids": oids, "descendants": descendants})}
    return {oid for oid in oids if oid not in unsafe}


def _locked(conn, names):
    """[True when locked] for each of `names` (b"ONLY schema.table"), never waiting."""
    if _try(conn, b"LOCK TABLE " + b", ".join(names) + b" IN SHARE UPDATE EXCLUSIVE MODE NOWAIT"):
        return [True] * len(names)
    return [_try(conn, b"LOCK TABLE " + name + b" IN SHARE UPDATE EXCLUSIVE MODE NOWAIT") for name in names]


def _try(conn, statement):
    try:
        with conn.transaction():  # a savepoint: a lock not granted leaves the transaction usable
            conn.execute(statement)
        return True
    except psycopg.Error:
        return False


def may_write_server_files(conn):
    """Whether COPY may write to a server file: then /dev/null takes the rows, none cross the network."""
    return conn.execute("SELECT pg_catalog.pg_has_role('pg_write_server_files', 'USAGE')").fetchone()[0]


def count_by_copy(conn, oid, table, to_file):
    """The rows of `table` (b"schema.table", its own rows: COPY TO copies no child's), by COPY."""
    row = conn.execute(NARROWEST, [oid]).fetchone()
    columns = b" (" + row[0] + b")" if row else b""
    if to_file:
        return conn.execute(b"COPY " + table + columns + b" TO '/dev/null'").rowcount
    rows = 0
    with conn.cursor().copy(b"COPY " + table + columns + b" TO STDOUT") as copy:
        for _ in copy:  # one CopyData message a row (the protocol's rule)
            rows += 1
    return rows


def digest_by_copy(conn, oid):
    """v2:rows:sum, the sum (mod 2**64) of a 64-bit hash of each row's COPY text: as the planned
    digest, rows in any order give the same, any other row changes it. In the caller's settings
    (tables.DIGEST_SETTINGS). Generated columns are left out: COPY cannot read them."""
    columns = b", ".join(row[0] for row in conn.execute(COPIED_COLUMNS, [oid]))
    rows, total = 0, 0
    for (table,) in conn.execute(COPIED, {"oid": oid}).fetchall():
        listed = b" (" + columns + b")" if columns else b""
        with conn.cursor().copy(b"COPY " + table + listed + b" TO STDOUT") as copy:
            for row in copy:  # one CopyData message a row
                rows += 1
                total += int.from_bytes(hashlib.blake2b(row, digest_size=8).digest(), "little")
    return f"{V2}{rows}:{total % 2**64}"
