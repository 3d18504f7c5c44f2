"""Exact logical restores (issue 16): the database as `pg_restore --create` would have made it,
under the new name, and globals on another server that never take it over.

Every cluster here has a superuser with a password, and the portal connects as `portal`, a
password superuser over SCRAM (pg_hba trusts only `postgres` on 127.0.0.1), as in production.
"""

import codecs
import json
import os
import subprocess
from io import StringIO

import psycopg
import pytest
from django.core.management import call_command

from backupportal.lib.pgcluster import Cluster
from backupportal.lib.pgdatadir import pg_bin
from backups.models import BackupRun, Server
from restores.models import RestoreRun, RestoreTest, ValidationCheck
from restores.restoretest import run_restore_test
from restores.sqlscript import CODECS, NotText, script_text
from tests import awkward_schema
from tests.helpers import manage, restore_json

PORTAL_PASSWORD = {"source": "portal-on-source-Pw1", "target": "portal-on-target-Pw2"}
POSTGRES_PASSWORD = {"source": "postgres-source-Pw3", "target": "postgres-target-Pw4"}


def protect(cluster, side):
    """A password on `postgres`, and the portal's own password superuser."""
    cluster.execute(
        psycopg.sql.SQL("ALTER ROLE postgres PASSWORD {}").format(psycopg.sql.Literal(POSTGRES_PASSWORD[side]))
    )
    cluster.create_role("portal", password=PORTAL_PASSWORD[side], superuser=True)


def register(cluster, name, dbname, side):
    server = Server(name=name, dsn=cluster.dsn(dbname, user="portal"), password=PORTAL_PASSWORD[side])
    with cluster.connect() as conn:
        server.pg_version = conn.info.server_version
    server.save()
    return server


@pytest.fixture
def source(pg_cluster):
    protect(pg_cluster, "source")
    awkward_schema.make_roles(pg_cluster)
    return pg_cluster


@pytest.fixture
def target(pg_base_dir, pg_template, db):
    """Another cluster: its own portal password, and a role `no_grant` that exists already."""
    cluster = Cluster.create(base_dir=pg_base_dir, template=pg_template)
    cluster.start()
    try:
        protect(cluster, "target")
        cluster.create_role("no_grant", password="target-own-pw", login=True)
        register(cluster, "standby", "postgres", "target")
        yield cluster
    finally:
        cluster.destroy()


def backup(name):
    call_command("backup", name, stdout=StringIO())
    return BackupRun.objects.filter(server__name=name, status="succeeded").latest("created_at")


def roles(cluster):
    return {
        row[0]: row[1:]
        for row in cluster.execute(
            "SELECT rolname, rolsuper, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin, rolpassword IS NOT NULL"
            " FROM pg_authid"
        )
    }


def member_of(cluster, role):
    return {
        r
        for (r,) in cluster.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s",
            [role],
        )
    }


def can_connect(cluster, dbname, user, password):
    try:
        with cluster.connect(dbname, user=user, password=password):
            return True
    except psycopg.OperationalError:
        return False


