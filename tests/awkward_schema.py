"""Databases that are hard to restore exactly, and how to compare two copies of one.

AWKWARD: every feature a logical restore tends to lose (database owner, ACL, comment and
settings, role-in-database settings, extensions, row-level security, column grants, large
objects with ACLs and comments, partitions, inheritance, unicode and quoted names).
SHOP: a small real-world shaped schema (a DVD-rental-like shop) with realistic rows.

`make_roles(cluster)` creates the roles both use; `make_awkward(cluster, dbname)` and
`make_shop(cluster, dbname)` create the databases. `fingerprint(cluster, dbname)` says
everything that must survive a restore: compare the fingerprints of original and copy.
"""

import re
import subprocess
from pathlib import Path

from psycopg import sql

# Roles of the source cluster. "Owner With Space" needs quoting; app_owner owns the database
# of its own name; boss is a superuser whose powers must never reach another cluster.
ROLES = [
    "CREATE ROLE app_owner LOGIN PASSWORD {pw}",
    'CREATE ROLE "Owner With Space" LOGIN PASSWORD {pw}',
    "CREATE ROLE app_reader LOGIN PASSWORD {pw} CONNECTION LIMIT 7",
    "CREATE ROLE no_grant LOGIN PASSWORD {pw}",
    "CREATE ROLE readers NOLOGIN",
    "CREATE ROLE boss SUPERUSER CREATEROLE REPLICATION BYPASSRLS LOGIN PASSWORD {pw}",
    "GRANT readers TO app_reader",
    "CREATE ROLE auditor LOGIN PASSWORD {pw}",
    "GRANT pg_read_all_data TO auditor",
    "ALTER ROLE app_reader SET statement_timeout TO '5min'",
    "COMMENT ON ROLE app_reader IS 'the application''s read-only login'",
]
ROLE_PASSWORD = "source-role-Secret-77"


def make_roles(cluster):
    for statement in ROLES:
        cluster.execute(sql.SQL(statement).format(pw=sql.Literal(ROLE_PASSWORD)))


def _database(cluster, dbname, owner, options=""):
    cluster.execute(
        sql.SQL("CREATE DATABASE {} OWNER {} " + options).format(sql.Identifier(dbname), sql.Identifier(owner))
    )
    db = sql.Identifier(dbname)
    for statement in [
        "REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC",
        "GRANT CONNECT ON DATABASE {db} TO app_reader",
        "GRANT CONNECT, CREATE ON DATABASE {db} TO readers WITH GRANT OPTION",
        "ALTER DATABASE {db} SET search_path TO app, public",
        "ALTER DATABASE {db} SET work_mem TO '12MB'",
        "ALTER DATABASE {db} CONNECTION LIMIT 40",
        "ALTER ROLE app_reader IN DATABASE {db} SET search_path TO app",
    ]:
        cluster.execute(sql.SQL(statement).format(db=db))
    cluster.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(f"{dbname}: it's the; real one")))


