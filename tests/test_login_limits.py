"""Login limits: a growing wait per user name and address (never a lock-out of the owner by
someone elsewhere), a limit per address, and the client's address read from X-Forwarded-For
only when a trusted proxy sent it."""

import datetime
import re
import threading

import pytest
import requests
import time_machine
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone

from backupportal.lib.clientaddr import client_address, parse_networks
from backupportal.models import JournalEntry, LoginFailure
from tests.helpers import DEMO_PASSWORD, make_user

START = datetime.datetime(2026, 11, 25, 9, 0, tzinfo=datetime.UTC)


def login(client, username, password, address="192.0.2.10", **headers):
    return client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address, headers=headers
    )


def logged_in(response):
    return response.status_code == 302 and response["Location"] == reverse("dashboard")


@pytest.fixture
def clock():
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


def test_failures_for_one_user_name_make_a_growing_wait(client, db, clock):
    make_user("alice", "DBA")
    for _ in range(3):  # a few typos cost nothing
        assert login(client, "alice", "wrong").status_code == 200
    waits = []
    for _ in range(5):
        assert login(client, "alice", "wrong").status_code == 200  # checked, and failed
        refused = login(client, "alice", DEMO_PASSWORD)  # at once: refused, the password not even checked
        assert refused.status_code == 429 and "wait" in refused.content.decode()
        waits.append(LoginFailure.wait_for(LoginFailure.objects.filter(username="alice"), timezone.now()))
        clock.shift(waits[-1])
    assert waits == [1, 2, 4, 8, 16]
    assert logged_in(login(client, "alice", DEMO_PASSWORD))  # after the wait, the right password works
    assert not LoginFailure.objects.filter(username="alice").exists()  # and the wait is over


def test_an_outsider_cannot_lock_an_approver_out(client, db, clock, settings):
    """Hundreds of wrong passwords for bob from many addresses: bob waits at most LOGIN_MAX_DELAY."""
    make_user("bob", "DBA")
    for n in range(200):
        response = login(client, "bob", "guess", address=f"198.51.100.{n % 250}")
        if response.status_code == 429:
            clock.shift(1)
    waited = 0
    while not logged_in(login(client, "bob", DEMO_PASSWORD, address="192.0.2.77")):
        clock.shift(1)
        waited += 1
        assert waited <= settings.LOGIN_MAX_DELAY
    assert settings.LOGIN_MAX_DELAY <= 60


def test_an_outsider_hammering_a_user_name_from_other_addresses_never_keeps_its_owner_out(client, db, clock, settings):
    """The security review's attack: two addresses (each under LOGIN_ADDRESS_LIMIT) poll bob's
    name with wrong passwords twice a second for ten minutes, landing a counted failure each
    time a wait runs out; bob, from his own address with his password, gets in at once."""
    make_user("bob", "DBA")
    attackers = ["203.0.113.9", "203.0.113.10"]
    owner = "192.0.2.77"
    counted = bob_in = 0
    for second in range(600):
        for n, attacker in enumerate(attackers):
            if login(client, "bob", "guess", address=attacker).status_code == 200:
                counted += 1  # checked (and wrong); otherwise refused with 429
            clock.shift(0.25 + 0.25 * n)
        if second >= 60 and second % 20 == 0:
            response = login(client, "bob", DEMO_PASSWORD, address=owner)
            assert logged_in(response), (second, response.status_code)
            bob_in += 1
            client.logout()
    assert bob_in == 27
    # The attacker was slowed all along: its failures were counted one wait apart, not twice a second.
    per_address = [LoginFailure.objects.filter(username="bob", address=a).count() for a in attackers]
    assert counted == sum(per_address) and all(3 < n < settings.LOGIN_ADDRESS_LIMIT for n in per_address)
    for attacker in attackers:
        # bob's logins did not wipe the attacker's count: it waits still, right password or not.
        refused = login(client, "bob", DEMO_PASSWORD, address=attacker)
        assert refused.status_code == 429 and "wait" in refused.content.decode()


