"""The tables of a protected database: their qualified names and their exact row counts.

A logical backup counts every user table in the dump's own snapshot, and a restore test
counts them again in the restored copy. Tables are named `schema.table` as PostgreSQL's
format('%I.%I') writes them (`public.users`, `sales."Order Items"`), so a name is never
ambiguous, whatever the search_path or the characters in it. Runs catalogued before every
table was counted name only the critical tables, unqualified (`users`): such a name means
`public.users`, as it did on the databases they were taken from.
"""

import string
from contextlib import nullcontext

import psycopg
from django.core.exceptions import ValidationError

from backups import unplanned

# What pg_dump puts data of: ordinary tables and leaf partitions (relkind 'r'); partitioned
# parents hold no rows of their own, so each row is counted once, in its leaf. Temporary
# tables, extension members (their rows come back with CREATE EXTENSION) and the system
# schemas are not the database's data.
# The FROM clause comes back as bytes in the connection's encoding, ready to be sent back:
# names in a SQL_ASCII database need not be valid in any encoding Python knows.
USER_TABLES = """
SELECT format('%I.%I', n.nspname, c.relname),
       convert_to(format('FROM ONLY %I.%I', n.nspname, c.relname), pg_client_encoding()), c.oid
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
  )
ORDER BY 1
"""

FIND_TABLE = """
SELECT format('%%I.%%I', n.nspname, c.relname), c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

# The leaves under a partitioned table (or the table itself when it is not partitioned).
LEAVES = """
SELECT format('%%I.%%I', n.nspname, c.relname)
FROM pg_class p JOIN pg_namespace pn ON pn.oid = p.relnamespace
CROSS JOIN LATERAL pg_partition_tree(p.oid::regclass) t
JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE pn.nspname = %s AND p.relname = %s AND t.isleaf AND c.relkind = 'r'
"""

BATCH = 200  # tables counted per query

# The planner inlines an owner's SQL function (in an expression index, a partial index's WHERE,
# expression statistics) by parsing its body with the session's search_path: with the portal's
# pg_catalog alone, a body calling its own helper() unqualified failed every count of the table
# (pg_dump's COPY plans nothing). So a count or digest reads with the database's own search_path
# (ALTER ROLE/DATABASE ... SET, the most specific first, else PostgreSQL's default) behind
# pg_catalog: nothing of a writable schema shadows a built-in, and our own queries name the
# functions and operators they use with their schema (or with types a built-in matches exactly:
# a closer match in a later schema would beat it). Transaction-local: a DBA's check on the
# same session still sees pg_catalog only (restores.validation.UNQUALIFIED).
OWNERS_PATH = """
SELECT pg_catalog.set_config('search_path', pg_catalog.concat_ws(', ', 'pg_catalog', coalesce((
    SELECT pg_catalog.substr(c, 13)
    FROM pg_catalog.pg_db_role_setting s CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) c
    WHERE s.setdatabase IN (0::pg_catalog.oid, (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()))
      AND s.setrole IN (0::pg_catalog.oid, (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user))
      AND pg_catalog.starts_with(c, 'search_path=')
    ORDER BY s.setrole DESC, s.setdatabase DESC LIMIT 1
  ), (SELECT boot_val FROM pg_catalog.pg_settings WHERE name = 'search_path')), 'pg_temp'), true)
"""

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def parse_name(text):
    """(schema, table) from `table`, `schema.table` or their quoted forms, as PostgreSQL reads them.

    Unquoted parts fold to lower case, quoted ones keep their case and dots; a bare name is
    in `public`. Raises ValueError with a line that says what is wrong.
    """
    parts, part, quoted, i = [], "", False, 0
    text = text.strip()
    while i < len(text):
        ch = text[i]
        if ch == '"':
            end = text.find('"', i + 1)
            while end != -1 and text[end + 1 : end + 2] == '"':  # "" is a quote inside a quoted name
                end = text.find('"', end + 2)
            if end == -1:
                raise ValueError(f"{text!r} has an unclosed double quote")
            part += text[i + 1 : end].replace('""', '"')
            quoted, i = True, end + 1
        elif ch == ".":
            parts.append(_finish_part(text, part, quoted))
            part, quoted, i = "", False, i + 1
        else:
            part += ch.translate(_ASCII_LOWER)
            i += 1
    parts.append(_finish_part(text, part, quoted))
    if len(parts) > 2:
        raise ValueError(f"{text!r} has too many dots")
    return ("public", parts[0]) if len(parts) == 1 else tuple(parts)


def _finish_part(text, part, quoted):
    part = part if quoted else part.strip()
    if not part:
        raise ValueError(f"{text!r} is not a table name")
    return part


def key_of(name):
    """The (schema, table) a recorded or configured name stands for, for comparisons.

    Names come from the catalog, written by us or by older versions: one that does not parse
    is taken as older versions took it, split at its last dot.
    """
    try:
        return parse_name(name)
    except ValueError:
        schema, _, table = name.rpartition(".")
        return (schema or "public", table)


def split_list(text):
    """Table names from "a, b" or one a line, commas inside double quotes kept."""
    names, current, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch in ",\n" and not quoted:
            names.append(current)
            current = ""
        else:
            current += ch
    names.append(current)
    return [n.strip() for n in names if n.strip()]


def validate_table_list(value):
    """The field's own check: a list of table names (the admin edits it as JSON)."""
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ValidationError('Critical tables are a list of names, e.g. ["public.users", "sales.orders"].')
    for name in value:
        try:
            parse_name(name)
        except ValueError as e:
            raise ValidationError(f"{e}: name a table as table or schema.table") from None