AWKWARD_SQL = r"""
CREATE EXTENSION citext;
CREATE EXTENSION hstore;
CREATE SCHEMA app AUTHORIZATION app_owner;
CREATE SCHEMA "Ünïcode Schéma";
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN app.email AS citext CHECK (value LIKE '%_@_%');

CREATE TABLE app.customers (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email app.email NOT NULL UNIQUE,
    tags hstore,
    mood app.mood DEFAULT 'ok',
    salary numeric(10,2),
    tenant text NOT NULL DEFAULT 'north'
);
ALTER TABLE app.customers OWNER TO app_owner;
COMMENT ON TABLE app.customers IS 'who buys';
COMMENT ON COLUMN app.customers.salary IS 'secret: column grants hide it';
INSERT INTO app.customers (email, tags, mood, salary, tenant)
SELECT 'user' || g || '@example.mv', hstore('k', g::text), (ARRAY['sad','ok','happy'])[1 + g % 3]::app.mood,
       g * 10.5, CASE WHEN g % 2 = 0 THEN 'north' ELSE 'south' END
FROM generate_series(1, 300) g;

-- Row-level security, forced for the owner too.
ALTER TABLE app.customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.customers FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_north ON app.customers FOR SELECT TO readers USING (tenant = 'north');
CREATE POLICY owner_all ON app.customers TO app_owner USING (true);

-- Column grants: app_reader sees id and email, never salary.
GRANT USAGE ON SCHEMA app TO readers, app_reader;
GRANT SELECT (id, email, mood) ON app.customers TO app_reader;
GRANT UPDATE (mood) ON app.customers TO readers;

-- Partitions.
CREATE TABLE app.events (id bigint, at date NOT NULL, what text) PARTITION BY RANGE (at);
CREATE TABLE app.events_2025 PARTITION OF app.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE app.events_2026 PARTITION OF app.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX ON app.events (at);
INSERT INTO app.events SELECT g, date '2025-06-01' + g, 'event ' || g FROM generate_series(1, 400) g;

-- Inheritance.
CREATE TABLE app.vehicles (id int PRIMARY KEY, wheels int);
CREATE TABLE app.boats (hull text) INHERITS (app.vehicles);
INSERT INTO app.vehicles VALUES (1, 4), (2, 2);
INSERT INTO app.boats VALUES (10, 0, 'wood'), (11, 0, 'steel');

-- Unicode and quoted names.
CREATE TABLE "Ünïcode Schéma"."Mixed ""Case"" Täble" ("Ünïcode Côlumn" text, "select" int, "a;b" text);
INSERT INTO "Ünïcode Schéma"."Mixed ""Case"" Täble" VALUES ('Malé, Hulhumalé', 1, 'x;y'), ('façade ½ ÿ', 2, 'q''uote');
CREATE VIEW "Ünïcode Schéma"."Vïew" AS SELECT "Ünïcode Côlumn" FROM "Ünïcode Schéma"."Mixed ""Case"" Täble";
CREATE FUNCTION app.shout(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT upper(t) || '!' $$;
CREATE MATERIALIZED VIEW app.moods AS SELECT mood, count(*) FROM app.customers GROUP BY mood;

-- Large objects, with their owner, ACL and comment.
SELECT lo_from_bytea(424242, convert_to(repeat('large object body ', 500), 'UTF8'));
SELECT lo_from_bytea(424243, '\x00ff10'::bytea);
ALTER LARGE OBJECT 424242 OWNER TO app_owner;
GRANT SELECT ON LARGE OBJECT 424242 TO app_reader;
COMMENT ON LARGE OBJECT 424242 IS 'a scanned contract';
"""

SHOP_SQL = r"""
CREATE SCHEMA shop AUTHORIZATION app_owner;
SET ROLE app_owner;
CREATE TABLE shop.country (country_id serial PRIMARY KEY, country text NOT NULL UNIQUE);
CREATE TABLE shop.city (city_id serial PRIMARY KEY, city text NOT NULL,
    country_id int NOT NULL REFERENCES shop.country);
CREATE TABLE shop.customer (customer_id serial PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL,
    email text, city_id int REFERENCES shop.city, active boolean NOT NULL DEFAULT true,
    created timestamptz NOT NULL DEFAULT now());
CREATE TABLE shop.film (film_id serial PRIMARY KEY, title text NOT NULL, release_year int,
    rental_rate numeric(4,2) NOT NULL DEFAULT 4.99, rating text CHECK (rating IN ('G','PG','PG-13','R')),
    fulltext tsvector GENERATED ALWAYS AS (to_tsvector('english', title)) STORED);
CREATE INDEX film_fulltext ON shop.film USING gin (fulltext);
CREATE TABLE shop.rental (rental_id bigserial PRIMARY KEY, film_id int NOT NULL REFERENCES shop.film,
    customer_id int NOT NULL REFERENCES shop.customer, rented_at timestamptz NOT NULL, returned_at timestamptz);
CREATE INDEX rental_customer ON shop.rental (customer_id, rented_at);
CREATE TABLE shop.payment (payment_id bigserial PRIMARY KEY, rental_id bigint REFERENCES shop.rental,
    amount numeric(6,2) NOT NULL CHECK (amount >= 0), paid_at timestamptz NOT NULL);
CREATE VIEW shop.revenue_by_film AS
    SELECT f.title, sum(p.amount) AS revenue FROM shop.payment p
    JOIN shop.rental r USING (rental_id) JOIN shop.film f USING (film_id) GROUP BY f.title;
CREATE FUNCTION shop.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.returned_at := coalesce(NEW.returned_at, now()); RETURN NEW; END $$;
CREATE TRIGGER rental_returned BEFORE UPDATE OF returned_at ON shop.rental FOR EACH ROW EXECUTE FUNCTION shop.touch();
INSERT INTO shop.country (country) VALUES ('Maldives ދިވެހިރާއްޖެ'), ('Sri Lanka'), ('India'), ('Malaysia 🐢');
INSERT INTO shop.city (city, country_id) SELECT 'City ' || g, 1 + g % 4 FROM generate_series(1, 40) g;
INSERT INTO shop.customer (first_name, last_name, email, city_id, created)
    SELECT 'Aminath' || g, 'Ibrahim' || g, 'c' || g || '@shop.mv', 1 + g % 40, timestamptz '2024-01-01' + g * interval '1 hour'
    FROM generate_series(1, 500) g;
INSERT INTO shop.film (title, release_year, rental_rate, rating)
    SELECT 'Film of the atoll ' || g, 1990 + g % 35, 0.99 + (g % 5), (ARRAY['G','PG','PG-13','R'])[1 + g % 4]
    FROM generate_series(1, 200) g;
INSERT INTO shop.rental (film_id, customer_id, rented_at, returned_at)
    SELECT 1 + g % 200, 1 + g % 500, timestamptz '2025-01-01' + g * interval '7 minutes',
           CASE WHEN g % 9 = 0 THEN NULL ELSE timestamptz '2025-01-02' + g * interval '7 minutes' END
    FROM generate_series(1, 3000) g;
INSERT INTO shop.payment (rental_id, amount, paid_at)
    SELECT g, (g % 7) + 0.99, timestamptz '2025-01-01' + g * interval '7 minutes' FROM generate_series(1, 3000) g;
RESET ROLE;
GRANT USAGE ON SCHEMA shop TO readers;
GRANT SELECT ON ALL TABLES IN SCHEMA shop TO readers;
"""


