"""What the WAL commands share (a module Django does not take for a command: its name starts with _)."""

from backupportal.lib.commands import fail
from backups.models import Server


def server_named(name):
    server = Server.objects.filter(name=name).first()
    if server is None:
        fail(f"unknown server {name!r}: register it with addserver first")
    return server