def test_brute_force_on_one_user_name_from_one_address_is_slowed_whatever_the_owner_does(client, db, clock, settings):
    make_user("bob", "DBA")
    guesser = "203.0.113.50"
    for _ in range(settings.LOGIN_FREE_ATTEMPTS + 6):
        while login(client, "bob", "guess", address=guesser).status_code == 429:
            clock.shift(1)
    # Nine failures: the next guess from that address waits 32 seconds after the last.
    assert login(client, "bob", "guess", address=guesser).status_code == 429
    assert logged_in(login(client, "bob", DEMO_PASSWORD, address="192.0.2.77"))  # the owner elsewhere: at once
    client.logout()
    clock.shift(31)
    assert login(client, "bob", "guess", address=guesser).status_code == 429
    clock.shift(1)
    assert login(client, "bob", "guess", address=guesser).status_code == 200


def test_refused_attempts_do_not_make_the_wait_longer(client, db, clock):
    make_user("alice", "DBA")
    for _ in range(4):
        assert login(client, "alice", "wrong").status_code == 200
    count = LoginFailure.objects.count()
    for _ in range(50):
        assert login(client, "alice", "wrong").status_code == 429
    assert LoginFailure.objects.count() == count
    clock.shift(1)  # the wait of the fourth failure, not of the 54th
    assert logged_in(login(client, "alice", DEMO_PASSWORD))


def test_one_password_sprayed_over_many_user_names_is_limited_per_address(client, db, clock, settings):
    make_user("bob", "DBA")
    sprayer = "203.0.113.66"
    for n in range(settings.LOGIN_ADDRESS_LIMIT):
        assert login(client, f"user{n}", "Summer2026!", address=sprayer).status_code == 200
    refused = login(client, "user-next", "Summer2026!", address=sprayer)
    assert refused.status_code == 429 and sprayer in refused.content.decode()
    assert login(client, "bob", DEMO_PASSWORD, address=sprayer).status_code == 429  # even a right password
    assert logged_in(login(client, "bob", DEMO_PASSWORD, address="192.0.2.10"))  # other addresses are not touched
    client.logout()
    clock.shift(settings.LOGIN_FAILURE_WINDOW + 1)
    assert logged_in(login(client, "bob", DEMO_PASSWORD, address=sprayer))  # the window passed


def test_the_admin_login_is_limited_too(client, db, clock, settings):
    make_user("bob", "DBA")
    sprayer = "203.0.113.67"
    for n in range(settings.LOGIN_ADDRESS_LIMIT):
        login(client, f"user{n}", "Summer2026!", address=sprayer)
    response = client.post(reverse("admin:login"), {"username": "bob", "password": DEMO_PASSWORD}, REMOTE_ADDR=sprayer)
    assert response.status_code == 200 and "_auth_user_id" not in client.session


def test_behind_a_trusted_proxy_each_client_is_counted_by_its_own_address(client, db, clock, settings):
    settings.TRUSTED_PROXIES = ["10.0.0.0/24"]
    make_user("bob", "DBA")
    proxy = "10.0.0.5"
    for n in range(settings.LOGIN_ADDRESS_LIMIT):
        login(client, f"user{n}", "Summer2026!", address=proxy, x_forwarded_for="203.0.113.66")
    assert login(client, "x", "y", address=proxy, x_forwarded_for="203.0.113.66").status_code == 429
    # Another client behind the same proxy is not refused for the sprayer's sins.
    assert logged_in(login(client, "bob", DEMO_PASSWORD, address=proxy, x_forwarded_for="192.0.2.44"))
    entry = JournalEntry.objects.filter(action="login", actor="bob").latest("id")
    assert entry.details["address"] == "192.0.2.44"  # the journal names the client, not the proxy
    assert LoginFailure.objects.filter(address="203.0.113.66").count() == settings.LOGIN_ADDRESS_LIMIT


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(client, db, clock, settings):
    settings.TRUSTED_PROXIES = ["10.0.0.5"]
    sprayer = "198.51.100.9"
    for n in range(settings.LOGIN_ADDRESS_LIMIT):
        # A forged header per attempt does not spread the sprayer over many addresses.
        login(client, f"user{n}", "Summer2026!", address=sprayer, x_forwarded_for=f"192.0.2.{n}")
    assert login(client, "x", "y", address=sprayer, x_forwarded_for="192.0.2.200").status_code == 429
    assert set(LoginFailure.objects.values_list("address", flat=True)) == {sprayer}


