"""A small OpenID Connect provider for the single sign-on tests: django-oauth-toolkit in a
Django project of its own (its settings, SQLite database and RSA key in a directory the test
fixture makes), run as a separate process on 127.0.0.1 by tests/test_sso.py. The portal never
imports it."""
