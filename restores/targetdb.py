"""The database a restore makes, and its removal.

A restored copy is created as the dump says, and dropped when the restore fails or a restore
test is done with it. What a dump brings can refuse the drop: a template (IS_TEMPLATE), and
subscriptions. pg_restore recreates each subscription disabled but naming the production
subscriber's slot: ENABLE in the copy would take that slot from production, DROP SUBSCRIPTION
would drop it on the publisher, and DROP DATABASE refuses a database that holds one. The restore
detaches each (slot_name = NONE) and says how to resume it; a drop detaches whatever is left.
"""

import re

import psycopg
from psycopg import sql

from backupportal.lib.pgerrors import explain
from backups.binaries import server_major
from restores import cluster_globals

# Production's event triggers come with its copy: from PostgreSQL 17 a login trigger fires on
# every connection (one that records logins changes the counts a restore test compares; one that
# refuses unknown roles shuts the portal out), and DDL triggers fire on the portal's own
# statements there (detaching a subscription, moving to a tablespace). event_triggers = off (17+)
# is a superuser's to set.
EVENT_TRIGGERS_OFF = "-c event_triggers=off"
# A copy of a database set read-only (ALTER DATABASE ... SET default_transaction_read_only) is
# still the portal's to finish: detaching, moving to tablespaces, its event triggers.
WRITABLE = "-c default_transaction_read_only=off"

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class RestoreFailed(Exception):
    """The restore failed; the message is one line a DBA can act on."""


def check_database_name(name):
    if not name or not IDENTIFIER.match(name):
        raise RestoreFailed(
            f"{name!r} is not a valid database name here: use lower-case letters, digits and _ (at most 63), starting with a letter"
        )


def database_exists(server, name):
    try:
        with writable(server) as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None
    except psycopg.Error as e:
        raise RestoreFailed(explain(e, server)) from None


def create_database(server, name, statements=None):
    """CREATE DATABASE name, as `statements` say (_create_statements: the dump's encoding,
    locale, template, then its ACL's revokes from PUBLIC); dropped again when one after the
    CREATE fails. RestoreFailed, one line."""
    statements = statements or [sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))]
    try:
        with writable(server) as conn:
            conn.execute(statements[0])
            try:
                for statement in statements[1:]:
                    conn.execute(statement)
            except psycopg.Error:
                conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
                raise
    except psycopg.Error as e:
        raise RestoreFailed(explain(e, server)) from None


def created(creation, server):
    """Wait for the CREATE DATABASE started beside the decryption; its error as one line."""
    try:
        creation.result()
    except psycopg.Error as e:
        raise RestoreFailed(explain(e, server)) from None


def drop_database(server, name):
    """DROP DATABASE name, when it exists, and also when what came from the dump refuses it: a
    template (IS_TEMPLATE) or a database holding subscriptions, each first detached from its
    slot (a DROP SUBSCRIPTION that names one drops it on the publisher: production's slot).
    RestoreFailed, one line."""
    try:
        with writable(server) as conn:
            row = conn.execute(
                "SELECT datistemplate, datallowconn, EXISTS (SELECT subdbid FROM pg_subscription WHERE subdbid = d.oid)"
                " FROM pg_database d WHERE datname = %s",
                [name],
            ).fetchone()
            if row is None:
                return
            template, connectable, subscribed = row
            db = sql.Identifier(name)
            if template:
                conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(db))
            if subscribed:
                if not connectable:  # ALTER and DROP SUBSCRIPTION run inside the database
                    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(db))
                with connect_to_copy(server, name) as inside:
                    for subscription, _, _ in in_database(inside):
                        detach(inside, subscription)
                        inside.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(subscription)))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db))
    except psycopg.Error as e:
        raise RestoreFailed(f"database {name} on {server} could not be dropped: {explain(e, server)}") from None


def dropped(server, name):
    """drop_database for a cleanup, which never raises: '' when done, else one line saying
    what is left behind."""
    try:
        drop_database(server, name)
    except RestoreFailed as e:
        return f"{e}: drop it by hand"
    return ""


def writable(server, dbname="postgres"):
    """server.connect(dbname) for a restore's own statements (CREATE and DROP DATABASE, what is
    asked of the copy's server), writable whatever default_transaction_read_only the role or the
    database sets: a restore writes by definition, and a DBA's read-only default for the portal's
    role failed every restore at its CREATE DATABASE (a probe's finding)."""
    options = f"{server.connection_settings(dbname).get('options') or ''} {WRITABLE}".strip()
    return server.connect(dbname, options=options)