def resolve(conn, names):
    """The qualified names of `names` in the database of `conn`, or ValueError naming what is wrong.

    Every name must be an existing table (partitioned or not), not a view or anything else.
    """
    qualified, problems = [], []
    for name in names:
        try:
            schema, table = parse_name(name)
        except ValueError as e:
            problems.append(str(e))
            continue
        row = conn.execute(FIND_TABLE, [schema, table]).fetchone()
        if row is None:
            problems.append(f"{name} does not exist in database {conn.info.dbname}")
        elif row[1] not in ("r", "p"):
            problems.append(f"{name} is not a table")
        elif row[0] not in qualified:
            qualified.append(row[0])
    if problems:
        raise ValueError("; ".join(problems) + ": give existing tables as table or schema.table")
    return qualified


def user_tables(conn):
    """(qualified name, its FROM clause as bytes, its oid) of every user table (USER_TABLES)."""
    return [_text_row(row) for row in conn.execute(USER_TABLES).fetchall()]


def lock_all(conn, listed):
    """ACCESS SHARE on every table `listed` (user_tables; their indexes untouched), in `conn`'s
    transaction: while pg_dump's exporting transaction holds them, no TRUNCATE or rewrite lands
    between a table's count and pg_dump's own lock on it (a count of 100 rows, a dump of none).
    One lock a table, as pg_dump takes; the counting's index locks go with each batch's transaction."""
    clauses = [from_clause for _, from_clause, _ in listed]  # b"FROM ONLY schema.table"
    for start in range(0, len(clauses), BATCH * 5):
        names = [b"ONLY " + clause[len(b"FROM ONLY ") :] for clause in clauses[start : start + BATCH * 5]]
        conn.execute(b"LOCK TABLE " + b", ".join(names) + b" IN ACCESS SHARE MODE")


def count_all(conn, errors=None, transaction=nullcontext, listed=None, catalog=None):
    """{qualified name: exact row count} of every user table, each table's own rows (ONLY).

    With an `errors` dict (on an autocommit connection), a table that cannot be read is noted
    there and the others are still counted; without one, the first error is raised.
    `transaction()`: a context the listing and each batch of tables run in (a backup's: one
    transaction each in its snapshot, so that no transaction holds a lock on every table);
    `listed`: user_tables() already read in that snapshot; `catalog`: a session that sees the
    latest catalog, when `transaction()` is a snapshot's (backups.unplanned.planned_safely).

    Row-level security off, as pg_dump has it: a policy's functions, a table owner's code, would
    otherwise run with the portal's role (and its reach) on every count. A role that the policy
    does not let by then cannot read the table: pg_dump could not dump it either.
    """
    conn.execute("SET row_security = off")
    to_file = unplanned.may_write_server_files(conn)
    if listed is None:
        with transaction():
            listed = user_tables(conn)
    counts = {}
    for start in range(0, len(listed), BATCH):
        batch = listed[start : start + BATCH]
        try:
            with transaction():
                counts.update(_count_batch(conn, batch, catalog or conn, to_file))
        except psycopg.Error:
            if errors is None:
                raise
            for one in batch:  # find the tables that cannot be read, count the rest
                try:
                    counts.update(_count_batch(conn, [one], catalog or conn, to_file))
                except psycopg.Error as e:
                    errors[one[0]] = str(e).splitlines()[0]
    return counts


def _text_row(row):
    """A SQL_ASCII database hands names over as bytes: name them as text, undecodable bytes escaped."""
    name, from_clause, oid = row
    return (name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name), from_clause, oid


def _count_batch(conn, batch, catalog, to_file):
    # One query for many tables: with thousands of small tables the round trips, not the
    # scans, are the cost (bench/ROWCOUNTS.md). A table whose planning would run its owner's
    # code is counted by COPY, which plans nothing (backups.unplanned).
    counts = {}
    with conn.transaction():  # the locks and OWNERS_PATH last as long as it (a backup's: one per batch)
        clauses = [from_clause[len(b"FROM ONLY ") :] for _, from_clause, _ in batch]
        safe = unplanned.planned_safely(conn, catalog, [oid for _, _, oid in batch], clauses)
        for name, from_clause, oid in batch:
            if oid not in safe:
                counts[name] = unplanned.count_by_copy(conn, oid, from_clause[len(b"FROM ONLY ") :], to_file)
        parts = [
            b"SELECT %d::int, pg_catalog.count(*) %s" % (i, row[1]) for i, row in enumerate(batch) if row[2] in safe
        ]
        if parts:
            conn.execute(OWNERS_PATH)
            counts.update({batch[i][0]: n for i, n in conn.execute(b" UNION ALL ".join(parts)).fetchall()})
    return counts


