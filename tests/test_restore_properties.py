"""What a restore re-issues from the dump's own statements (restores/dbprops.py) and the
globals (restores/cluster_globals.py): the spellings pg_dump and pg_dumpall really write, each
recognised and rebuilt, or named in a warning, never left out silently.

The end-to-end restores of these properties are in tests/test_exact_restore.py; here are the
statements themselves, and memberships as pg_dumpall 18 writes them applied to 18 and to 15.
"""

import subprocess

from restores import cluster_globals
from restores.dbprops import DATABASE_ENTRY, DatabaseProperties, _rebuild

LISTING = ";     dbname: My db\n"


def rebuilt(props, new="copy"):
    return [_rebuild(form, m, new)[0].as_string(None) for form, m in props.actions]


def test_quoted_setting_names_are_understood_and_reissued_for_the_new_name():
    # pg_dump quotes a setting's name unless it is a plain lower-case word: the server stores
    # timezone as TimeZone, and a dotted custom setting is never a plain word.
    script = (
        'ALTER DATABASE "My db" SET "TimeZone" TO \'Indian/Maldives\';\n'
        'ALTER DATABASE "My db" SET "DateStyle" TO \'ISO, DMY\';\n'
        'ALTER DATABASE "My db" SET "app.tenant" TO \'x\';\n'
        "ALTER DATABASE \"My db\" SET app.Legacy TO 'y';\n"
        'ALTER DATABASE "My db" SET "we""ird.x" TO \'z\';\n'
        'ALTER ROLE "R r" IN DATABASE "My db" SET "myapp.flag" TO \'on\';\n'
    )
    props = DatabaseProperties.parse(LISTING, 'CREATE DATABASE "My db" WITH TEMPLATE = template0;\n' + script)
    assert props.warnings == []
    assert rebuilt(props) == [
        'ALTER DATABASE "copy" SET "TimeZone" TO \'Indian/Maldives\'',
        'ALTER DATABASE "copy" SET "DateStyle" TO \'ISO, DMY\'',
        'ALTER DATABASE "copy" SET "app.tenant" TO \'x\'',
        'ALTER DATABASE "copy" SET "app.legacy" TO \'y\'',  # a bare word is folded, as the server folds it
        'ALTER DATABASE "copy" SET "we""ird.x" TO \'z\'',
        'ALTER ROLE "R r" IN DATABASE "copy" SET "myapp.flag" TO \'on\'',
    ]


def test_a_security_label_on_the_database_is_chosen_and_reissued_or_a_named_warning(pg_cluster):
    # pg_restore -l of a dump of a labelled database (pg_dump's tag is "DATABASE <name>").
    listing = (
        ";     dbname: labdb\n"
        "3338; 1262 16384 DATABASE - labdb postgres\n"
        "3340; 0 0 SECURITY LABEL - DATABASE labdb postgres\n"
        "3341; 0 0 SECURITY LABEL - TABLE t postgres\n"
    )
    chosen = [line.split(";")[0] for line in listing.splitlines() if DATABASE_ENTRY.match(line)]
    assert chosen == ["3338", "3340"]
    script = (
        "CREATE DATABASE labdb WITH TEMPLATE = template0 ENCODING = 'UTF8';\n"
        "SECURITY LABEL FOR selinux ON DATABASE labdb IS 'system_u:object_r:sepgsql_db_t:s0';\n"
    )
    props = DatabaseProperties.parse(listing, script)
    assert props.warnings == []
    assert rebuilt(props) == [
        'SECURITY LABEL FOR "selinux" ON DATABASE "copy" IS \'system_u:object_r:sepgsql_db_t:s0\''
    ]
    # No label provider is loaded here (sepgsql is not installed): the target says so, by name.
    pg_cluster.execute("CREATE DATABASE copy")
    with pg_cluster.connect() as conn:
        applied, warnings = props.apply(conn, "copy")
    assert (applied, warnings) == (
        0,
        ['security label of provider selinux not applied: security label provider "selinux" is not loaded'],
    )


