"""A backup's globals (roles) brought onto another cluster without taking it over.

`pg_dumpall --globals-only` holds `ALTER ROLE ... PASSWORD` for every role, the superuser
included, memberships in pg_* roles and CREATE TABLESPACE with the source's directories: run
as it is on another cluster it replaces that cluster's passwords and can fail on its paths.
So it is never run through psql. Each statement is recognised and only what is safe is
rebuilt with psycopg.sql and applied:

- a role that already exists on the target is never changed (attributes, password,
  settings, comment, memberships), the connecting superuser least of all;
- a missing role is created, but without SUPERUSER, CREATEROLE, REPLICATION or BYPASSRLS,
  and without its password unless the DBA asks (--with-role-passwords);
- a membership is granted only between two roles this restore created: a role the target
  already had gets no new member (that would widen who holds it there), and no role is made
  a member of a pg_* role; the grant keeps its ADMIN, INHERIT and SET options, and one the
  target cannot limit as the backup does (INHERIT or SET FALSE before PostgreSQL 16) is left out;
- tablespaces are never created (their directories belong to the source's host).

Every omission is a warning that names it. The roles created are returned so that a restore
that fails can drop them again.
"""

import re

import psycopg
from psycopg import sql

from restores.dbprops import SETTING, setting_name
from restores.sqlscript import IDENT, LITERAL, literal_list, statements, unquote_ident, unquote_literal

POWERS = ("SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS")
FLAGS = ("SUPERUSER", "INHERIT", "CREATEROLE", "CREATEDB", "LOGIN", "REPLICATION", "BYPASSRLS")
ROLE_OPTION = re.compile(
    rf"\s*(?:(?P<no>NO)?(?P<flag>{'|'.join(FLAGS)})\b|CONNECTION LIMIT (?P<limit>-?\d+)"
    rf"|PASSWORD (?P<password>{LITERAL}|NULL)|VALID UNTIL (?P<until>{LITERAL}))"
)
_ROLE = rf"(?P<role>{IDENT})"
# pg_dumpall 16+ writes each membership's options: WITH ADMIN OPTION, INHERIT FALSE, SET FALSE.
GRANT_OPTION = re.compile(r"(ADMIN|INHERIT|SET) (OPTION|TRUE|FALSE)")
_GRANT_OPTIONS = rf"{GRANT_OPTION.pattern}(?:, {GRANT_OPTION.pattern})*"
FORMS = {
    "create role": re.compile(rf"CREATE ROLE {_ROLE}"),
    "role options": re.compile(rf"ALTER ROLE {_ROLE} WITH(?P<options>.*)", re.S),
    "role setting": re.compile(rf"ALTER ROLE {_ROLE} SET (?P<name>{SETTING}) TO (?P<value>.*)", re.S),
    "role comment": re.compile(rf"COMMENT ON ROLE {_ROLE} IS (?P<text>{LITERAL})", re.S),
    "membership": re.compile(
        rf"GRANT (?P<granted>{IDENT}) TO (?P<member>{IDENT})(?: WITH (?P<with>{_GRANT_OPTIONS}))?(?: GRANTED BY {IDENT})?"
    ),
    "tablespace": re.compile(
        rf"(?:CREATE|ALTER|COMMENT ON|(?:GRANT|REVOKE) .+ ON) TABLESPACE (?P<name>{IDENT}).*", re.S
    ),
}
SESSION_NOISE = re.compile(r"^SET \w+ = ")


class GlobalsRefused(Exception):
    """A role could not be created: the restore fails and drops what it created."""


