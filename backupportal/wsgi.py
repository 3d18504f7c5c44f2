import os
import sys

import django
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backupportal.settings")


def static_files_missing():
    """The one-line reason the web server cannot serve pages, or "" when the static files are there.

    With the manifest storage of production, a page that names a static file raises a 500
    ("Missing staticfiles manifest entry") when collectstatic never ran: say so at start-up.
    """
    from django.conf import settings
    from django.contrib.staticfiles.storage import staticfiles_storage

    manifest = getattr(staticfiles_storage, "manifest_name", None)
    if manifest is None or staticfiles_storage.exists(manifest):
        return ""
    return (
        f"backupportal: the static files were never collected ({settings.STATIC_ROOT} has no {manifest}): "
        "run `manage.py collectstatic --noinput`, then start the web server again"
    )


# Before the application is made: its static-files middleware warns about the missing
# directory first, and the reason would no longer be the one line printed.
django.setup(set_prefix=False)
if problem := static_files_missing():
    sys.exit(problem)
application = get_wsgi_application()

from backupportal.lib.serving import freeze_startup_objects  # noqa: E402 (needs django.setup)

freeze_startup_objects()
