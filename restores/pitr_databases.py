"""Is every database of the restored cluster there? Asked of the copy once it accepts connections.

A base backup taken before the portal failed on the server's "skipping special file" WARNING
lacks the directory of a database moved to another disk by hand (base/OID a symbolic link on
the source): neither its manifest nor pg_verifybackup knows of it, recovery replays without it,
and the copy said "succeeded" while connecting to that database failed ("database does not
exist", "could not open file"). So each database pg_database lists is looked for: its directory
base/OID in the restored data directory, and a connection to it. One that is missing fails the
restore, by name. Databases no one can connect to (datallowconn false: template0) or that a
DROP DATABASE left invalid (datconnlimit -2) are passed over; a database in another tablespace
(which a portal base backup refuses) is only noted.
"""

import psycopg

from restores.pitr_plan import RestoreFailed

DATABASES = (
    "SELECT d.oid, d.datname, t.spcname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace"
    " WHERE d.datallowconn AND d.datconnlimit <> -2 ORDER BY d.datname"
)
# What a connection to a database whose directory is gone says (postinit.c, in lc_messages C: the
# copy runs with it, pitr_recovery.recovery_settings; the SQLSTATE is the same in any language).
GONE = ("does not exist", "is missing", "could not open file", "No such file")


def check_all_present(plan, connect):
    """RestoreFailed naming the first database whose files the restored cluster lacks; `connect`
    (plan, dbname) opens a connection to the copy. Notes for what could not be checked."""
    databases = list_databases(plan, connect)
    if databases is None:
        return
    for oid, name, tablespace in databases:
        if tablespace != "pg_default":  # base backups refuse tablespaces: nothing to look for in base/
            plan.notes.append(f"database {name} is in tablespace {tablespace}: its files were not looked for")
            continue
        if not (plan.datadir / "base" / str(oid)).is_dir():
            raise missing(plan, name, oid, "its directory is not in the restored data directory")
        why = connection_refused(plan, connect, name)
        if why and gone(why):
            raise missing(plan, name, oid, f"a connection to it fails: {why}")
        if why:  # pg_hba.conf or CONNECT privilege: the files are there, the role may not enter
            plan.notes.append(f"database {name} could not be entered by the server's role to check it: {why}")


def list_databases(plan, connect):
    """(oid, name, tablespace) of each database one may connect to, asked through any database
    that takes the connection; None (and a note) when none does."""
    why = ""
    for dbname in dict.fromkeys([plan.server.dbname, "postgres", "template1"]):
        try:
            with connect(plan, dbname) as conn:
                return conn.execute(DATABASES).fetchall()
        except psycopg.Error as e:
            why = why or first_line(e)
    plan.notes.append(f"the restored cluster's databases could not be listed to check they are all there: {why}")
    return None


def connection_refused(plan, connect, name):
    """Why a connection to database `name` of the copy fails ("" when it succeeds)."""
    try:
        with connect(plan, name) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return first_line(e)
    return ""


def gone(why):
    return any(said in why for said in GONE)


def missing(plan, name, oid, why):
    return RestoreFailed(
        f"database {name} is missing from the restored cluster ({why}): base backup #{plan.base.pk} left out"
        f" its directory base/{oid}, which was a symbolic link on the source (moved to another disk), so the"
        " server skipped it with only a WARNING; move the directory back into the data directory, take a new"
        " base backup and restore from that"
    )


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
