"""Single sign-on against a real OpenID Connect provider on 127.0.0.1.

The provider is django-oauth-toolkit in a Django project of its own (tests/oidc_provider/), with
its own SQLite database and an RSA key made here at start, run by gunicorn in a separate
process. The portal runs in gunicorn too, configured only through the OIDC_* environment
variables of .env.example. A requests session plays the browser: the login page's SSO button,
the provider's login form and its consent page, the redirects back to the portal.

At the provider: Dana is in the pg-dbas group, Ivan only in interns, and Mallory gave herself
Alice's email address; Alice is a DBA with a local account. None of them has an address the
provider marked verified (no email_verified claim) unless a test seeds one.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied

from backupportal import twofactor
from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry, SsoIdentity
from backupportal.roles import same_person
from backups.models import ChangeRequest
from restores.models import RestoreRequest
from tests.helpers import DEMO_PASSWORD, make_user, portal_env

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "backupportal-test"
CLIENT_SECRET = secrets.token_urlsafe(32)
ROLE_MAP = "pg-dbas=DBA,infra=Sysadmin,auditors=Auditor"
PEOPLE = {
    "dana": {"email": "dana@idp.example.mv", "groups": ["pg-dbas", "staff"]},
    "ivan": {"email": "ivan@idp.example.mv", "groups": ["interns"]},
    "mallory": {"email": "alice@example.mv", "groups": ["auditors"]},  # Alice's address (make_user's)
}
IDP_PASSWORD = "idp-password-" + secrets.token_hex(4)


class Idp:
    """The running provider: its issuer URL, and seed() to change its people."""

    def __init__(self, home, port, portal_port):
        self.home, self.port, self.portal_port = home, port, portal_port
        self.url = f"http://127.0.0.1:{port}"
        self.issuer = f"{self.url}/o"
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")},
            "DJANGO_SETTINGS_MODULE": "tests.oidc_provider.settings",
            "OIDC_PROVIDER_DIR": str(home),
            "OIDC_PROVIDER_ISSUER": self.issuer,
            "PYTHONPATH": str(ROOT),
        }

    def manage(self, *args, stdin=""):
        done = subprocess.run(
            [sys.executable, "-m", "django", *args],
            cwd=ROOT,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]

    def seed(self, **people):
        users = [{"username": name, "password": IDP_PASSWORD, **attrs} for name, attrs in people.items()]
        self.manage("seedidp", stdin=json.dumps({"users": users}))


def wait_until_up(url, process, log):
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(url, timeout=10)
            return
        except requests.RequestException:  # not listening yet, or still booting Django
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError(f"{url} did not start: " + log.read_text()[-2000:]) from None
            time.sleep(0.2)


def gunicorn(app, port, env, log):
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", app],
        cwd=ROOT,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    home = tmp_path_factory.mktemp("idp")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = home / "rsa.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pem.chmod(0o600)
    provider = Idp(home, free_port(), free_port())
    provider.manage("migrate", "--noinput")
    client = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uri": f"http://127.0.0.1:{provider.portal_port}/login/sso/callback/",
    }
    provider.manage("seedidp", stdin=json.dumps(client))
    process = gunicorn("tests.oidc_provider.wsgi", provider.port, provider.env, home / "idp.log")
    wait_until_up(f"{provider.issuer}/.well-known/openid-configuration", process, home / "idp.log")
    yield provider
    stop(process)


@pytest.fixture
def people(idp):
    idp.seed(**PEOPLE)
    return PEOPLE


@contextmanager
def running_portal(settings, idp, **overrides):
    """The portal in gunicorn on the port the provider knows, SSO set up by environment only."""
    sso = {
        "OIDC_RP_CLIENT_ID": CLIENT_ID,
        "OIDC_RP_CLIENT_SECRET": CLIENT_SECRET,
        "OIDC_ISSUER": idp.issuer,
        "OIDC_OP_AUTHORIZATION_ENDPOINT": f"{idp.issuer}/authorize/",
        "OIDC_OP_TOKEN_ENDPOINT": f"{idp.issuer}/token/",
        "OIDC_OP_USER_ENDPOINT": f"{idp.issuer}/userinfo/",
        "OIDC_OP_JWKS_ENDPOINT": f"{idp.issuer}/.well-known/jwks.json",
        "OIDC_ROLE_MAP": ROLE_MAP,
        "OIDC_PROVIDER_NAME": "Test IdP",
    }
    env = portal_env(
        settings,
        Q_SYNC="0",
        DEBUG="false",
        SECURE_SSL_REDIRECT="false",
        WHITENOISE_USE_FINDERS="true",
        **(sso | overrides),
    )
    log = Path(settings.VAR_DIR) / f"portal-sso-{idp.portal_port}.log"
    process = gunicorn("backupportal.wsgi", idp.portal_port, env, log)
    try:
        wait_until_up(f"http://127.0.0.1:{idp.portal_port}/login/", process, log)
        yield f"http://127.0.0.1:{idp.portal_port}"
    finally:
        stop(process)


@pytest.fixture
def portal(settings, idp):
    with running_portal(settings, idp) as url:
        yield url


class Forms(HTMLParser):
    """Each <form>'s id, action and the name=value of its inputs (what a browser would send)."""

    def __init__(self, html):
        super().__init__()
        self.forms, self.links = [], {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"id": a.get("id"), "action": a.get("action") or "", "fields": {}})
        elif tag == "input" and self.forms and a.get("name") and a.get("type") != "submit":
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""
        elif tag == "a" and a.get("id"):
            self.links[a["id"]] = a.get("href")


