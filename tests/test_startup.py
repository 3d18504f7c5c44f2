"""The web server's start-up names a deployment step that was skipped, in one line, instead of
answering 500 on every page."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def portal(tmp_path, code):
    """Python `code` run with the production settings (DEBUG off) and an empty STATIC_ROOT."""
    key = tmp_path / "journal.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    environ = {
        "PATH": "/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "backupportal.settings",
        "VAR_DIR": str(tmp_path),
        "STATIC_ROOT": str(tmp_path / "static"),
        "SECRET_KEY": "a-test-secret-" + "x" * 40,
        "ALLOWED_HOSTS": "portal.example",
        "JOURNAL_KEY_FILE": str(key),
    }
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True)


def test_a_missing_collectstatic_is_named_in_one_line_at_start_up(tmp_path):
    done = portal(tmp_path, "import backupportal.wsgi")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "never collected" in lines[0] and "collectstatic --noinput" in lines[0]


def test_after_collectstatic_the_web_server_starts(tmp_path):
    collect = "import django; django.setup(); from django.core.management import call_command; "
    collect += "call_command('collectstatic', interactive=False, verbosity=0)"
    assert portal(tmp_path, collect).returncode == 0
    done = portal(
        tmp_path,
        "import gc, sys, backupportal.wsgi; print(backupportal.wsgi.application.__class__.__name__);"
        "print('backupportal.urls' in sys.modules, gc.get_freeze_count())",
    )
    assert done.returncode == 0, done.stderr
    handler, loaded = done.stdout.strip().splitlines()
    assert handler == "WSGIHandler"
    # Start-up's objects, the URLconf's with them, are out of the collector's sight before the
    # first request (backupportal/lib/serving.py: a full collection cost a page 80-100 ms).
    urlconf, frozen = loaded.split()
    assert urlconf == "True" and int(frozen) > 50_000