class RoleOptions:
    """The attributes `ALTER ROLE ... WITH` gives a role in the backup."""

    def __init__(self, text):
        self.flags, self.limit, self.password, self.until, pos = {}, None, None, None, 0
        text = text.strip()
        while pos < len(text):
            m = ROLE_OPTION.match(text, pos)
            if m is None:  # named by its first word only: what follows may be a password
                raise ValueError(f"unexpected role option {text[pos:].split()[0][:30]!r}")
            if m["flag"]:
                self.flags[m["flag"]] = not m["no"]
            elif m["limit"]:
                self.limit = int(m["limit"])
            elif m["password"]:
                self.password = None if m["password"] == "NULL" else unquote_literal(m["password"])
            else:
                self.until = unquote_literal(m["until"])
            pos = m.end()

    def safe_clause(self, with_password):
        """The options a new role gets on the target, and the names of those left out."""
        parts, left_out = [], [flag for flag in POWERS if self.flags.get(flag)]
        for flag, on in self.flags.items():
            parts.append(sql.SQL(("NO" if flag in POWERS or not on else "") + flag))
        if self.limit is not None:
            parts.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(self.limit)))
        if self.until is not None:
            parts.append(sql.SQL("VALID UNTIL {}").format(sql.Literal(self.until)))
        if self.password is not None:
            if with_password:
                parts.append(sql.SQL("PASSWORD {}").format(sql.Literal(self.password)))
            else:
                left_out.append("PASSWORD")
        return sql.SQL(" ").join(parts), left_out

    def differences(self, row):
        """What the backup gives an existing role that the target's role does not have."""
        current = dict(zip(FLAGS, row[:7], strict=True))
        diffs = [("" if on else "NO") + flag for flag, on in self.flags.items() if current[flag] != on]
        if self.limit is not None and self.limit != row[7]:
            diffs.append(f"CONNECTION LIMIT {self.limit}")
        if self.password is not None and self.password != row[8]:
            diffs.append("PASSWORD")
        return diffs


def parse(script):
    """[(form, match)] of the globals script, and warnings for what is not understood."""
    recognised, warnings = [], []
    for text in statements(script):
        if SESSION_NOISE.match(text):
            continue
        form = next(((f, m) for f, p in FORMS.items() if (m := p.fullmatch(text))), None)
        if form is None:
            # Literals left out: a statement not understood may still hold a password.
            shown = re.sub(LITERAL, "'…'", text)[:120]
            warnings.append(f"globals statement not applied (not understood): {shown}")
        else:
            recognised.append(form)
    return recognised, warnings


def apply(conn, script, target, with_passwords=False, about_to_make=None):
    """Apply the safe part of the globals on `conn` (the target, as its superuser).

    Returns (roles created, notes, warnings). On GlobalsRefused the roles made are dropped.
    `about_to_make(roles)`, when given, is told the roles created so far and the next one
    before that one is made (a restore records them for the orphan sweep)."""
    recognised, warnings = parse(script)
    existing = {name for (name,) in conn.execute("SELECT rolname FROM pg_roles")}
    created, notes = [], []
    try:
        for form, m in recognised:
            warnings += _apply_one(conn, form, m, existing, created, target, with_passwords, about_to_make)
    except BaseException:
        drop_roles(conn, created)
        raise
    kept = sorted({unquote_ident(m["role"]) for f, m in recognised if f == "create role"} & existing)
    spaces = sorted({unquote_ident(m["name"]) for f, m in recognised if f == "tablespace"})
    if created:
        notes.append(f"roles created on {target}: {', '.join(created)}")
    if kept:
        notes.append(f"roles already on {target}, left as they are: {', '.join(kept)}")
    if spaces:
        notes.append(f"tablespaces of the source not created on {target}: {', '.join(spaces)}")
    return created, notes, warnings


def _apply_one(conn, form, m, existing, created, target, with_passwords, about_to_make=None):
    """Apply one recognised statement, or say why not; returns its warnings."""
    if form == "tablespace":
        return []
    if form == "membership":
        return _grant(conn, m, created, target)
    role = unquote_ident(m["role"])
    try:
        if role in existing:
            return _left_unchanged(conn, form, m, role, target)
        return _apply_to_new(conn, form, m, role, created, with_passwords, about_to_make)
    except ValueError as e:  # role options this portal does not know: never guessed at
        return [f"options of role {role} not applied: {e}"]


def _apply_to_new(conn, form, m, role, created, with_passwords, about_to_make=None):
    """A role missing on the target: created, with only what is safe."""
    if form == "create role":
        if about_to_make is not None:
            about_to_make([*created, role])
        _create(conn, role)
        created.append(role)
        return []
    if role not in created:
        return [f"role {role} is altered but never created in the globals: not applied"]
    if form == "role options":
        clause, left_out = RoleOptions(m["options"]).safe_clause(with_passwords)
        try:
            conn.execute(sql.SQL("ALTER ROLE {} WITH {}").format(sql.Identifier(role), clause))
        except psycopg.Error as e:
            raise GlobalsRefused(f"cannot set the attributes of role {role}: {_first_line(e)}") from None
        if "PASSWORD" in left_out:
            left_out[left_out.index("PASSWORD")] = "its password (--with-role-passwords brings it)"
        return [f"role {role} created without {', '.join(left_out)}"] if left_out else []
    if form == "role setting":
        name, values = setting_name(m["name"]), literal_list(m["value"])
        if values is None:
            return [f"setting {name} of role {role} not applied (not understood)"]
        value = sql.SQL(", ").join(sql.Literal(v) for v in values)
        return _try(
            conn,
            sql.SQL("ALTER ROLE {} SET {} TO {}").format(sql.Identifier(role), sql.Identifier(name), value),
            f"setting {name} of role {role}",
        )
    comment = sql.Literal(unquote_literal(m["text"]))
    return _try(
        conn, sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(role), comment), f"comment of role {role}"
    )