def sso_login(portal, username, consent="allow"):
    """The browser's way: the SSO button, the provider's login form, its consent page, and back."""
    browser = requests.Session()
    login_page = browser.get(f"{portal}/login/")
    button = Forms(login_page.text).links["sso"]
    page = browser.get(urljoin(login_page.url, button))
    assert not page.url.startswith(portal) and "/accounts/login/" in page.url, page.url  # at the provider
    form = Forms(page.text).forms[0]
    fields = {**form["fields"], "username": username, "password": IDP_PASSWORD}
    page = browser.post(urljoin(page.url, form["action"]), data=fields)
    consent_form = next(f for f in Forms(page.text).forms if f["id"] == "authorizationForm")
    data = dict(consent_form["fields"])
    if consent == "allow":
        data["allow"] = "Authorize"
    page = browser.post(urljoin(page.url, consent_form["action"]), data=data)
    return browser, page


def header_user(page):
    """The user name and role the portal's header shows."""
    return re.search(r'<form class="who"[^>]*>.*?<span>([^<]*)</span>', page.text, re.S).group(1).strip()


def test_an_sso_login_lands_in_the_role_its_groups_give_and_loses_it_when_they_change(portal, idp, people):
    browser, page = sso_login(portal, "dana")
    assert page.status_code == 200 and page.url == f"{portal}/", page.url
    identity = SsoIdentity.objects.select_related("user").get()
    dana = identity.user
    assert identity.issuer == idp.issuer and identity.subject.isdigit()  # the provider's own user id
    assert header_user(page) == f"{dana.username} · DBA"
    assert dana.username == f"dana@127.0.0.1-{idp.port}" and not dana.has_usable_password()
    assert set(dana.groups.values_list("name", flat=True)) == {"DBA"}
    assert identity.last_groups == ["pg-dbas", "staff"]
    assert JournalEntry.objects.filter(action="sso_user_created", actor=dana.username).count() == 1
    assert JournalEntry.objects.filter(action="login", actor=dana.username).count() == 1

    # Dana leaves the DBA team at the provider: her next login takes the role away.
    idp.seed(dana={**PEOPLE["dana"], "groups": ["staff"]})
    browser, page = sso_login(portal, "dana")
    assert page.status_code == 403 and "No role yet" in page.text
    assert SsoIdentity.objects.get().user == dana  # the same account, found by issuer and subject
    assert not dana.groups.exists() and not User.objects.get(pk=dana.pk).is_staff
    change = JournalEntry.objects.get(action="sso_roles_changed", details__after=[])
    assert change.details["before"] == ["DBA"] and change.actor == dana.username
    assert browser.get(f"{portal}/journal/").status_code == 403


def test_an_account_disabled_in_the_portal_loses_its_single_sign_on_session_at_once(portal, people):
    browser, page = sso_login(portal, "dana")
    assert page.status_code == 200 and page.url == f"{portal}/", page.url
    dana = SsoIdentity.objects.get().user
    User.objects.filter(pk=dana.pk).update(is_active=False)  # an admin disables her
    page = browser.get(f"{portal}/", allow_redirects=False)
    assert page.status_code == 302 and page.headers["Location"].startswith("/login/"), page.status_code
    # and she cannot come back in through the provider either
    browser, page = sso_login(portal, "dana")
    assert page.url.startswith(f"{portal}/login/") and "is disabled in the portal" in page.text