def test_globals_role_settings_with_quoted_names_and_grant_options_are_recognised():
    recognised, warnings = cluster_globals.parse(
        "CREATE ROLE dev;\n"
        "ALTER ROLE dev SET \"app.tenant\" TO 'x';\n"
        "ALTER ROLE dev SET \"TimeZone\" TO 'UTC';\n"
        "GRANT team TO dev WITH ADMIN OPTION, INHERIT FALSE, SET FALSE GRANTED BY postgres;\n"
        "GRANT team TO dev WITH INHERIT TRUE GRANTED BY postgres;\n"
        "GRANT team TO dev WITH SOMETHING NEW GRANTED BY postgres;\n"
    )
    assert [form for form, _ in recognised] == ["create role", "role setting", "role setting"] + ["membership"] * 2
    assert warnings == [
        "globals statement not applied (not understood): GRANT team TO dev WITH SOMETHING NEW GRANTED BY postgres"
    ]


MEMBERSHIPS = [
    "CREATE ROLE team NOLOGIN",
    "CREATE ROLE lead LOGIN",
    "CREATE ROLE guest LOGIN",
    "CREATE ROLE helper LOGIN",
    "GRANT team TO lead WITH ADMIN OPTION",
    "GRANT team TO guest WITH INHERIT FALSE, SET FALSE",
    "GRANT team TO helper",
    "ALTER ROLE helper SET \"app.tenant\" TO 'x'",
]


def members_of(cluster, role):
    """{member: (admin,)} of `role`, and on 16+ {member: (admin, inherit, set)}."""
    with cluster.connect() as conn:
        options = ", m.inherit_option, m.set_option" if conn.info.server_version >= 160000 else ""
        rows = conn.execute(
            f"SELECT u.rolname, m.admin_option{options} FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE g.rolname = %s",
            [role],
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


def globals_of(cluster):
    dumpall = cluster.bin_dir / "pg_dumpall"
    return subprocess.run(
        [str(dumpall), "--globals-only", "-d", cluster.dsn()], capture_output=True, check=True, text=True
    ).stdout


def apply_globals(cluster, script):
    with cluster.connect() as conn:
        return cluster_globals.apply(conn, script, "target")


def test_membership_options_of_pg_dumpall_18_are_kept_on_18_and_never_widened_on_15(pg_cluster_of):
    source = pg_cluster_of(18)
    for statement in MEMBERSHIPS:
        source.execute(statement)
    script = globals_of(source)
    assert "GRANT team TO guest WITH INHERIT FALSE, SET FALSE GRANTED BY postgres" in script

    on_18 = pg_cluster_of(18)
    created, _, warnings = apply_globals(on_18, script)
    assert set(created) == {"team", "lead", "guest", "helper"}
    assert not [w for w in warnings if "membership" in w or "app.tenant" in w], warnings
    assert members_of(on_18, "team") == members_of(source, "team")
    assert members_of(on_18, "team") == {
        "lead": (True, True, True),
        "guest": (False, False, False),
        "helper": (False, True, True),
    }
    assert on_18.execute("SELECT setconfig FROM pg_db_role_setting WHERE setrole = 'helper'::regrole") == [
        (["app.tenant=x"],)
    ]

    on_15 = pg_cluster_of(15)
    created, _, warnings = apply_globals(on_15, script)
    assert members_of(on_15, "team") == {"lead": (True,), "helper": (False,)}
    assert (
        "membership of guest in team skipped: the backup grants it WITH INHERIT FALSE, SET FALSE, which"
        " PostgreSQL 15 cannot express: granted plainly, guest would get more than the backup gave"
    ) in warnings


def test_a_role_the_target_had_gets_no_new_member_and_the_warning_says_how_to_grant_it(pg_cluster):
    pg_cluster.execute("CREATE ROLE team NOLOGIN")
    script = "CREATE ROLE team;\nCREATE ROLE lead;\nGRANT team TO lead WITH ADMIN OPTION GRANTED BY postgres;\n"
    created, _, warnings = apply_globals(pg_cluster, script)
    assert created == ["lead"]
    assert members_of(pg_cluster, "team") == {}
    assert warnings == [
        "membership of lead in team skipped: team already existed on target and gets no new member from a"
        ' restore (GRANT "team" TO "lead" WITH ADMIN OPTION by hand if it should)'
    ]
    pg_cluster.execute('GRANT "team" TO "lead" WITH ADMIN OPTION')  # the advice works as written
    assert members_of(pg_cluster, "team") == {"lead": (True,)}
