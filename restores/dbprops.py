"""The database's own properties, as the dump holds them, re-issued for the restore's new name.

`pg_restore -d NEW` restores what is inside a database but not the database itself: its
encoding and locale, owner, ACL (a REVOKE CONNECT ... FROM PUBLIC), comment, ALTER DATABASE
... SET and ALTER ROLE ... IN DATABASE ... SET. Only `pg_restore --create` applies them, and
only under the dump's own name. So the portal reads the dump's DATABASE, COMMENT, ACL,
SECURITY LABEL and DATABASE PROPERTIES entries (`pg_restore --create -l`, then `-L` of those
entries from the decrypted start of the dump), recognises each statement, and rebuilds it with
psycopg.sql for the new name. A statement it does not recognise, or one the target refuses (an owner role
that does not exist there), is a warning that names it: never silently left out.
"""

import io
import os
import re
import subprocess
import threading

import psycopg
from psycopg import sql

from backupportal.lib.childenv import child_env
from backups.crypto import die_with_parent, gpg_failure, stopping_on_purpose
from restores.sqlscript import (
    CODECS,
    IDENT,
    LITERAL,
    NotText,
    literal_list,
    script_text,
    statements,
    unquote_ident,
    unquote_literal,
)

# The dump's own entries for the database (pg_restore --create -l lines).
DATABASE_ENTRY = re.compile(
    r"^\d+; \d+ \d+ (?:DATABASE|DATABASE PROPERTIES|(?:COMMENT|ACL|SECURITY LABEL) - DATABASE) "
)
# Event triggers and what is said of them: held back until the portal is done in the copy (logical.EventTriggers).
EVENT_TRIGGER_ENTRY = re.compile(r"^\d+; \d+ \d+ (?:EVENT TRIGGER - |(?:COMMENT|SECURITY LABEL) - EVENT TRIGGER )")
DUMPED_NAME = re.compile(r"^;\s+dbname: (.*)$", re.M)
DECLARED_TEXT = re.compile(r"^SET client_encoding = '([A-Z0-9_]+)';$", re.M)  # sqlscript.DECLARED, in text

# CREATE DATABASE options and how their values are written.
CREATE_OPTION = re.compile(rf"\s*([A-Z_]+)\s*=\s*({LITERAL}|{IDENT}|[A-Za-z0-9_]+)")
OPTION_KINDS = {
    "TEMPLATE": "ident",
    "ENCODING": "literal",
    "LOCALE_PROVIDER": "word",
    "LOCALE": "literal",
    "LC_COLLATE": "literal",
    "LC_CTYPE": "literal",
    "ICU_LOCALE": "literal",
    "ICU_RULES": "literal",
    "BUILTIN_LOCALE": "literal",
    "COLLATION_VERSION": "literal",
    "TABLESPACE": "ident",
}
DATABASE_PRIVILEGES = {"ALL", "CREATE", "CONNECT", "TEMPORARY", "TEMP"}