# Each row's text, hashed and summed: the same rows give the same digest in any order, any other
# row changes it. The row as jsonb, its columns by name: pg_dump may give a restored table its
# columns in another order (an inheritance child's). The text is the same on the copy only in
# the same settings: these, every time.
DIGEST_SETTINGS = (
    ("DateStyle", "ISO, YMD"), ("IntervalStyle", "postgres"), ("TimeZone", "UTC"),
    ("extra_float_digits", "3"), ("bytea_output", "hex"), ("lc_monetary", "C"), ("row_security", "off"),
)  # fmt: skip


def content_digest(conn, name, catalog=None, recorded=None):
    """A digest of the rows of table `name` (a partitioned table's: its leaves'), order aside, or
    None when it cannot be read. In the caller's transaction (a backup's snapshot) when it has one.

    A table whose planning would run its owner's code (backups.unplanned) is digested by COPY, a
    "v2:" digest that leaves generated columns out; the others by a planned query, which also
    catches a generated column computed otherwise on the way. With the `recorded` digest of a
    backup, the same method as it (a restore test's copy). `catalog`: as for count_all.
    """
    from psycopg import sql

    schema, table = key_of(name)
    query = sql.SQL(
        "SELECT pg_catalog.count(*)::pg_catalog.text OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) "
        "coalesce(pg_catalog.sum(pg_catalog.hashtextextended(pg_catalog.to_jsonb(t)::pg_catalog.text, 0)), 0)"
        "::pg_catalog.text FROM {}.{} AS t"
    ).format(sql.Identifier(schema), sql.Identifier(table))
    try:
        with conn.transaction():  # a savepoint inside the snapshot's: a failure leaves it usable
            for setting, value in DIGEST_SETTINGS:
                conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", [setting, value])
            oid = conn.execute(REGCLASS, [schema, table]).fetchone()[0]
            if oid is None:
                return None
            if _by_copy(conn, catalog or conn, oid, recorded):
                return unplanned.digest_by_copy(conn, oid)
            conn.execute(OWNERS_PATH)
            return conn.execute(query).fetchone()[0]
    except psycopg.Error:
        return None


REGCLASS = "SELECT pg_catalog.to_regclass(pg_catalog.format('%%I.%%I', %s::text, %s::text))::pg_catalog.oid"


def _by_copy(conn, catalog, oid, recorded):
    if recorded is not None:  # the backup's method, whichever the copy's catalog would choose
        return recorded.startswith(unplanned.V2)
    clause = conn.execute(
        "SELECT pg_catalog.convert_to(pg_catalog.format('%%I.%%I', n.nspname, c.relname), pg_catalog.pg_client_encoding()) "
        "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
        "WHERE c.oid OPERATOR(pg_catalog.=) %s",
        [oid],
    ).fetchone()[0]
    return oid not in unplanned.planned_safely(conn, catalog, [oid], [clause], descendants=True)


def normalized(counts):
    """Recorded counts keyed by (schema, table), whichever way they were named."""
    return {key_of(name): n for name, n in (counts or {}).items()}


def total(conn, name, counts):
    """Rows of table `name` according to `counts` (keyed by (schema, table)): a partitioned
    table's are the sum of its leaves. None when neither it nor any leaf of it is counted.
    """
    key = key_of(name)
    if key in counts:
        return counts[key]
    leaves = [key_of(r[0]) for r in conn.execute(LEAVES, list(key)).fetchall()]
    counted = [counts[leaf] for leaf in leaves if counts.get(leaf) is not None]
    return sum(counted) if counted else None


def shrank(conn, name, actual, previous, previous_id, threshold_pct):
    """One line when `actual` rows of table `name` are down past `threshold_pct` against the
    `previous` counts (keyed by (schema, table)) of backup #`previous_id`, else ''."""
    prev = total(conn, name, previous)
    if not prev or actual >= prev * (100 - threshold_pct) / 100:
        return ""
    shrink = 100 - actual * 100 // prev
    return f"{actual} rows, down {shrink}% from {prev} in backup #{previous_id} (threshold {threshold_pct}%)"


def qualified(conn, name):
    """schema.table as PostgreSQL quotes it: the name checks and pages show, old names included."""
    return conn.execute("SELECT format('%%I.%%I', %s::text, %s::text)", list(key_of(name))).fetchone()[0]
