"""For the data migrations only (the loader skips modules whose name starts with "_"): frozen
here, never importing live code, which may change after the migrations that use it."""

from psycopg.conninfo import conninfo_to_dict


def dsn_database(dsn):
    """The database a DSN names, as the portal reads it (backupportal.lib.libpq): "postgres"
    when it names none, or when it cannot be read (the admin says what is wrong with it)."""
    try:
        return conninfo_to_dict(dsn).get("dbname") or "postgres"
    except Exception:  # noqa: BLE001  psycopg's parser: a DSN the portal could not use either
        return "postgres"