_DB = rf"(?P<db>{IDENT})"
# A setting's name: pg_dump quotes every name that is not a plain lower-case word ("TimeZone",
# "app.tenant"); older dumps and hand-written SQL have bare dotted words (app.tenant).
_SETTING_PART = r'(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)'
SETTING = rf"{_SETTING_PART}(?:\.{_SETTING_PART})*"
_GUC = rf"(?P<name>{SETTING})"
FORMS = {
    "create": re.compile(rf"CREATE DATABASE {_DB}(?: WITH)?(?P<options>.*)", re.S),
    "owner": re.compile(rf"ALTER DATABASE {_DB} OWNER TO (?P<role>{IDENT})"),
    "comment": re.compile(rf"COMMENT ON DATABASE {_DB} IS (?P<text>{LITERAL})", re.S),
    "security label": re.compile(
        rf"SECURITY LABEL FOR (?P<provider>{IDENT}) ON DATABASE {_DB} IS (?P<label>{LITERAL})", re.S
    ),
    "setting": re.compile(rf"ALTER DATABASE {_DB} SET {_GUC} TO (?P<value>.*)", re.S),
    "role setting": re.compile(rf"ALTER ROLE (?P<role>{IDENT}) IN DATABASE {_DB} SET {_GUC} TO (?P<value>.*)", re.S),
    "connection limit": re.compile(rf"ALTER DATABASE {_DB} CONNECTION LIMIT = (?P<value>-?\d+)"),
    "flag": re.compile(rf"ALTER DATABASE {_DB} (?P<flag>IS_TEMPLATE|ALLOW_CONNECTIONS) = (?P<value>true|false)"),
    "privilege": re.compile(
        rf"(?P<verb>GRANT|REVOKE) (?P<privs>[A-Z,]+) ON DATABASE {_DB} (?:TO|FROM) "
        rf"(?P<grantee>PUBLIC|{IDENT})(?P<grant_option> WITH GRANT OPTION)?"
    ),
    "grantor": re.compile(rf"SET SESSION AUTHORIZATION (?P<role>{IDENT})"),
    "grantor reset": re.compile(r"RESET SESSION AUTHORIZATION"),
}
# What pg_restore --create gives the new database before its data, as this restore does: what the
# loading's own sessions see (a materialized view refreshed under the database's
# default_text_search_config or TimeZone, a value stored with its default_toast_compression, a
# table read through pg_database_owner). The rest (privileges, which the revokes from PUBLIC at
# creation already close; the connection limit and flags, which could keep the restore out) after.
BEFORE_LOAD = frozenset({"owner", "comment", "security label", "setting", "role setting"})
AFTER_LOAD = frozenset(FORMS) - BEFORE_LOAD
# What pg_restore prints around the entries: session settings for its own connection.
SESSION_NOISE = re.compile(r"^(SET \w+ = |SELECT pg_catalog\.set_config\()", re.S)


class TocUnreadable(Exception):
    """The start of this copy does not give pg_restore a table of contents (a corrupt copy)."""


# --- Reading the entries from the start of the dump -------------------------------------------


class _UntilStopped(io.RawIOBase):
    """The copy's stream, which ends early once the table of contents has been read: gpg then
    stops instead of decrypting gigabytes nobody reads (its truncation error is expected)."""

    def __init__(self, reader, stop):
        self.reader, self.stop = reader, stop

    def readable(self):
        return True

    def read(self, n=-1):
        return b"" if self.stop.is_set() else self.reader.read(n)


