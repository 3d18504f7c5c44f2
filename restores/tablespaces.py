"""Tablespaces of a logical restore onto another cluster: the default one, or --tablespace-map.

The source's tablespaces are directories on the source's host: onto another cluster the
restore never creates them (pg_restore --no-tablespaces puts every object in the target's
default tablespace). `--tablespace-map OLD=NEW` then moves the tables, indexes and
materialized views that were in OLD into NEW, an existing tablespace of the target. Which
objects were where is read from the dump's own table of contents (pg_restore's
"-- Name: ...; Tablespace: OLD" headers, from the decrypted start of the dump).
"""

import re
import subprocess

import psycopg
from psycopg import sql

from backupportal.lib.childenv import child_env
from restores.targetdb import connect_to_copy, writable

# pg_restore's header above each object: names are printed raw (newlines made spaces).
HEADER = re.compile(
    r"^-- (?:Data for )?Name: (?P<name>.*); Type: (?P<type>TABLE|INDEX|MATERIALIZED VIEW|CONSTRAINT); "
    r"Schema: (?P<schema>.*); Owner: .*; Tablespace: (?P<tablespace>.*)$",
    re.M,
)
ALTER = {"TABLE": "ALTER TABLE", "INDEX": "ALTER INDEX", "MATERIALIZED VIEW": "ALTER MATERIALIZED VIEW"}


def parse_tablespace_map(pairs):
    """["OLD=NEW", ...] -> {OLD: NEW}; ValueError with one line for anything else."""
    mapping = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"--tablespace-map {pair!r}: write it as OLD=NEW (a tablespace of the source = one here)")
        if old in mapping:
            raise ValueError(f"--tablespace-map names {old} twice: give one NEW for each OLD")
        mapping[old] = new
    return mapping


def check_tablespaces(target, mapping):
    """ValueError for a map whose NEW tablespace does not exist on the target, before anything is made."""
    if not mapping:
        return
    with writable(target) as conn:
        there = {name for (name,) in conn.execute("SELECT spcname FROM pg_tablespace")}
    missing = sorted(set(mapping.values()) - there)
    if missing:
        raise ValueError(
            f"tablespace {', '.join(missing)} does not exist on {target}: create it there first, or map to one that exists"
        )


def objects_by_tablespace(head, pg_restore):
    """{tablespace: [(type, schema, name)]} of the dump's tables, indexes and materialized views."""
    done = subprocess.run(
        [str(pg_restore), "--schema-only", "--file=-"],
        input=head,
        capture_output=True,
        env=child_env({}),
        timeout=300,
    )
    found = {}
    for m in HEADER.finditer(done.stdout.decode(errors="replace")):
        found.setdefault(m["tablespace"], []).append((m["type"], m["schema"], m["name"]))
    return found


def relocate(props, target, dbname, mapping, warnings):
    """Move what was in each mapped tablespace into its NEW one; name what stays in the default."""
    if props is None or props.head is None:
        warnings.append("the dump's table of contents could not be read: nothing was moved by --tablespace-map")
        return []
    placed = objects_by_tablespace(props.head, props.pg_restore)
    notes, moved = [], 0
    with connect_to_copy(target, dbname) as conn:
        for old, objects in placed.items():
            new = mapping.get(old)
            if new is None:
                notes.append(f"{len(objects)} objects of tablespace {old} restored into the default tablespace")
                continue
            for kind, schema, name in objects:
                moved += _move(conn, kind, schema, name, new, warnings)
    unused = sorted(set(mapping) - set(placed))
    if unused:
        notes.append(f"--tablespace-map: the dump has nothing in {', '.join(unused)}")
    return [f"{moved} objects moved by --tablespace-map"] + notes


def _move(conn, kind, schema, name, new, warnings):
    if kind == "CONSTRAINT":  # "table constraint": the index behind it moves
        row = conn.execute(
            "SELECT c.conindid::regclass::text FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
            " JOIN pg_namespace n ON n.oid = t.relnamespace"
            " WHERE n.nspname = %s AND t.relname || ' ' || c.conname = %s AND c.conindid <> 0",
            [schema, name],
        ).fetchone()
        if row is None:
            warnings.append(f"--tablespace-map: constraint {schema}.{name} not found: its index was not moved")
            return 0
        statement = sql.SQL("ALTER INDEX {} SET TABLESPACE {}").format(sql.SQL(row[0]), sql.Identifier(new))
    else:
        statement = sql.SQL("{} {} SET TABLESPACE {}").format(
            sql.SQL(ALTER[kind]), sql.Identifier(schema, name), sql.Identifier(new)
        )
    try:
        conn.execute(statement)
        return 1
    except psycopg.Error as e:
        warnings.append(f"--tablespace-map: {kind.lower()} {schema}.{name} not moved to {new}: {str(e).strip()}")
        return 0