def at_once(live_server, attempts):
    """POST every (username, password) to the running portal's login page at the same moment,
    each from a session of its own; the status codes, in order."""
    url = live_server.url + reverse("login")
    ready = []
    for _ in attempts:
        session = requests.Session()
        ready.append((session, re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', session.get(url).text)[1]))
    codes, start = [None] * len(attempts), threading.Barrier(len(attempts))

    def attempt(n):
        (session, token), (username, password) = ready[n], attempts[n]
        start.wait()
        form = {"username": username, "password": password, "csrfmiddlewaretoken": token}
        codes[n] = session.post(url, data=form, allow_redirects=False, timeout=120).status_code

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(len(attempts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


@pytest.fixture
def production_hasher(settings):
    # Production's hasher: a password check as slow as on the real portal, where attempts sent
    # together overlap (the suite's MD5 checks in microseconds).
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]


@pytest.mark.django_db(transaction=True)
def test_wrong_passwords_sent_at_once_are_refused_beyond_the_free_attempts(
    live_server, production_hasher, clock, settings
):
    make_user("alice", "DBA")
    codes = at_once(live_server, [("alice", f"wrong-{n}") for n in range(30)])
    # Counted one after another: the free attempts, then the one that starts the wait; the rest wait.
    assert codes.count(200) == settings.LOGIN_FREE_ATTEMPTS + 1 and codes.count(429) == 30 - codes.count(200)
    assert LoginFailure.objects.filter(username="alice").count() == settings.LOGIN_FREE_ATTEMPTS + 1
    assert at_once(live_server, [("alice", DEMO_PASSWORD)]) == [429]  # the right password, too, waits


@pytest.mark.django_db(transaction=True)
def test_a_spray_sent_at_once_is_refused_beyond_the_address_limit(live_server, production_hasher, clock, settings):
    settings.LOGIN_ADDRESS_LIMIT = 5
    make_user("bob", "DBA")
    codes = at_once(live_server, [(f"user{n}", "Summer2026!") for n in range(20)])
    assert codes.count(200) == 5 and codes.count(429) == 15
    assert LoginFailure.objects.count() == 5
    assert at_once(live_server, [("bob", DEMO_PASSWORD)]) == [429]


@pytest.mark.parametrize(
    "trusted, peer, forwarded, client",
    [
        ([], "192.0.2.1", "203.0.113.9", "192.0.2.1"),  # nobody trusted: the peer
        (["127.0.0.1"], "127.0.0.1", "203.0.113.9", "203.0.113.9"),
        (["127.0.0.1"], "127.0.0.1", "", "127.0.0.1"),  # no header: the peer
        # The client typed its own header; the proxy appended what it saw: the rightmost untrusted hop.
        (["127.0.0.1"], "127.0.0.1", "1.2.3.4, 203.0.113.9", "203.0.113.9"),
        (["127.0.0.1", "10.1.0.0/16"], "127.0.0.1", "1.2.3.4, 203.0.113.9, 10.1.2.3", "203.0.113.9"),
        (["127.0.0.1"], "127.0.0.1", "not-an-address", "127.0.0.1"),  # garbled: the proxy itself
        (["::1"], "::1", "2001:db8::7", "2001:db8::7"),
    ],
)
def test_the_client_address(settings, trusted, peer, forwarded, client):
    settings.TRUSTED_PROXIES = trusted
    request = RequestFactory().get("/", REMOTE_ADDR=peer, HTTP_X_FORWARDED_FOR=forwarded)
    assert client_address(request) == client


def test_a_typo_in_trusted_proxies_stops_the_start():
    with pytest.raises(ImproperlyConfigured, match="'10.0.0.300' is not an address or a CIDR"):
        parse_networks(["10.0.0.1", "10.0.0.300"])