@pytest.mark.parametrize("jobs", [1, 2], ids=["piped", "overlapped"])
def test_a_restore_into_a_new_name_gives_the_database_as_pg_restore_create_would(
    source, passphrase_file, backup_root, settings, jobs
):
    """Piped into one pg_restore, or overlapped: pre-data and data from the stream while the
    scratch file is written, post-data with -j from it; the same database either way."""
    settings.RESTORE_JOBS = jobs
    original = awkward_schema.make_awkward(source)
    register(source, "awkward", original, "source")
    run = backup("awkward")
    result = restore_json(str(run.pk), "--into-database", "awkward_copy")
    assert result["status"] == "succeeded", result
    assert result["warnings"] == []
    assert awkward_schema.fingerprint(source, "awkward_copy") == awkward_schema.fingerprint(source, original)
    owner, acl, comment, encoding, collate = source.execute(
        "SELECT pg_get_userbyid(datdba), datacl::text, shobj_description(oid, 'pg_database'),"
        " pg_encoding_to_char(encoding), datcollate FROM pg_database WHERE datname = 'awkward_copy'"
    )[0]
    assert (owner, encoding, collate) == ("Owner With Space", "LATIN1", "C")
    assert comment == 'Sales "EU" Dept.: it\'s the; real one'
    # The REVOKE CONNECT ... FROM PUBLIC came along: a role with no grant cannot connect.
    assert "=Tc/" not in acl and not acl.startswith("{=")
    assert not can_connect(source, "awkward_copy", "no_grant", awkward_schema.ROLE_PASSWORD)
    assert can_connect(source, "awkward_copy", "app_reader", awkward_schema.ROLE_PASSWORD)
    # The application's search_path comes from the database and from the role in the database.
    with source.connect("awkward_copy", user="app_reader", password=awkward_schema.ROLE_PASSWORD) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("app",)
        # Column grants (id, email, mood) and row-level security (readers see the north only).
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (150,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT salary FROM customers")


@pytest.mark.parametrize("jobs", [1, 2], ids=["piped", "overlapped"])
def test_a_copy_of_a_closed_database_is_closed_from_its_creation_not_after_the_load(
    source, passphrase_file, backup_root, settings, monkeypatch, jobs
):
    settings.RESTORE_JOBS = jobs
    source.execute("CREATE DATABASE vault")
    source.execute("REVOKE CONNECT ON DATABASE vault FROM PUBLIC")
    source.execute(
        "CREATE TABLE secrets AS SELECT g AS id, md5(g::text) AS token FROM generate_series(1, 500) g", dbname="vault"
    )
    register(source, "vault", "vault", "source")
    run = backup("vault")
    # Probed once every row is in, before the data is flushed and the properties re-issued.
    from restores import pgrestore

    during, flush = [], pgrestore.flush_wal

    def probe_then_flush(target, dbname):
        during.append(can_connect(source, dbname, "no_grant", awkward_schema.ROLE_PASSWORD))
        flush(target, dbname)

    monkeypatch.setattr(pgrestore, "flush_wal", probe_then_flush)
    result = restore_json(str(run.pk), "--into-database", "vault_copy")
    assert result["status"] == "succeeded", result
    assert during == [False]
    assert not can_connect(source, "vault_copy", "no_grant", awkward_schema.ROLE_PASSWORD)
    acl = "SELECT array(SELECT unnest(datacl)::text ORDER BY 1) FROM pg_database WHERE datname = %s"
    assert source.execute(acl, ["vault_copy"]) == source.execute(acl, ["vault"])


def test_a_sql_ascii_database_with_bytes_in_no_encoding_is_backed_up_restored_and_tested(
    source, passphrase_file, backup_root
):
    # Old databases are SQL_ASCII: names and text are bytes, valid in no particular encoding.
    source.execute("CREATE DATABASE legacy TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'")
    script = (
        b'CREATE TABLE "caf\xe9" (id int, note text);\n'
        b"INSERT INTO \"caf\xe9\" SELECT g, 'cr\xe8me \xff' FROM generate_series(1, 40) g;\n"
        b"CREATE TABLE plain (id int); INSERT INTO plain SELECT generate_series(1, 7);\n"
    )
    psql = [str(pg_bin() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"]
    subprocess.run([*psql, source.dsn("legacy")], input=script, check=True, capture_output=True)
    register(source, "legacy", "legacy", "source")
    run = backup("legacy")
    assert run.details["row_counts"] == {'public."caf\\xe9"': 40, "public.plain": 7}

    result = restore_json(str(run.pk), "--into-database", "legacy_copy")
    assert result["status"] == "succeeded", result
    note = b'SELECT note FROM "caf\xe9" LIMIT 1'
    copied = subprocess.run([*psql, source.dsn("legacy_copy")], input=note, capture_output=True)
    assert copied.stdout.strip() == b"cr\xe8me \xff", copied.stderr

    out = StringIO()
    call_command("restoretest", "legacy", "--json", stdout=out)
    tested = json.loads(out.getvalue().splitlines()[-1])
    assert tested["status"] == "passed", tested


def own_properties(cluster, dbname):
    """The database's comment and settings as it reads them itself (its encoding, converted)."""
    with awkward_schema._connect(cluster, dbname) as conn:
        return conn.execute(
            "SELECT shobj_description(d.oid, 'pg_database'), s.setconfig FROM pg_database d"
            " LEFT JOIN pg_db_role_setting s ON s.setdatabase = d.oid AND s.setrole = 0"
            " WHERE d.datname = current_database()"
        ).fetchone()


@pytest.mark.parametrize("encoding", ["LATIN1", "WIN1252"])
def test_a_non_utf8_databases_comment_and_settings_come_back_in_its_own_encoding(
    source, passphrase_file, backup_root, encoding
):
    """The dump writes them in the database's encoding, not UTF-8; they are re-issued from inside
    the new database, whose encoding the shared catalog holds them in."""
    source.execute(f"CREATE DATABASE atoll TEMPLATE template0 ENCODING '{encoding}' LOCALE 'C'")
    with awkward_schema._connect(source, "atoll") as conn:
        conn.execute("COMMENT ON DATABASE atoll IS 'Département de Malé, ½'")
        conn.execute("ALTER DATABASE atoll SET app.region = 'Hulhumalé'")
        conn.execute("CREATE TABLE notes AS SELECT 'Ré ' || g AS note FROM generate_series(1, 5) g")
    register(source, "atoll", "atoll", "source")
    run = backup("atoll")
    result = restore_json(str(run.pk), "--into-database", "atoll_copy")
    assert result["status"] == "succeeded", result
    assert result["warnings"] == []
    expected = ("Département de Malé, ½", ["app.region=Hulhumalé"])
    assert own_properties(source, "atoll") == expected
    assert own_properties(source, "atoll_copy") == expected


def test_a_latin1_database_with_a_name_beyond_ascii_comes_back_with_its_encoding_settings_and_grants(
    source, passphrase_file, backup_root
):
    """Its name was made from a UTF-8 session: pg_database holds UTF-8 bytes, which the LATIN1
    dump writes as they are, so its script reads "cafÃ©" where the table of contents says "café"."""
    source.execute("CREATE DATABASE \"café\" TEMPLATE template0 ENCODING 'LATIN1' LOCALE 'C'")
    source.execute("ALTER DATABASE \"café\" SET work_mem = '7MB'")
    source.execute('REVOKE CONNECT ON DATABASE "café" FROM PUBLIC')
    source.execute("CREATE TABLE t AS SELECT 1 AS x", dbname="café")
    server = register(source, "cafe", "postgres", "source")
    server.protect_databases = "café"
    server.save()
    call_command("backup", "cafe", "--database", "café", stdout=StringIO())
    run = BackupRun.objects.filter(server=server, status="succeeded").latest("created_at")
    result = restore_json(str(run.pk), "--into-database", "cafe_copy")
    assert result["status"] == "succeeded" and result["warnings"] == [], result
    described = (
        "SELECT pg_encoding_to_char(d.encoding), d.datacl IS NOT NULL AND NOT has_database_privilege('public', d.oid,"
        " 'CONNECT'), s.setconfig FROM pg_database d LEFT JOIN pg_db_role_setting s ON s.setdatabase = d.oid"
        " WHERE d.datname = %s"
    )
    assert source.execute(described, ["cafe_copy"]) == [("LATIN1", True, ["work_mem=7MB"])]


def test_a_database_in_an_encoding_python_has_no_codec_for_is_backed_up_and_restored_exactly(
    source, passphrase_file, backup_root
):
    """EUC_TW: the portal's own sessions there speak UTF-8 (the server converts), pg_dump its own."""
    source.execute("CREATE DATABASE tw TEMPLATE template0 ENCODING 'EUC_TW' LOCALE 'C'")
    with source.connect("tw", options="-c client_encoding=UTF8") as conn:
        conn.execute("CREATE TABLE t AS SELECT '台灣' AS x")
        conn.execute("COMMENT ON DATABASE tw IS '台灣的資料'")  # from inside: stored in EUC_TW
    source.execute("ALTER DATABASE tw OWNER TO app_owner")
    register(source, "tw", "tw", "source")
    run = backup("tw")
    assert run.details["row_counts"] == {"public.t": 1}

    # Found by a probe: its copy was UTF8, with the target's locale and owner and no comment, the
    # dump's database entries unread. The server reads them (convert to UTF-8).
    result = restore_json(str(run.pk), "--into-database", "tw_copy")
    assert result["status"] == "succeeded" and not result["warnings"], (result["error"], result["warnings"])
    described = (
        "SELECT pg_encoding_to_char(encoding), datcollate, pg_get_userbyid(datdba), shobj_description(oid, 'pg_database')"
        " FROM pg_database WHERE datname = current_database()"
    )
    with source.connect("tw_copy", options="-c client_encoding=UTF8") as conn:
        assert conn.execute(described).fetchall() == [("EUC_TW", "C", "app_owner", "台灣的資料")]
        assert conn.execute("SELECT x FROM t").fetchall() == [("台灣",)]


def test_a_template_a_dba_made_is_backed_up_with_all_restored_as_a_template_and_tested(
    source, passphrase_file, backup_root
):
    """IS_TEMPLATE databases hold data (a tenant template): "all" covers them, as pg_dumpall does."""
    source.execute("CREATE DATABASE tenant_template")
    source.execute("CREATE TABLE plans AS SELECT g AS id FROM generate_series(1, 3) g", dbname="tenant_template")
    source.execute("ALTER DATABASE tenant_template IS_TEMPLATE true")
    server = register(source, "tmpl", "postgres", "source")
    server.protect_databases = "all"
    server.save()
    call_command("backup", "tmpl", stdout=StringIO())
    run = BackupRun.objects.get(server=server, database__name="tenant_template", status="succeeded")
    assert run.details["row_counts"] == {"public.plans": 3}
    result = restore_json(str(run.pk), "--into-database", "tenant_copy")
    assert result["status"] == "succeeded", result
    assert source.execute("SELECT datistemplate FROM pg_database WHERE datname = 'tenant_copy'") == [(True,)]
    test = run_restore_test(server, database=server.databases.get(name="tenant_template"))
    assert test.status == RestoreTest.Status.PASSED, test.error
    assert not [d for (d,) in source.execute("SELECT datname FROM pg_database") if d.startswith("restoretest_")]


def test_a_sql_ascii_databases_comment_in_no_encoding_is_restored_with_a_warning_not_a_crash(
    source, passphrase_file, backup_root
):
    source.execute("CREATE DATABASE legacy TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'")
    psql = [str(pg_bin() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", source.dsn("legacy")]
    script = b"COMMENT ON DATABASE legacy IS 'caf\xe9'; CREATE TABLE plain AS SELECT generate_series(1, 7) AS id;"
    subprocess.run(psql, input=script, check=True, capture_output=True)
    register(source, "legacy", "legacy", "source")
    result = restore_json(str(backup("legacy").pk), "--into-database", "legacy_copy")
    assert result["status"] == "succeeded with warnings", result
    [warning] = result["warnings"]
    assert warning.startswith("the dump is SQL_ASCII and the database's names, comments or settings hold bytes")
    assert source.execute("SELECT count(*) FROM plain", dbname="legacy_copy") == [(7,)]


def test_onto_another_server_the_globals_never_change_an_existing_role_nor_hand_over_powers(
    source, target, passphrase_file, backup_root
):
    original = awkward_schema.make_shop(source)
    register(source, "shop", original, "source")
    run = backup("shop")
    before = roles(target)
    result = restore_json(str(run.pk), "--into-database", "shop_copy", "--into-server", "standby")
    assert result["status"] == "succeeded with warnings", result
    warnings = "\n".join(result["warnings"])
    assert "SCRAM-SHA-256" not in json.dumps(result)  # no password hash in what the run says
    assert "role boss created without SUPERUSER, CREATEROLE, REPLICATION, BYPASSRLS, its password" in warnings
    assert "membership of auditor in pg_read_all_data skipped" in warnings
    assert "role postgres already exists on standby: left unchanged (the backup has PASSWORD)" in warnings
    assert "role portal already exists on standby: left unchanged (the backup has PASSWORD)" in warnings
    assert "role no_grant already exists on standby: left unchanged (the backup has PASSWORD)" in warnings

    # Nothing of an existing role changed; the portal and postgres keep their own passwords.
    after = roles(target)
    assert {name: after[name] for name in before} == before
    assert can_connect(target, "postgres", "portal", PORTAL_PASSWORD["target"])
    assert not can_connect(target, "postgres", "portal", PORTAL_PASSWORD["source"])
    # Created roles: no powers, no pg_* membership, no password.
    assert after["boss"][:4] == (False, False, False, False)
    assert not any(row[5] for name, row in after.items() if name not in before)
    assert member_of(target, "app_reader") == {"readers"}
    assert member_of(target, "auditor") == set()
    assert after["app_reader"][4] is True  # LOGIN kept, but no password: it cannot log in yet
    assert not can_connect(target, "shop_copy", "app_reader", awkward_schema.ROLE_PASSWORD)
    assert target.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'app_reader'") == [(7,)]

    mine, theirs = awkward_schema.fingerprint(target, "shop_copy"), awkward_schema.fingerprint(source, original)
    assert mine == theirs
    assert mine["database"][0] == "app_owner"

    # The awkward one too, now that its roles are there: RLS, column grants, large objects' ACLs.
    awkward = awkward_schema.make_awkward(source)
    register(source, "awkward", awkward, "source")
    second = restore_json(str(backup("awkward").pk), "--into-database", "awkward_copy", "--into-server", "standby")
    assert second["status"] == "succeeded with warnings", second  # the existing roles, again
    assert all("already exist" in w for w in second["warnings"]), second["warnings"]
    assert "membership of auditor in pg_read_all_data skipped: auditor already existed" in "\n".join(second["warnings"])
    assert awkward_schema.fingerprint(target, "awkward_copy") == awkward_schema.fingerprint(source, awkward)
    assert roles(target) == after  # nothing changed by the second restore either


def test_a_restore_test_on_a_sandbox_server_leaves_none_of_the_roles_it_created(
    source, target, passphrase_file, backup_root
):
    """Production's roles (LOGIN, in production's names) are not left on the sandbox cluster
    after the test: they go with the copy, and the next test creates them again."""
    server = register(source, "shop", awkward_schema.make_shop(source), "source")
    sandbox = Server.objects.get(name="standby")
    server.sandbox_server, server.sandbox_destination = sandbox, sandbox.destination  # as a DBA approved
    server.save()
    backup("shop")
    before = roles(target)
    for _ in range(2):
        test = run_restore_test(server, database=server.databases.get(name="app_owner"))
        assert test.status == RestoreTest.Status.PASSED, test.error
        assert "roles" not in [c["name"] for c in test.checks]
        assert roles(target) == before
    assert "role boss created without SUPERUSER" in " ".join(test.restores.get().warnings)


def test_with_role_passwords_the_created_roles_can_log_in(source, target, passphrase_file, backup_root):
    original = awkward_schema.make_shop(source)
    register(source, "shop", original, "source")
    run = backup("shop")
    result = restore_json(
        str(run.pk), "--into-database", "shop_copy", "--into-server", "standby", "--with-role-passwords"
    )
    assert result["status"] == "succeeded with warnings", result
    assert can_connect(target, "shop_copy", "app_reader", awkward_schema.ROLE_PASSWORD)
    assert not can_connect(target, "shop_copy", "no_grant", awkward_schema.ROLE_PASSWORD)  # existed: unchanged
    assert roles(target)["boss"][0] is False


def test_an_owner_role_gone_since_the_backup_is_a_named_warning(source, passphrase_file, backup_root):
    source.execute("CREATE ROLE gone LOGIN")
    source.execute("CREATE DATABASE ledger OWNER gone")
    register(source, "ledger", "ledger", "source")
    run = backup("ledger")
    source.execute("ALTER DATABASE ledger OWNER TO postgres")
    source.execute("DROP ROLE gone")
    result = restore_json(str(run.pk), "--into-database", "ledger_copy")
    assert result["status"] == "succeeded with warnings", result
    assert any(w.startswith('owner gone not applied: role "gone" does not exist') for w in result["warnings"])
    assert RestoreRun.objects.get(pk=result["id"]).warnings == result["warnings"]
    assert source.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'ledger_copy'") == [
        ("portal",)
    ]


def test_a_failed_restore_onto_another_server_leaves_it_as_it_was(source, target, passphrase_file, backup_root):
    original = awkward_schema.make_shop(source)
    with source.connect(original) as conn:  # data enough that the table of contents is read before the damage
        conn.execute(
            "CREATE TABLE public.blob AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 200000) g"
        )
    register(source, "shop", original, "source")
    run = backup("shop")
    artifact = backup_root / run.key
    data = bytearray(artifact.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = os.urandom(4096)
    artifact.write_bytes(bytes(data))
    before_roles = roles(target)
    before_dbs = target.execute("SELECT datname FROM pg_database ORDER BY 1")
    result = restore_json(str(run.pk), "--into-database", "shop_copy", "--into-server", "standby")
    assert result["status"] == "failed", result
    assert roles(target) == before_roles
    assert target.execute("SELECT datname FROM pg_database ORDER BY 1") == before_dbs


def tablespace_dir(cluster, name):
    path = cluster.datadir.parent / name
    path.mkdir()
    os.chown(path, *[os.stat(cluster.datadir)[i] for i in (4, 5)])
    return path


def test_tablespaces_go_to_the_default_or_where_the_map_says(source, target, passphrase_file, backup_root):
    source.execute(f"CREATE TABLESPACE fast LOCATION '{tablespace_dir(source, 'fast')}'")
    source.execute("CREATE DATABASE spaced")
    with source.connect("spaced") as conn:
        conn.execute("CREATE TABLE hot (id int PRIMARY KEY USING INDEX TABLESPACE fast, v text) TABLESPACE fast")
        conn.execute("CREATE INDEX hot_v ON hot (v) TABLESPACE fast")
        conn.execute("CREATE TABLE cold (id int)")
        conn.execute("INSERT INTO hot SELECT g, g::text FROM generate_series(1, 100) g")
    register(source, "spaced", "spaced", "source")
    run = backup("spaced")

    refused = restore_json(
        str(run.pk), "--into-database", "x", "--into-server", "standby", "--tablespace-map", "fast=nope"
    )
    assert refused["status"] == "failed" and "tablespace nope does not exist on standby" in refused["error"]
    assert target.execute("SELECT 1 FROM pg_database WHERE datname = 'x'") == []

    plain = restore_json(str(run.pk), "--into-database", "plain", "--into-server", "standby")
    assert plain["status"] in ("succeeded", "succeeded with warnings"), plain
    assert "tablespaces of the source not created on standby: fast" in plain["notes"]
    placed = "SELECT relname, coalesce(t.spcname, '-') FROM pg_class c LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace WHERE relname IN ('hot', 'hot_pkey', 'hot_v', 'cold') ORDER BY 1"
    assert target.execute(placed, dbname="plain") == [("cold", "-"), ("hot", "-"), ("hot_pkey", "-"), ("hot_v", "-")]

    target.execute(f"CREATE TABLESPACE quick LOCATION '{tablespace_dir(target, 'quick')}'")
    mapped = restore_json(
        str(run.pk), "--into-database", "mapped", "--into-server", "standby", "--tablespace-map", "fast=quick"
    )
    assert mapped["status"] in ("succeeded", "succeeded with warnings"), mapped
    assert "3 objects moved by --tablespace-map" in mapped["notes"]
    assert target.execute(placed, dbname="mapped") == [
        ("cold", "-"),
        ("hot", "quick"),
        ("hot_pkey", "quick"),
        ("hot_v", "quick"),
    ]
    assert target.execute("SELECT count(*) FROM hot", dbname="mapped") == [(100,)]


def gpg_decrypt(path, passphrase_file, home):
    """The plain gpg CLI, as the README's recipe runs it: no portal code."""
    home.mkdir(exist_ok=True, mode=0o700)
    return subprocess.run(
        ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase-file", str(passphrase_file)]
        + ["--homedir", str(home), "--decrypt", str(path)],
        capture_output=True,
        check=True,
    ).stdout


def test_the_readme_stock_recipe_recreates_the_database_exactly(source, target, passphrase_file, backup_root, tmp_path):
    originals = [awkward_schema.make_awkward(source), awkward_schema.make_shop(source)]
    register(source, "awkward", originals[0], "source")
    register(source, "shop", originals[1], "source")
    runs = [backup("awkward"), backup("shop")]
    env = {"PGHOST": target.host, "PGPORT": str(target.port), "PGUSER": "postgres", "PATH": os.environ["PATH"]}
    # Globals first (on a fresh cluster the roles are missing: their errors for existing roles are expected).
    globals_sql = gpg_decrypt(backup_root / runs[0].details["globals"]["key"], passphrase_file, tmp_path / "gnupg")
    subprocess.run(
        [str(pg_bin() / "psql"), "-X", "-q", "-d", "postgres"], input=globals_sql, env=env, capture_output=True
    )
    for run, original in zip(runs, originals, strict=True):
        dump = gpg_decrypt(backup_root / run.key, passphrase_file, tmp_path / "gnupg")
        done = subprocess.run(
            [str(pg_bin() / "pg_restore"), "--create", "--exit-on-error", "-d", "postgres"],
            input=dump,
            env=env,
            capture_output=True,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert awkward_schema.fingerprint(target, original) == awkward_schema.fingerprint(source, original)


@pytest.mark.django_db(transaction=True)  # manage.py runs in a subprocess: it must see the run
def test_a_failed_restore_says_so_in_one_line_on_stderr_and_exits_non_zero(
    source, passphrase_file, backup_root, settings
):
    source.execute("CREATE DATABASE small")
    # Data well past the table of contents: gpg is stopped once that is read.
    source.execute("CREATE TABLE rows AS SELECT md5(i::text) AS h FROM generate_series(1, 300000) i", dbname="small")
    register(source, "small", "small", "source")
    run = backup("small")
    for extra in ([], ["--json"]):
        proc = manage(settings, "restore", str(run.pk), "--into-database", "small", *extra)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "database small already exists" in lines[0], err
        if extra:
            assert json.loads(out.strip().splitlines()[-1])["status"] == "failed"
    # And one that succeeds says nothing there: python-gnupg's warning for the gpg the portal stops
    # on purpose once the table of contents is read ("gpg returned a non-zero error code: 2") is not shown.
    proc = manage(settings, "restore", str(run.pk), "--into-database", "small_copy")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err.strip() == "", err


def test_a_script_is_read_in_the_encoding_it_declares():
    assert all(codecs.lookup(codec) for codec in CODECS.values() if codec)  # each one Python has
    warnings = []
    latin1 = "SET client_encoding = 'LATIN1';\nCOMMENT ON DATABASE x IS 'Malé';\n".encode("latin-1")
    assert script_text(latin1, warnings).endswith("'Malé';\n") and warnings == []
    assert "€" in script_text("SET client_encoding = 'WIN1252';\n'€'".encode("cp1252"), warnings)
    assert "é" in script_text("SET client_encoding = 'UTF8';\n'é'".encode(), warnings) and warnings == []
    with pytest.raises(NotText, match="byte 0xff at offset 32 is not UTF8 text"):
        script_text(b"SET client_encoding = 'UTF8';\n'x\xff'", warnings)
    with pytest.raises(NotText, match="it is in MULE_INTERNAL, an encoding the portal cannot read"):
        script_text(b"SET client_encoding = 'MULE_INTERNAL';\n", warnings)
    assert script_text(b"SET client_encoding = 'SQL_ASCII';\n'caf\xe9'", warnings).endswith("'café'")
    assert len(warnings) == 1 and "SQL_ASCII" in warnings[0]


def test_scripts_are_split_on_statements_never_inside_quotes():
    from restores.sqlscript import statements

    script = (
        "\\connect -reuse-previous=on \"dbname='x'\"\n-- a comment; with a semicolon\n"
        'COMMENT ON DATABASE "a;""b" IS \'one; two\n-- not a comment\';\nSET x = 1;\n'
    )
    assert statements(script) == ['COMMENT ON DATABASE "a;""b" IS \'one; two\n-- not a comment\'', "SET x = 1"]


def test_database_entries_for_another_database_or_unknown_forms_are_warnings_not_guesses():
    from restores.dbprops import DatabaseProperties

    listing = ';     dbname: My "db"\n'
    script = (
        'CREATE DATABASE "My ""db""" WITH TEMPLATE = template0 ENCODING = \'UTF8\' LOCALE = \'C\';\n'
        'ALTER DATABASE "My ""db""" OWNER TO app;\n'
        "ALTER DATABASE other SET work_mem TO '1MB';\n"
        'ALTER DATABASE "My ""db""" RENAME TO x;\n'
    )
    props = DatabaseProperties.parse(listing, script)
    assert [form for form, _ in props.actions] == ["owner"]
    assert props.options == [("TEMPLATE", "template0"), ("ENCODING", "'UTF8'"), ("LOCALE", "'C'")]
    assert len(props.warnings) == 2 and all("not understood" in w for w in props.warnings)


def test_globals_statements_not_understood_are_warnings_and_never_run():
    from restores.cluster_globals import parse

    recognised, warnings = parse(
        "CREATE ROLE app;\nALTER ROLE app WITH LOGIN;\nDROP DATABASE prod;\nCREATE TABLESPACE t LOCATION '/x';\n"
    )
    assert [form for form, _ in recognised] == ["create role", "role options", "tablespace"]
    assert warnings == ["globals statement not applied (not understood): DROP DATABASE prod"]


def db_role_settings(cluster, dbname):
    """{role or '-': set of name=value} that pg_db_role_setting holds for database `dbname`."""
    rows = cluster.execute(
        "SELECT coalesce(r.rolname, '-'), s.setconfig FROM pg_db_role_setting s"
        " JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole"
        " WHERE d.datname = %s",
        [dbname],
    )
    return {role: set(config) for role, config in rows}


def test_settings_pg_dump_quotes_come_back_under_the_new_name(source, passphrase_file, backup_root):
    # PostgreSQL stores these as TimeZone and DateStyle, and pg_dump quotes them and every
    # dotted custom setting: ALTER DATABASE tuned SET "TimeZone" TO 'Indian/Maldives'.
    source.execute("CREATE DATABASE tuned")
    for statement in [
        "ALTER DATABASE tuned SET timezone TO 'Indian/Maldives'",
        "ALTER DATABASE tuned SET datestyle TO 'ISO, DMY'",
        "ALTER DATABASE tuned SET \"app.tenant\" = 'x'",
        "ALTER ROLE app_reader IN DATABASE tuned SET \"myapp.flag\" = 'on'",
    ]:
        source.execute(statement)
    register(source, "tuned", "tuned", "source")
    run = backup("tuned")
    result = restore_json(str(run.pk), "--into-database", "tuned_copy")
    assert result["warnings"] == []
    assert result["status"] == "succeeded", result
    assert db_role_settings(source, "tuned_copy") == {
        "-": {"TimeZone=Indian/Maldives", "DateStyle=ISO, DMY", "app.tenant=x"},
        "app_reader": {"myapp.flag=on"},
    }


def test_onto_another_server_a_new_role_is_never_made_a_member_of_a_role_that_was_there(
    source, target, passphrase_file, backup_root
):
    # The target has its own `readers`: making the backup's app_reader a member of it would
    # widen who holds the target's role everywhere.
    target.execute("CREATE ROLE readers NOLOGIN")
    original = awkward_schema.make_shop(source)
    register(source, "shop", original, "source")
    result = restore_json(str(backup("shop").pk), "--into-database", "shop_copy", "--into-server", "standby")
    assert result["status"] == "succeeded with warnings", result
    assert member_of(target, "app_reader") == set()
    assert (
        "membership of app_reader in readers skipped: readers already existed on standby and gets no new"
        ' member from a restore (GRANT "readers" TO "app_reader" by hand if it should)'
    ) in result["warnings"]


HIJACKED_COUNT = r"""
CREATE TABLE public.t AS SELECT g FROM generate_series(1, 5) g;
CREATE FUNCTION public.fake_count(bigint) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
  BEGIN EXECUTE 'ALTER ROLE app_owner SUPERUSER'; EXCEPTION WHEN others THEN NULL; END;
  RETURN 5000;
END $$;
CREATE AGGREGATE public.count(*) (sfunc = public.fake_count, stype = bigint, initcond = '0');
ALTER DATABASE shady SET search_path = public, pg_catalog;
"""


def test_an_owners_search_path_never_runs_its_functions_in_the_portals_sessions(source, passphrase_file, backup_root):
    """A database's owner puts public before pg_catalog and a count(*) of its own there: the
    portal's counting, as a superuser, on production and in the copy, would run it."""
    source.execute("CREATE DATABASE shady OWNER app_owner")
    with source.connect("shady", user="app_owner", password=awkward_schema.ROLE_PASSWORD) as conn:
        conn.execute(HIJACKED_COUNT)
    server = register(source, "shady", "shady", "source")
    run = backup("shady")
    assert run.details["row_counts"] == {"public.t": 5}
    # A DBA's check sees pg_catalog only: its count(*) and = are the built-in ones, whatever the owner
    # put in public (an operator matching varchar exactly would beat pg_catalog's even listed after it).
    with source.connect("shady", user="app_owner", password=awkward_schema.ROLE_PASSWORD) as conn:
        conn.execute(
            "CREATE FUNCTION public.eq(varchar, varchar) RETURNS bool LANGUAGE plpgsql AS $$ BEGIN "
            "BEGIN EXECUTE 'ALTER ROLE app_owner SUPERUSER'; EXCEPTION WHEN others THEN NULL; END; RETURN true; "
            "END $$; CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.eq); "
            "CREATE TABLE public.v AS SELECT 'a'::varchar AS s UNION ALL SELECT 'b'"
        )
    run = backup("shady")
    for name, sql, expected in (
        ("five", "SELECT count(*) FROM public.t", "5"),
        ("one a", "SELECT count(*) FROM public.v WHERE s = 'a'::varchar", "1"),
    ):
        ValidationCheck.objects.create(server=server, name=name, sql=sql, expected=expected)
    ValidationCheck.objects.create(server=server, name="unqualified", sql="SELECT count(*) FROM t", expected="5")
    test = run_restore_test(server)
    checks = {c["name"]: c for c in test.checks}
    assert checks["check: five"]["ok"] and checks["check: one a"]["ok"], test.checks
    assert "name tables and functions with their schema" in checks["check: unqualified"]["detail"]
    assert source.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'app_owner'") == [(False,)]


def test_a_databases_timeouts_and_read_only_default_do_not_stop_its_backup_restore_or_test(
    source, target, passphrase_file, backup_root
):
    """statement_timeout, lock_timeout and default_transaction_read_only set on the database
    (and so on its copy, as they should be) are not the portal's: its sessions turn them off."""
    source.execute("CREATE DATABASE busy")
    source.execute("CREATE TABLE big AS SELECT g, md5(g::text) h FROM generate_series(1, 300000) g", dbname="busy")
    source.execute(
        "CREATE FUNCTION note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN NULL; END $$; "
        "CREATE EVENT TRIGGER noted ON ddl_command_end EXECUTE FUNCTION note_ddl()",
        dbname="busy",
    )
    for setting in ("statement_timeout = '1ms'", "lock_timeout = '1ms'", "default_transaction_read_only = on"):
        source.execute(f"ALTER DATABASE busy SET {setting}")
    source.execute("ALTER ROLE portal SET statement_timeout = '1ms'")
    try:
        server = register(source, "busy", "busy", "source")
        run = backup("busy")
        assert run.details["row_counts"] == {"public.big": 300000}
        sandbox = Server.objects.get(name="standby")
        server.sandbox_server, server.sandbox_destination = sandbox, sandbox.destination  # as a DBA approved
        server.save()
        test = run_restore_test(server)
        assert test.status == RestoreTest.Status.PASSED, test.error
        result = restore_json(str(run.pk), "--into-database", "busy_copy")
        assert result["status"] == "succeeded", result
        # Its 1 ms statement_timeout is the copy's own: this session turns it off, as the portal's do
        # (a CI run's first catalog read there took longer).
        with source.connect("busy_copy", options="-c statement_timeout=0") as conn:
            assert conn.execute("SELECT evtname FROM pg_event_trigger").fetchall() == [("noted",)]
        settings = source.execute(
            "SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
            " WHERE d.datname = 'busy_copy'"
        )[0][0]
        assert "default_transaction_read_only=on" in settings and "statement_timeout=1ms" in settings
    finally:
        source.execute("ALTER ROLE portal RESET statement_timeout")


def test_a_database_of_thousands_of_tables_that_pg_dump_dumps_is_backed_up(source, passphrase_file, backup_root):
    """Counting in pg_dump's snapshot held a lock on every table and index until the dump ended:
    with the locks pg_dump takes itself, out of shared memory where stock pg_dump alone fits."""
    source.execute("CREATE DATABASE tenants")
    with source.connect("tenants") as conn:
        for start in range(0, 2500, 250):
            conn.execute(
                "; ".join(
                    f"CREATE TABLE t{i} (id int PRIMARY KEY, a int UNIQUE, b int UNIQUE)"
                    for i in range(start, start + 250)
                )
            )
        conn.execute("INSERT INTO t7 VALUES (1), (2)")
    register(source, "tenants", "tenants", "source")
    run = backup("tenants")
    assert len(run.details["row_counts"]) == 2500 and run.details["row_counts"]["public.t7"] == 2


def test_the_portals_sessions_search_pg_catalog_and_keep_a_callers_own_timeout(source, db):
    source.execute("ALTER DATABASE postgres SET statement_timeout = '1ms'")
    try:
        server = register(source, "guarded", "postgres", "source")
        with server.connect() as conn:
            assert conn.execute("SHOW search_path").fetchone()[0] == "pg_catalog,pg_temp"
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"
        with server.connect(options="-c statement_timeout=10000") as conn:  # watching.rpo's own bound
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "10s"
    finally:
        source.execute("ALTER DATABASE postgres RESET statement_timeout")


def onto_standby(source, dbname):
    """`dbname` of the source backed up and restored onto the standby as DBNAME_copy, with the
    warnings of a copy made elsewhere: (the restore's result, the standby's role)."""
    register(source, dbname, dbname, "source")
    run = backup(dbname)
    result = restore_json(str(run.pk), "--into-database", f"{dbname}_copy", "--into-server", "standby")
    assert result["status"] == "succeeded with warnings", result
    return result, Server.objects.get(name="standby").user


def test_onto_another_server_an_event_trigger_of_a_demoted_superuser_is_restored_owned_by_the_portal(
    source, target, passphrase_file, backup_root
):
    """Only a superuser owns an event trigger, and production's superusers are created elsewhere
    without SUPERUSER: the copy's last step failed and the whole restore with it."""
    source.execute("CREATE DATABASE audited")
    with source.connect("audited") as conn:
        conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g")
        conn.execute("SET ROLE boss")
        conn.execute("CREATE FUNCTION public.log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN NULL; END $$")
        conn.execute("CREATE EVENT TRIGGER log_ddl ON ddl_command_end EXECUTE FUNCTION public.log_ddl()")
        conn.execute("CREATE EVENT TRIGGER log_drop ON sql_drop EXECUTE FUNCTION public.log_ddl()")
    result, portal = onto_standby(source, "audited")
    assert target.execute(
        "SELECT evtname, pg_get_userbyid(evtowner) FROM pg_event_trigger ORDER BY 1", dbname="audited_copy"
    ) == [("log_ddl", portal), ("log_drop", portal)]
    assert any(
        "event triggers are owned by a role that is not a superuser on standby" in w
        and f"created owned by {portal} instead" in w
        for w in result["warnings"]
    ), result["warnings"]
    assert target.execute("SELECT count(*) FROM t", dbname="audited_copy") == [(100,)]


def test_onto_an_older_server_a_subscription_of_a_demoted_superuser_is_restored_owned_by_the_portal(
    source, target, passphrase_file, backup_root
):
    """Up to PostgreSQL 15 only a superuser owns a subscription: the restore failed whole."""
    source.execute("CREATE DATABASE subbed")
    with source.connect("subbed") as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
        conn.execute("INSERT INTO items SELECT generate_series(1, 50)")
        conn.execute(
            "CREATE SUBSCRIPTION feed CONNECTION 'host=127.0.0.1 dbname=nowhere' PUBLICATION p"
            " WITH (connect = false, slot_name = 's1', enabled = false)"
        )
        conn.execute("ALTER SUBSCRIPTION feed OWNER TO boss")
    result, portal = onto_standby(source, "subbed")
    # Created, owned by the restoring role, and detached from production's slot as every copy's is.
    assert target.execute(
        "SELECT subname, pg_get_userbyid(subowner), subenabled, subslotname FROM pg_subscription"
    ) == [("feed", portal, False, None)]
    assert any("subscriptions are owned by a role that is not a superuser on standby" in w for w in result["warnings"])
    assert target.execute("SELECT count(*) FROM items", dbname="subbed_copy") == [(50,)]


def test_a_parallel_pg_restore_that_fails_names_the_cause_not_the_dead_worker(pg_cluster, tmp_path):
    """pg_restore -j's leader says "a worker process died unexpectedly" after the worker said why:
    that line was the run's whole error."""
    from backups.pipeline import Tool

    pg_cluster.execute("CREATE DATABASE src")
    pg_cluster.execute("CREATE DATABASE dst")
    with pg_cluster.connect("src") as conn:
        conn.execute("CREATE TABLE items (id int, note text); CREATE INDEX items_note ON items (note)")
        conn.execute("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
    pg_cluster.execute("CREATE TABLE items_note (x int)", dbname="dst")  # the index's name, taken
    dump = tmp_path / "src.dump"
    env = {"PGHOST": pg_cluster.host, "PGPORT": str(pg_cluster.port), "PGUSER": "postgres"}
    bindir = pg_cluster.bin_dir
    subprocess.run(
        [str(bindir / "pg_dump"), "-Fc", "-f", str(dump), "src"], env={**env, "PATH": "/usr/bin:/bin"}, check=True
    )
    tool = Tool([str(bindir / "pg_restore"), "-j", "2", "--exit-on-error", "-d", "dst", str(dump)], env).start()
    assert tool.proc.wait() != 0
    assert any("worker process died unexpectedly" in line for line in tool.stderr_tail)  # what pg_restore says
    error = tool.error_line()
    assert 'relation "items_note" already exists' in error and "worker process died" not in error


def test_when_the_leaders_line_is_all_there_is_it_is_the_error():
    """A worker killed (the OOM killer) says nothing: the leader's line is then the only clue."""
    from backups.pipeline import Tool

    tool = Tool(["sh", "-c", "echo 'pg_restore: error: a worker process died unexpectedly' >&2; exit 1"], {}).start()
    assert tool.proc.wait() == 1
    assert tool.error_line() == "sh: pg_restore: error: a worker process died unexpectedly"


# What the loading's own sessions must see of the source database (found by a probe): each
# materialized view below is refreshed by pg_restore, and a value is stored, in the copy's sessions.
SEEN_BY_THE_LOAD = """
CREATE TABLE docs (id int PRIMARY KEY, body text, at timestamptz);
INSERT INTO docs SELECT g, 'the running dogs were running ' || g, '2026-12-06 23:30+00'::timestamptz + g * interval '1 min'
  FROM generate_series(1, 300) g;
CREATE TABLE blobs (id int, body text);
INSERT INTO blobs SELECT g, repeat('compressible ' || g, 2000) FROM generate_series(1, 50) g;
CREATE TABLE owned_elsewhere (id int);
INSERT INTO owned_elsewhere SELECT generate_series(1, 100);
ALTER TABLE owned_elsewhere OWNER TO no_grant;
GRANT SELECT ON owned_elsewhere TO pg_database_owner;
CREATE MATERIALIZED VIEW words AS SELECT id, to_tsvector(body) AS v FROM docs;
CREATE MATERIALIZED VIEW days AS SELECT at::date AS day, count(*) AS n FROM docs GROUP BY 1;
CREATE MATERIALIZED VIEW mine AS SELECT id FROM docs WHERE current_setting('app.tenant') = 'north' AND id < 10;
CREATE MATERIALIZED VIEW through_owner AS SELECT count(*) AS n FROM owned_elsewhere;
ALTER MATERIALIZED VIEW through_owner OWNER TO app_owner;
"""
SEEN = {
    "words": "SELECT md5(string_agg(v::text, '|' ORDER BY id)) FROM words",
    "days": "SELECT string_agg(day || ':' || n, ',' ORDER BY day) FROM days",
    "mine": "SELECT count(*) FROM mine",
    "through_owner": "SELECT n FROM through_owner",
    "toast": "SELECT string_agg(DISTINCT pg_column_compression(body), ',') FROM blobs",
}


@pytest.mark.parametrize("jobs", [1, 2], ids=["piped", "overlapped"])
def test_the_databases_owner_and_settings_are_in_force_while_its_data_loads(
    source, passphrase_file, backup_root, settings, jobs
):
    """The database's settings and owner were given to the copy after its data: materialized
    views were refreshed under the target's text search configuration and time zone, values stored
    pglz where production stores lz4, and a view read through pg_database_owner, or a setting of
    the database's own, failed the restore. pg_restore --create gives them before the data."""
    settings.RESTORE_JOBS = jobs
    source.execute("CREATE DATABASE shaped OWNER app_owner")
    for setting in (
        "default_text_search_config = 'pg_catalog.simple'",
        "timezone = 'Pacific/Kiritimati'",
        "default_toast_compression = 'lz4'",
        "app.tenant = 'north'",
    ):
        source.execute(f"ALTER DATABASE shaped SET {setting}")
    source.execute(SEEN_BY_THE_LOAD, dbname="shaped")
    register(source, "shaped", "shaped", "source")
    expected = {what: source.execute(query, dbname="shaped") for what, query in SEEN.items()}
    assert expected["toast"] == [("lz4",)] and expected["mine"] == [(9,)] and expected["through_owner"] == [(100,)]

    result = restore_json(str(backup("shaped").pk), "--into-database", "shaped_copy")
    assert result["status"] == "succeeded", result
    assert {what: source.execute(query, dbname="shaped_copy") for what, query in SEEN.items()} == expected
    assert (
        "owner, settings and comment of shaped given to shaped_copy before its data (5 statements)" in result["notes"]
    )


def test_a_read_only_default_of_the_portals_role_does_not_stop_a_restore(source, passphrase_file, backup_root):
    """Found by a probe: with ALTER ROLE ... SET default_transaction_read_only = on for the portal's
    role (a DBA's guard on production), every restore failed at its CREATE DATABASE ("cannot execute
    CREATE DATABASE in a read-only transaction"). A restore writes by definition: its own sessions
    are writable, as its copy's already were."""
    source.execute("CREATE DATABASE guarded")
    source.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g", dbname="guarded")
    register(source, "guarded", "guarded", "source")
    run = backup("guarded")
    source.execute("ALTER ROLE portal SET default_transaction_read_only = on")
    try:
        result = restore_json(str(run.pk), "--into-database", "guarded_copy")
        assert result["status"] == "succeeded", result.get("error")
        assert source.execute("SELECT count(*) FROM t", dbname="guarded_copy") == [(1000,)]
    finally:
        source.execute("ALTER ROLE portal RESET default_transaction_read_only")