def read_toc(reader, encryption, pg_restore):
    """Decrypt the start of the dump into `pg_restore --create -l`. Returns (list text, the bytes
    read so far: the whole table of contents). Raises TocUnreadable (gpg's reason, if it failed)."""
    lister = subprocess.Popen(
        [str(pg_restore), "--create", "--list"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env({}),
        preexec_fn=die_with_parent,
    )
    out, head, stop = {}, [], threading.Event()
    readers = [
        threading.Thread(target=lambda k=k: out.__setitem__(k, getattr(lister, k).read())) for k in ("stdout", "stderr")
    ]
    for thread in readers:
        thread.start()

    def on_data(chunk):
        if chunk and not stop.is_set():
            head.append(chunk)
            try:
                lister.stdin.write(chunk)
                lister.stdin.flush()
            except BrokenPipeError:  # pg_restore has what it needs (or gave up)
                stop.set()
            if lister.poll() is not None:
                stop.set()
        return False

    try:
        with stopping_on_purpose():
            result = encryption.decrypt_stream(_UntilStopped(reader, stop), on_data)
    finally:
        try:
            lister.stdin.close()
        except BrokenPipeError:
            pass
        lister.wait()
        for thread in readers:
            thread.join()
    if not stop.is_set() and not result.ok and not head:
        raise TocUnreadable(gpg_failure(result))
    listing = out["stdout"].decode(errors="replace")
    if lister.returncode != 0 or not DUMPED_NAME.search(listing):
        lines = out["stderr"].decode(errors="replace").strip().splitlines()
        raise TocUnreadable(lines[-1] if lines else "pg_restore found no table of contents")
    return listing, b"".join(head)


def database_script(listing, head, pg_restore, warnings, convert=None):
    """The SQL of the dump's database entries (pg_restore --create -L those entries, no connection),
    as text in the encoding it declares (sqlscript.script_text; `convert`: its fallback)."""
    chosen = "".join(line + "\n" for line in listing.splitlines() if DATABASE_ENTRY.match(line))
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as f:
        f.write(chosen)  # a handful of lines: fits the pipe
    try:
        done = subprocess.run(
            [str(pg_restore), "--create", "--file=-", f"--use-list=/dev/fd/{read_end}"],
            input=head,
            capture_output=True,
            env=child_env({}),
            pass_fds=(read_end,),
            timeout=300,
        )
    finally:
        os.close(read_end)
    if done.returncode != 0:
        raise TocUnreadable(done.stderr.decode(errors="replace").strip())
    try:
        return script_text(done.stdout, warnings, convert)
    except NotText as e:
        raise TocUnreadable(f"the database's entries cannot be read: {e}") from None


# --- What the entries say, rebuilt for the new name -------------------------------------------


class DatabaseProperties:
    """The dumped database's CREATE DATABASE options and the statements that follow it."""

    def __init__(self, source, options, actions, warnings):
        self.source = source  # the dumped database's name
        self.options = options  # [(KEY, value token)] of its CREATE DATABASE
        self.actions = actions  # [(form, match)] in the dump's order
        self.warnings = warnings
        self.head = None  # the decrypted start of the dump, when read from one
        self.copy_id = None  # the copy it was read from (restores.logical.read_properties)
        self.pg_restore = None  # the pg_restore that reads that dump (--tablespace-map lists it again)
        self.listing = ""  # its pg_restore --create --list

    @classmethod
    def parse(cls, listing, script):
        source = DUMPED_NAME.search(listing).group(1)
        options, actions, warnings = None, [], []
        declared = DECLARED_TEXT.search(script)
        codec = CODECS.get(declared.group(1)) if declared else None
        for text in statements(script):
            if SESSION_NOISE.match(text):
                continue
            form, match = _recognise(text, source, codec)
            if form is None:
                warnings.append(f"not re-issued for the new database (not understood): {text[:120]}")
            elif form == "create":
                options = CREATE_OPTION.findall(match.group("options"))
            else:
                actions.append((form, match))
        if options is None:
            warnings.append(f"the dump holds no CREATE DATABASE for {source}: the database was created with defaults")
        return cls(source, options or [], actions, warnings)

    @property
    def tablespace(self):
        return next((unquote_ident(v) for k, v in self.options if k == "TABLESPACE"), None)

    def create_statement(self, new, tablespace=None):
        """CREATE DATABASE new with the dump's encoding, locale and template, in `tablespace`
        (None: the target's default)."""
        parts = [sql.SQL("CREATE DATABASE {}").format(sql.Identifier(new))]
        for key, value in self.options:
            kind = OPTION_KINDS.get(key)
            if key == "TABLESPACE":
                continue
            if kind is None:
                self.warnings.append(f"CREATE DATABASE option {key} = {value} of the dump not used")
                continue
            try:
                parts.append(sql.SQL(key + " = ") + _option_value(kind, value))
            except ValueError as e:
                self.warnings.append(f"CREATE DATABASE option {key} not used: {e}")
        if tablespace:
            parts.append(sql.SQL("TABLESPACE = {}").format(sql.Identifier(tablespace)))
        return sql.SQL(" ").join(parts)

    def apply(self, conn, new, phase=None):
        """Re-issue the statements for database `new` (those of `phase`, BEFORE_LOAD or AFTER_LOAD;
        every one when None); returns (applied count, warnings)."""
        applied, warnings = 0, list(self.warnings) if phase is not BEFORE_LOAD else []
        try:
            for form, match in self.actions:
                if phase is not None and (form in BEFORE_LOAD) != (phase is BEFORE_LOAD):
                    continue
                statement, what = _rebuild(form, match, new)
                try:
                    conn.execute(statement)
                    applied += 1
                except psycopg.Error as e:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    warnings.append(f"{what} not applied: {first}")
        finally:
            conn.execute("RESET SESSION AUTHORIZATION")
        return applied, warnings


def _recognise(text, source, codec=None):
    for form, pattern in FORMS.items():
        match = pattern.fullmatch(text)
        if match is None:
            continue
        if "db" in pattern.groupindex and not _same_name(unquote_ident(match.group("db")), source, codec):
            return None, None
        if form == "privilege" and not set(match.group("privs").split(",")) <= DATABASE_PRIVILEGES:
            return None, None
        if form in ("setting", "role setting") and literal_list(match.group("value")) is None:
            return None, None
        return form, match
    return None, None


def _same_name(name, source, codec):
    """Whether the script's `name` is the dumped database's. The listing gives that name as the
    connection had it (UTF-8); the script gives pg_database's bytes in the dump's encoding, read
    as that encoding: a name made from a UTF-8 session, in a LATIN1 database's dump, reads
    "cafÃ©" there. The same bytes are the same name."""
    if name == source:
        return True
    try:
        return bool(codec) and name.encode(codec) == source.encode()
    except UnicodeEncodeError:
        return False


def setting_name(token):
    """The name a setting token stands for: quoted parts unquoted, bare ones folded to lower
    case as the server folds them ("TimeZone" is TimeZone, app.Tenant is app.tenant)."""
    parts = re.findall(_SETTING_PART, token)
    return ".".join(unquote_ident(p) if p.startswith('"') else p.lower() for p in parts)


def _option_value(kind, token):
    if kind == "literal" and token.startswith("'"):
        return sql.Literal(unquote_literal(token))
    if kind == "ident":
        return sql.Identifier(unquote_ident(token))
    if re.fullmatch(r"[A-Za-z0-9_]+", token):
        return sql.SQL(token)
    raise ValueError(f"unexpected CREATE DATABASE value {token!r}")


def _role(token):
    return sql.SQL("PUBLIC") if token == "PUBLIC" else sql.Identifier(unquote_ident(token))


def _rebuild(form, m, new):
    """(statement, what a DBA calls it) for one recognised statement, aimed at database `new`."""
    db = sql.Identifier(new)
    if form == "owner":
        return sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            db, _role(m["role"])
        ), f"owner {unquote_ident(m['role'])}"
    if form == "comment":
        return sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(unquote_literal(m["text"]))), "comment"
    if form == "security label":
        provider = unquote_ident(m["provider"])
        label = sql.Literal(unquote_literal(m["label"]))
        statement = sql.SQL("SECURITY LABEL FOR {} ON DATABASE {} IS {}").format(sql.Identifier(provider), db, label)
        return statement, f"security label of provider {provider}"
    if form in ("setting", "role setting"):
        return _setting(form, m, db)
    if form == "connection limit":
        limit = sql.Literal(int(m["value"]))
        return sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(db, limit), "connection limit"
    if form == "flag":
        flag = sql.SQL(f"{m['flag']} {m['value']}")
        return sql.SQL("ALTER DATABASE {} {}").format(db, flag), m["flag"]
    if form == "privilege":
        privs = sql.SQL(",").join(sql.SQL(p) for p in m["privs"].split(","))
        who = unquote_ident(m["grantee"]) if m["grantee"] != "PUBLIC" else "PUBLIC"
        if m["verb"] == "GRANT":
            option = sql.SQL(" WITH GRANT OPTION" if m["grant_option"] else "")
            statement = sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(privs, db, _role(m["grantee"]), option)
        else:
            statement = sql.SQL("REVOKE {} ON DATABASE {} FROM {}").format(privs, db, _role(m["grantee"]))
        return statement, f"{m['verb']} {m['privs']} for {who}"
    if form == "grantor":
        role = unquote_ident(m["role"])
        return sql.SQL("SET SESSION AUTHORIZATION {}").format(
            _role(m["role"])
        ), f"grantor {role} (grants made as the portal's role)"
    return sql.SQL("RESET SESSION AUTHORIZATION"), "grantor reset"


def _setting(form, m, db):
    # The whole name as one quoted identifier, as pg_dump writes it: "app.tenant" and
    # app.tenant name the same setting, and a quoted part may itself hold a dot.
    name = setting_name(m["name"])
    value = sql.SQL(", ").join(sql.Literal(v) for v in literal_list(m["value"]))
    if form == "setting":
        statement = sql.SQL("ALTER DATABASE {} SET {} TO {}").format(db, sql.Identifier(name), value)
        return statement, f"setting {name}"
    role = unquote_ident(m["role"])
    statement = sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} TO {}").format(
        _role(m["role"]), db, sql.Identifier(name), value
    )
    return statement, f"setting {name} of role {role}"
