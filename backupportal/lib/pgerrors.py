"""Turn libpq's and the client tools' errors into one line a DBA can act on."""

import re

from backupportal.lib.redact import redact

_RULES = [
    (
        # The portal's own connections refuse (require_auth) to send a password in clear text or as md5.
        r"authentication method requirement .* server requested an? (cleartext|hashed) password",
        "{where} asked for a {0} password, which the portal never sends (whoever listens there would keep it): "
        "check the DSN's host and port, and have that server use scram-sha-256 (pg_hba.conf, password_encryption)",
    ),
    (
        r"password authentication failed for user \"?([^\"\s]+)",
        "password authentication failed for user {0} on {where}: check the password",
    ),
    (
        r"no password supplied|fe_sendauth",
        "{where} asks for a password: give one (--password-file, PGPASSWORD or the admin's Password field)",
    ),
    (
        r"database \"([^\"]+)\" does not exist",
        "database {0} does not exist on {where}: check the name (the DSN's, or the server's databases to back up)",
    ),
    (
        r"permission denied for database \"?([^\"\s]+)",
        "the portal's user may not connect to database {0} on {where}: GRANT CONNECT ON DATABASE {0} TO it, "
        "or leave {0} out of the server's databases to back up",
    ),
    (r"role \"([^\"]+)\" does not exist", "role {0} does not exist on {where}: check the DSN's user"),
    (
        r"Connection refused",
        "cannot connect to {where}: connection refused; is PostgreSQL running and listening there?",
    ),
    (r"timeout expired|timed out", "cannot connect to {where}: timed out; check the host, the port and the firewall"),
    (
        r"could not translate host name \"?([^\"\s]+)|Name or service not known|nodename nor servname",
        "cannot resolve the host name of {where}: check the DSN's host",
    ),
    (r"the database system is (starting up|shutting down)", "{where} is {0}: try again in a moment"),
    (
        # The server went away mid-stream: pg_dump and pg_basebackup say it in these words.
        r"server closed the connection unexpectedly|terminating connection due to administrator command"
        r"|COPY stream ended before last file was finished",
        "{where} closed the connection mid-way (was PostgreSQL stopped or restarted?): "
        "check that it is running, then try again",
    ),
    (r"no pg_hba.conf entry", "{where} refuses this client (no pg_hba.conf entry): allow it in pg_hba.conf"),
]


def explain(exc, server=None, host=None, port=None) -> str:
    """One line: what went wrong and what to do. Never carries a password."""
    text = str(exc)
    where = f"{server.host}:{server.port}" if server is not None else f"{host}:{port}"
    for pattern, message in _RULES:
        m = re.search(pattern, text, re.I)
        if m:
            return message.format(*m.groups(), where=where)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "unknown error")
    return redact(f"{where}: {first}")