def _create(conn, role):
    try:
        conn.execute(sql.SQL("CREATE ROLE {} WITH NOLOGIN").format(sql.Identifier(role)))
    except psycopg.Error as e:
        raise GlobalsRefused(f"cannot create role {role}: {_first_line(e)}") from None


def _left_unchanged(conn, form, m, role, target):
    """An existing role keeps everything it has; say so where the backup differs."""
    if form == "role options":
        columns = (
            "rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication, rolbypassrls, rolconnlimit"
        )
        try:
            row = conn.execute(f"SELECT {columns}, rolpassword FROM pg_authid WHERE rolname = %s", [role]).fetchone()
        except psycopg.errors.InsufficientPrivilege:  # not a superuser: passwords cannot be compared
            row = conn.execute(f"SELECT {columns}, NULL FROM pg_roles WHERE rolname = %s", [role]).fetchone()
        diffs = RoleOptions(m["options"]).differences(row)
        if diffs:
            return [f"role {role} already exists on {target}: left unchanged (the backup has {', '.join(diffs)})"]
        return []
    if form in ("role setting", "role comment"):
        what = f"setting {setting_name(m['name'])}" if form == "role setting" else "comment"
        return [f"{what} of role {role} not applied: the role already exists on {target} and is left unchanged"]
    return []


def _grant(conn, m, created, target):
    granted, member = unquote_ident(m["granted"]), unquote_ident(m["member"])
    what = f"membership of {member} in {granted}"
    if _is_member(conn, granted, member):  # nothing to give: not an omission
        return []
    if member not in created:
        return [f"{what} skipped: {member} already existed and is left unchanged"]
    if granted.startswith("pg_"):
        return [f"{what} skipped: no restored role is made a member of a pg_* role"]
    version = conn.info.server_version
    options, unlimited = _grant_options(m["with"], version)
    statement = sql.SQL("GRANT {} TO {}{}").format(sql.Identifier(granted), sql.Identifier(member), options)
    if granted not in created:
        # Created roles never get powers, so this also keeps every powerful role out of reach.
        by_hand = statement.as_string(conn)
        return [
            f"{what} skipped: {granted} already existed on {target} and gets no new member from a restore"
            f" ({by_hand} by hand if it should)"
        ]
    if unlimited:
        return [
            f"{what} skipped: the backup grants it WITH {', '.join(unlimited)}, which PostgreSQL"
            f" {version // 10000} cannot express: granted plainly, {member} would get more than the backup gave"
        ]
    return _try(conn, statement, what)


def _is_member(conn, granted, member):
    return conn.execute(
        "SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member"
        " WHERE g.rolname = %s AND u.rolname = %s",
        [granted, member],
    ).fetchone()


def _grant_options(text, version):
    """The WITH clause that gives the target the backup's options, and the limits (INHERIT
    FALSE, SET FALSE) it cannot express: before 16 every membership allows SET ROLE."""
    given = {name: value != "FALSE" for name, value in GRANT_OPTION.findall(text or "")}
    if version >= 160000:
        clause = ", ".join(f"{name} {'TRUE' if on else 'FALSE'}" for name, on in given.items())
        return sql.SQL(" WITH " + clause if clause else ""), []
    unlimited = [f"{name} FALSE" for name, on in given.items() if name != "ADMIN" and not on]
    return sql.SQL(" WITH ADMIN OPTION" if given.get("ADMIN") else ""), unlimited


def _try(conn, statement, what):
    try:
        conn.execute(statement)
        return []
    except psycopg.Error as e:
        return [f"{what} not applied: {_first_line(e)}"]


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def drop_roles(conn, roles):
    """Drop the roles a failed restore created (after its database): the target is as it was."""
    for role in reversed(roles):
        drop_role(conn, role)


def drop_role(conn, role):
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
