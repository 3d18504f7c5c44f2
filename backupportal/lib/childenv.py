"""The environment of the programs the portal starts: an allow-list, never the portal's own.

The portal's environment holds secrets (AWS_SECRET_ACCESS_KEY for boto3, DATABASE_URL,
SECRET_KEY, EMAIL_URL ...). A child (pg_dump, gpg, pg_ctl and the server it starts, which runs
on as another OS user) gets only what any program needs, plus what its caller adds for it on
purpose: PGPASSWORD for the libpq client that connects with it, and nothing else.
"""

import os

KEEP = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME", "LD_LIBRARY_PATH"}


def child_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k in KEEP or k.startswith("LC_")}
    env.update(extra or {})
    return env
