"""A database shaped like the strategy's system: users, roles, audit_logs, financial_records.

Used by the demo, the tests and the benchmark. The rows are random names, text, jsonb,
numeric amounts and some random bytes, so that the data compresses 2-4x like real data
(pgbench's blank-padded rows compress ~50x and flatter every compressor).
Standard library + psycopg only: the benchmark runs it without Django.
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS roles (
    id serial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    description text NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    id bigserial PRIMARY KEY,
    username text NOT NULL UNIQUE,
    full_name text NOT NULL,
    email text NOT NULL,
    role_id int NOT NULL REFERENCES roles(id),
    island text NOT NULL,
    password_hash bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    active boolean NOT NULL DEFAULT true
);
CREATE TABLE IF NOT EXISTS audit_logs (
    id bigserial PRIMARY KEY,
    user_id bigint REFERENCES users(id),
    action text NOT NULL,
    at timestamptz NOT NULL,
    ip inet,
    details jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS financial_records (
    id bigserial PRIMARY KEY,
    account text NOT NULL,
    counterparty text NOT NULL,
    amount numeric(14, 2) NOT NULL,
    currency char(3) NOT NULL,
    booked_at timestamptz NOT NULL,
    memo text,
    attachment bytea
);
CREATE INDEX IF NOT EXISTS audit_logs_at ON audit_logs (at);
CREATE INDEX IF NOT EXISTS financial_records_booked_at ON financial_records (booked_at);
"""

# Names and words are drawn from short lists and glued with random numbers and md5 hex:
# varied enough to compress like real text, cheap to generate inside PostgreSQL.
FUNCTIONS = """
CREATE OR REPLACE FUNCTION pick(arr text[]) RETURNS text LANGUAGE sql VOLATILE AS
$$ SELECT arr[1 + floor(random() * array_length(arr, 1))::int] $$;
CREATE OR REPLACE FUNCTION random_bytes(n int) RETURNS bytea LANGUAGE sql VOLATILE AS
$$ SELECT string_agg(decode(md5(random()::text), 'hex'), ''::bytea) FROM generate_series(1, greatest(1, n / 16)) $$;
"""

FIRST = "{Aishath,Mohamed,Ahmed,Fathimath,Ibrahim,Mariyam,Hussain,Aminath,Ali,Hawwa,Abdulla,Khadeeja,Hassan,Shifa,Yoosuf,Zeena}"
LAST = "{Rasheed,Naseem,Waheed,Shareef,Hameed,Latheef,Manik,Didi,Zahir,Saeed,Moosa,Adam,Riyaz,Faisal}"
ISLANDS = "{Male,Hulhumale,Addu,Fuvahmulah,Kulhudhuffushi,Thinadhoo,Naifaru,Eydhafushi,Villingili,Maafushi}"
ACTIONS = (
    "{login,logout,view_invoice,approve_payment,export_report,update_profile,reset_password,create_user,delete_draft}"
)
WORDS = "{invoice,payment,resort,fuel,catering,ferry,salary,rent,supplies,maintenance,tax,refund,deposit,transfer,utilities}"


def create(conn, users=1000, audit_logs=20000, financial_records=10000, attachment_every=20):
    """Create the schema and fill it. `conn` is an autocommit psycopg connection."""
    conn.execute(SCHEMA)
    conn.execute(FUNCTIONS)
    conn.execute(
        "INSERT INTO roles (name, description) VALUES "
        "('admin', 'Full access'), ('finance', 'Financial records'), ('auditor', 'Read-only audit'),"
        " ('staff', 'Day-to-day operations'), ('manager', 'Approvals') ON CONFLICT DO NOTHING"
    )
    start = conn.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()[0]
    conn.execute(
        f"""
        INSERT INTO users (username, full_name, email, role_id, island, password_hash, created_at)
        SELECT lower(f) || '.' || lower(l) || '.' || g,
               f || ' ' || l, lower(f) || '.' || g || '@reliabilitymaldives.mv',
               1 + (g %% 5), pick('{ISLANDS}'), decode(md5(g::text || random()::text), 'hex'),
               now() - random() * interval '900 days'
        FROM (SELECT g, pick('{FIRST}') AS f, pick('{LAST}') AS l
              FROM generate_series(%(start)s + 1, %(start)s + %(n)s) g) names
        """,
        {"start": start, "n": users},
    )
    conn.execute(
        f"""
        INSERT INTO audit_logs (user_id, action, at, ip, details)
        SELECT u, pick('{ACTIONS}'), now() - random() * interval '365 days',
               ('10.' || (random() * 255)::int || '.' || (random() * 255)::int || '.' || (random() * 255)::int)::inet,
               jsonb_build_object('session', md5(random()::text), 'agent', pick('{{Firefox,Chrome,Safari,Edge,mobile-app}}'),
                                  'ok', random() > 0.05, 'ms', (random() * 900)::int, 'note', left(md5(random()::text), 10 + (random() * 22)::int))
        FROM (SELECT 1 + floor(random() * (SELECT max(id) FROM users))::bigint AS u FROM generate_series(1, %(n)s)) s
        """,
        {"n": audit_logs},
    )
    conn.execute(
        f"""
        INSERT INTO financial_records (account, counterparty, amount, currency, booked_at, memo, attachment)
        SELECT 'ACC-' || lpad((random() * 99999)::int::text, 5, '0'),
               pick('{LAST}') || ' ' || pick('{{Trading,Resorts,Marine,Holdings,Supplies,Travel}}'),
               round((random() * 250000 - 50000)::numeric, 2),
               pick('{{MVR,USD,EUR}}'),
               now() - random() * interval '730 days',
               pick('{WORDS}') || ' ' || pick('{WORDS}') || ' ref ' || substr(md5(random()::text), 1, 8),
               CASE WHEN g %% %(every)s = 0 THEN random_bytes(256 + (random() * 2048)::int) END
        FROM generate_series(1, %(n)s) g
        """,
        {"n": financial_records, "every": attachment_every},
    )
    conn.execute("ANALYZE")


def counts(conn, tables=("users", "roles", "audit_logs", "financial_records")):
    """Rows per table, keyed as a logical backup records them (schema.table)."""
    return {f"public.{t}": conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def create_scaled(conn, scale=1.0):
    """The benchmarks' dataset: at scale 1, about 200 MiB on disk. Returns the database's size in bytes."""
    create(
        conn,
        users=int(20000 * scale),
        audit_logs=int(400000 * scale),
        financial_records=int(200000 * scale),
        attachment_every=5,
    )
    return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