def connect_to_copy(target, dbname):
    """A connection into `dbname`, a restored copy on `target`, with production's event
    triggers off where the portal's role may turn them off (a superuser, 17 or later)."""
    options = f"{target.connection_settings(dbname).get('options') or ''} {WRITABLE}".strip()
    return quietly(lambda **more: target.connect(dbname, **more), server_major(target), options)


def quietly(connect, major, options=""):
    """connect(options=...) with EVENT_TRIGGERS_OFF added to `options` on a major of 17 or
    later; when the server refuses that setting (a role that may not set it), connected again
    as any session of the role is. Any other failure is the connection's."""
    if (major or 0) >= 17:
        try:
            return connect(options=f"{options} {EVENT_TRIGGERS_OFF}".strip())
        except psycopg.OperationalError as e:
            if "event_triggers" not in str(e):  # the setting's name, in whatever language the server speaks
                raise
    return connect(options=options) if options else connect()


def in_database(conn):
    """(name, slot, enabled) of each subscription in the database `conn` is connected to."""
    return conn.execute(
        "SELECT subname, subslotname, subenabled FROM pg_catalog.pg_subscription"
        " WHERE subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()) ORDER BY 1"
    ).fetchall()


def detach(conn, subscription):
    name = sql.Identifier(subscription)
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(name))
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(name))


def detach_all(target, dbname, warnings, advice=None):
    """pg_restore recreates each subscription disabled but naming the production subscriber's
    slot: ENABLE in the copy would take that slot from production, DROP SUBSCRIPTION would drop
    it on the publisher, and DROP DATABASE refuses the copy. Each is detached (slot_name = NONE)
    and named in a warning that says how to resume it: `advice(quoted name, slot)`, by default
    for a copy beside production. psycopg.Error when the database cannot be read."""
    advice = advice or (lambda sub, slot: _how_to_resume(sub, slot, dbname))
    with connect_to_copy(target, dbname) as conn:
        for subscription, slot, _ in in_database(conn):
            if slot is None:
                continue
            quoted = sql.Identifier(subscription).as_string(conn)
            try:
                detach(conn, subscription)
            except psycopg.Error as e:
                warnings.append(_still_attached(quoted, slot, dbname, e))
                continue
            warnings.append(advice(quoted, slot))


def _how_to_resume(sub, slot, dbname):
    return (
        f"subscription {sub} in {dbname} was disabled and detached from slot {slot} (the production subscriber's;"
        " the slot on the publisher was not touched). To make this copy replicate, give it a slot of its own:"
        " on the publisher SELECT pg_create_logical_replication_slot('NEW_SLOT', 'pgoutput'); then in"
        f" {dbname}: ALTER SUBSCRIPTION {sub} SET (slot_name = 'NEW_SLOT'); ALTER SUBSCRIPTION {sub} ENABLE."
        f" Never point it at {slot} while production uses it"
    )


def _still_attached(sub, slot, dbname, error):
    why = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (
        f"subscription {sub} in {dbname} still names slot {slot} of the production subscriber: the portal's role"
        f" could not detach it ({why}). A superuser or its owner must run in {dbname}:"
        f" ALTER SUBSCRIPTION {sub} DISABLE; ALTER SUBSCRIPTION {sub} SET (slot_name = NONE); before anyone"
        " enables it, drops it (that would drop production's slot on the publisher) or drops the database"
    )


def dropped_roles(target, roles):
    """Drop the roles a failed restore (or a restore test, after its copy) created; "" when done, else one
    line saying which are left."""
    if not roles:
        return ""
    left, why = [], ""
    try:
        with writable(target) as conn:
            for role in reversed(roles):  # each on its own: one still in use stops none of the others
                try:
                    cluster_globals.drop_role(conn, role)
                except psycopg.Error as e:
                    left.append(role)
                    why = why or explain(e, target)
    except psycopg.Error as e:
        return f"roles {', '.join(roles)} created on {target} could not be dropped: {explain(e, target)}"
    return f"roles {', '.join(reversed(left))} created on {target} could not be dropped: {why}" if left else ""
