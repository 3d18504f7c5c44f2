"""What the server page asks about restore tests without a change to its view."""

from django import template

register = template.Library()


@register.filter
def has_good_backup(server, kind):
    """A restore test of this kind has something to restore (the button is offered only then)."""
    return server.latest_good_backup(kind) is not None