def test_claims_that_map_to_no_role_give_none(portal, people):
    browser, page = sso_login(portal, "ivan")
    assert page.status_code == 403 and "No role yet" in page.text
    ivan = SsoIdentity.objects.get().user
    assert not ivan.groups.exists() and not ivan.is_staff
    for url in ("/", "/journal/", "/coverage/", "/admin/"):
        assert browser.get(f"{portal}{url}", allow_redirects=False).status_code in (302, 403), url
    assert "No role yet" in browser.get(f"{portal}/").text
    # His address is not verified, yet a local administrator may reset his second factor: only an
    # account with his address may not (twofactor.reset goes by the address, not four eyes' doubt).
    assert twofactor.reset(ivan, make_user("sam", superuser=True)) == 0


def test_an_idp_user_with_a_local_dbas_email_does_not_become_that_dba(portal, people):
    alice = make_user("alice", "DBA")
    assert alice.email == PEOPLE["mallory"]["email"]
    browser, page = sso_login(portal, "mallory")
    mallory = SsoIdentity.objects.get().user
    assert mallory.pk != alice.pk and mallory.email == alice.email
    assert header_user(page) == f"{mallory.username} · Auditor"  # her own account, and her groups' role
    assert not alice.sso_identities.exists()
    assert set(alice.groups.values_list("name", flat=True)) == {"DBA"}
    # Alice's DBA powers are not Mallory's: an auditor changes nothing.
    token = browser.cookies.get("csrftoken")
    refused = browser.post(f"{portal}/servers/maldives/backup/", data={"csrfmiddlewaretoken": token, "kind": "logical"})
    assert refused.status_code in (403, 404)


def test_an_address_the_provider_verified_does_not_link_to_a_local_account_either(portal, idp, people):
    alice = make_user("alice", "DBA")
    idp.seed(mallory={**PEOPLE["mallory"], "email_verified": True})
    browser, page = sso_login(portal, "mallory")
    mallory = SsoIdentity.objects.get().user
    assert mallory.pk != alice.pk and header_user(page) == f"{mallory.username} · Auditor"
    assert not alice.sso_identities.exists()


def fresh(user):
    """The account as the next request loads it (what four eyes read is kept for one request)."""
    return User.objects.get(pk=user.pk)


def four_eyes_pair(requester, approver):
    """Whether `approver` may decide on a restore `requester` asked for (the approval's own check)."""
    request = RestoreRequest(status=RestoreRequest.Status.PENDING, requested_by=requester)
    if request.awaits_decision_by(approver):
        return True
    with pytest.raises(PermissionDenied) as refused:
        request.approve(approver)
    return str(refused.value)


def test_an_address_the_provider_did_not_verify_cannot_make_ones_two_accounts_two_people(
    portal, idp, people, catalog_server
):
    """Bob, a DBA with a local account, types another address of his at the provider: unverified,
    it is the only thing that could tell his single sign-on account from his local one."""
    bob = make_user("bob", "DBA")
    for verified in ({}, {"email_verified": False}):
        SsoIdentity.objects.all().delete()
        idp.seed(bob={"email": "robert@elsewhere.mv", "groups": ["pg-dbas"], **verified})
        browser, page = sso_login(portal, "bob")
        bob, bob_sso = fresh(bob), SsoIdentity.objects.get().user
        assert header_user(page) == f"{bob_sso.username} · DBA"
        assert same_person(bob, bob_sso) and same_person(bob_sso, bob)
        for requester, approver in ((bob, bob_sso), (bob_sso, bob)):
            refusal = four_eyes_pair(requester, approver)
            assert "the identity provider did not verify" in refusal, refusal
    change = ChangeRequest.open(
        ChangeRequest.Kind.SHORTEN_RETENTION, catalog_server, bob, "disk full", {"base_retention_days": {"to": 7}}
    )
    assert not change.awaits_decision_by(bob_sso)
    with pytest.raises(PermissionDenied, match="the identity provider did not verify"):
        change.approve(bob_sso)


def test_a_verified_address_tells_a_single_sign_on_account_from_a_local_one(portal, idp, people):
    alice = make_user("alice", "DBA")
    idp.seed(dana={**PEOPLE["dana"], "email_verified": True})
    sso_login(portal, "dana")
    identity = SsoIdentity.objects.select_related("user").get()
    dana = identity.user
    assert identity.email_verified and not same_person(alice, dana)
    assert four_eyes_pair(alice, dana) is True and four_eyes_pair(dana, alice) is True

    # Her address changes at the provider: the account keeps the one it was made with, which
    # the provider no longer vouches for, so she and Alice are again not told apart.
    idp.seed(dana={**PEOPLE["dana"], "email": "dana.new@idp.example.mv", "email_verified": True})
    sso_login(portal, "dana")
    identity.refresh_from_db()
    assert not identity.email_verified and identity.user.email == PEOPLE["dana"]["email"]
    alice = fresh(alice)
    assert same_person(alice, dana) and four_eyes_pair(fresh(dana), alice) is not True


