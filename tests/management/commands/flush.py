"""Django's flush, for the test suite's transactional tests on SQLite.

Between transactional tests Django empties every table with DELETE on SQLite (TRUNCATE on
PostgreSQL, which the journal's trigger does not see). The journal's append-only triggers
refuse that DELETE, as they must in the portal: here they are dropped for the flush and made
again right after, so every test starts on an empty database that still refuses tampering.
"""

import importlib

from django.core.management.commands.flush import Command as DjangoFlush
from django.db import connections

triggers = importlib.import_module("backupportal.migrations.0007_journal_sqlite_trigger")


class Command(DjangoFlush):
    def handle(self, **options):
        connection = connections[options["database"]]
        if connection.vendor != "sqlite":
            return super().handle(**options)
        with connection.cursor() as cur:
            for statement in triggers.DROP:
                cur.execute(statement)
        try:
            return super().handle(**options)
        finally:
            with connection.cursor() as cur:
                for statement in triggers.TRIGGERS:
                    cur.execute(statement)