def make_awkward(cluster, dbname='Sales "EU" Dept.'):
    """The awkward database: LATIN1 and C locale (not the cluster's default), owned by a role
    whose name needs quoting, itself named with quotes, a space and a dot. (Not with non-ASCII
    letters: the stock `pg_restore --create` cannot reconnect to a LATIN1 database so named,
    as the dump holds its name in LATIN1 and the catalog in UTF8.)"""
    _database(cluster, dbname, "Owner With Space", "TEMPLATE template0 ENCODING 'LATIN1' LOCALE 'C'")
    with _connect(cluster, dbname) as conn:
        conn.execute(AWKWARD_SQL)
    return dbname


def make_shop(cluster, dbname="app_owner"):
    """The shop: a database named like its owner role."""
    _database(cluster, dbname, "app_owner")
    with cluster.connect(dbname) as conn:
        conn.execute(SHOP_SQL)
    return dbname


def _connect(cluster, dbname):
    """UTF8 on the client whatever the database's encoding: the server converts."""
    return cluster.connect(dbname, options="-c client_encoding=UTF8")


# --- Comparing two copies -------------------------------------------------------------------

DATABASE_PROPERTIES = """
SELECT pg_get_userbyid(d.datdba), d.datacl::text, shobj_description(d.oid, 'pg_database'),
       pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, d.datlocprovider, d.datconnlimit,
       (SELECT array_agg(coalesce(r.rolname, '*') || ':' || array_to_string(s.setconfig, ',') ORDER BY 1)
          FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE s.setdatabase = d.oid)
FROM pg_database d WHERE d.datname = %s
"""

LARGE_OBJECTS = """
SELECT m.oid, pg_get_userbyid(m.lomowner), m.lomacl::text, obj_description(m.oid, 'pg_largeobject'),
       md5(lo_get(m.oid))
FROM pg_largeobject_metadata m ORDER BY m.oid
"""

TABLES = """
SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
ORDER BY 1
"""


def database_properties(cluster, dbname):
    return cluster.execute(DATABASE_PROPERTIES, [dbname])[0]


def table_fingerprints(cluster, dbname):
    """{table: (rows, md5 of its rows in order)}; ONLY: a parent's rows are not its children's."""
    found = {}
    with _connect(cluster, dbname) as conn:
        conn.execute("SET row_security = off")
        for (table,) in conn.execute(TABLES).fetchall():
            query = f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM ONLY {table} t"
            found[table] = conn.execute(query).fetchone()
    return found


def schema(cluster, dbname, bin_dir=None):
    """pg_dump --schema-only (the cluster's own, or `bin_dir`'s: one pg_dump for two versions),
    without what differs between any two dumps (the \\restrict key, the server's version)."""
    env = {"PGHOST": cluster.host, "PGPORT": str(cluster.port), "PGUSER": "postgres", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(Path(bin_dir or cluster.bin_dir) / "pg_dump"), "--schema-only", "--encoding=UTF8", f"--dbname={dbname}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return re.sub(r"^(\\(un)?restrict .*|-- Dumped from database version .*)$", "", done.stdout, flags=re.M)


def fingerprint(cluster, dbname, bin_dir=None):
    """Everything a restore must give back, with the database's name left out (the schema as
    `bin_dir`'s pg_dump reads it, when given)."""
    with _connect(cluster, dbname) as conn:
        large_objects = conn.execute(LARGE_OBJECTS).fetchall()
        extensions = conn.execute("SELECT extname, extversion FROM pg_extension ORDER BY 1").fetchall()
    return {
        "database": database_properties(cluster, dbname),
        "schema": schema(cluster, dbname, bin_dir),
        "tables": table_fingerprints(cluster, dbname),
        "large objects": large_objects,
        "extensions": extensions,
    }