def test_a_local_account_without_an_address_is_not_told_from_a_single_sign_on_one(portal, idp, people, catalog_server):
    """Bob's local DBA account was made without an e-mail address; his single sign-on account has
    one the provider verified. Nothing ties the two together, and nothing tells them apart."""
    bob = make_user("bob", "DBA")
    User.objects.filter(pk=bob.pk).update(email="")
    idp.seed(bob={"email": "bob@idp.example.mv", "email_verified": True, "groups": ["pg-dbas"]})
    sso_login(portal, "bob")
    identity = SsoIdentity.objects.select_related("user").get()
    bob, bob_sso = fresh(bob), identity.user
    assert identity.email_verified
    assert same_person(bob, bob_sso) and same_person(bob_sso, bob)
    for requester, approver in ((bob, bob_sso), (bob_sso, bob)):
        refusal = four_eyes_pair(fresh(requester), fresh(approver))
        assert "without an e-mail address" in refusal, refusal
    change = ChangeRequest.open(
        ChangeRequest.Kind.SHORTEN_RETENTION, catalog_server, bob, "disk full", {"base_retention_days": {"to": 7}}
    )
    assert not change.awaits_decision_by(fresh(bob_sso))
    with pytest.raises(PermissionDenied, match="without an e-mail address"):
        change.approve(fresh(bob_sso))


def test_an_unverified_address_equal_to_a_local_accounts_still_makes_one_person(portal, people):
    """The conservative side: Mallory may have typed Alice's address, or it may be Alice's own second
    account; the portal cannot know, so neither decides on the other's requests."""
    alice = make_user("alice", "DBA")
    sso_login(portal, "mallory")
    mallory = SsoIdentity.objects.get().user
    assert same_person(alice, mallory)
    assert "same e-mail address" in four_eyes_pair(mallory, alice)


def test_local_accounts_still_log_in_and_the_login_page_offers_sso(portal, people):
    make_user("alice", "DBA")
    browser = requests.Session()
    page = browser.get(f"{portal}/login/")
    assert "Log in with Test IdP" in page.text
    form = next(f for f in Forms(page.text).forms if "csrfmiddlewaretoken" in f["fields"])
    fields = {**form["fields"], "username": "alice", "password": DEMO_PASSWORD}
    page = browser.post(urljoin(page.url, form["action"]), data=fields)
    assert page.status_code == 200 and header_user(page) == "alice · DBA"
    assert not SsoIdentity.objects.exists()


def test_a_refused_consent_comes_back_as_a_one_line_reason(portal, people):
    browser, page = sso_login(portal, "dana", consent="cancel")
    assert page.url.startswith(f"{portal}/login/")
    assert "Single sign-on failed: the identity provider answered &#x27;access_denied&#x27;." in page.text
    assert not SsoIdentity.objects.exists() and not User.objects.exists()
    assert JournalEntry.objects.filter(action="sso_login_refused", outcome="refused").exists()


def test_an_id_token_from_another_issuer_is_refused(settings, idp, people):
    with running_portal(settings, idp, OIDC_ISSUER=f"{idp.url}/someone-else") as portal:
        browser, page = sso_login(portal, "dana")
    assert page.url.startswith(f"{portal}/login/")
    assert "Single sign-on failed: the ID token comes from" in page.text
    assert not SsoIdentity.objects.exists() and not User.objects.exists()
    entry = JournalEntry.objects.get(action="sso_login_refused")
    assert CLIENT_SECRET not in json.dumps(entry.details)


def test_an_error_sent_to_the_callback_without_a_login_begun_is_not_journaled(client, db, settings):
    """Anyone can send the callback link with an error of their choosing: only a login this
    browser began (its state) is journaled as refused."""
    settings.OIDC_RP_CLIENT_ID = CLIENT_ID
    for _ in range(3):
        page = client.get("/login/sso/callback/", {"error": "=HYPERLINK(1)", "state": "forged"}, follow=True)
        assert "Single sign-on failed: the identity provider answered" in page.content.decode()
    assert not JournalEntry.objects.filter(action="sso_login_refused").exists()


def test_single_sign_on_is_off_until_configured(client, db):
    assert client.get("/login/sso/").status_code == 404
    assert "Log in with" not in client.get("/login/").content.decode()
