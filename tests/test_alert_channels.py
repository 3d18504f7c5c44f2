"""Alert channels beyond email: a JSON webhook receives, on a real HTTP server on 127.0.0.1, one
message when an alert opens and one when it resolves; a channel that fails (500, a closed port)
is retried with backoff and shown, and never stops the mail or the other channels. Slack, Teams,
Telegram and Discord cannot be reached from here: their settings are checked for their form, and
their secrets are never shown again. A channel may not make the portal reach inside its network:
the suite lists the sink's 127.0.0.1 in ALERT_CHANNEL_ALLOWED_HOSTS (tests/settings.py), and the
tests of that rule empty the list."""

import json
import logging
import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import time_machine
from django.urls import reverse
from django.utils import timezone

from backupportal.lib.osuser import free_port
from backupportal.models import JournalEntry
from backups.models import Server
from restores.models import RestoreTest
from tests.helpers import mails, rebinding
from watching import channels
from watching.models import Alert, AlertChannel, ChannelDelivery
from watching.monitor import run_once

SLACK = "https://hooks.slack.com/services/T0A1B2C3D/B0A1B2C3D/abcdefghijklmnopqrstuvwx"
TEAMS = (
    "https://prod-01.westus.logic.azure.com:443/workflows/643e69f83c8944438d68119179a10a64/triggers/manual/paths/"
    "invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=KODuebWbDGYFr0z0eu-6Rj8aUKz7108W3wrNJZxFE5A"
)
TELEGRAM = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw1"
DISCORD = (
    "https://discord.com/api/webhooks/123456789012345678/"
    "Zq8cXkWJ3sV0r2tDgGkLqYbN5mHcP7aE1uF9iO4pR6sT2vW8xY0zA3bC5dE7fG9h"
)
WEBHOOK_TOKEN = "tok-Secret-31337-abcdef"


class Sink:
    """A real HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it, answering `status`
    (and `location`, when set), and every path it is asked to GET."""

    def __init__(self, status=200):
        self.status, self.location, self.received, self.gets = status, None, [], []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                sink.received.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
                self.send_response(sink.status)
                if sink.location:
                    self.send_header("Location", sink.location)
                self.end_headers()

            def do_GET(self):
                sink.gets.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"type": "secret-internal-document"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/hook"):
        return f"http://127.0.0.1:{self.port}{path}?token={WEBHOOK_TOKEN}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


@pytest.fixture
def broken_sink():
    s = Sink(status=500)
    yield s
    s.close()


def channel(name, url, **fields):
    """A JSON webhook channel; of the restore test alerts unless told (the calendar's overdue tasks
    of a new portal alert too)."""
    fields.setdefault("conditions", ["restore_test_failed"])
    made = AlertChannel(name=name, kind=fields.pop("kind", "webhook"), **fields)
    made.secret = url
    made.save()
    return made


def fail_restore_test(server):
    return RestoreTest.objects.create(server=server, status="failed", error="boom", finished_at=timezone.now())


def pass_restore_test(server):
    return RestoreTest.objects.create(
        server=server, status="passed", started_at=timezone.now() + timedelta(seconds=1), finished_at=timezone.now()
    )


def bodies(sink):
    return [r["body"] for r in sink.received]


def test_an_alert_reaches_the_webhook_once_and_its_resolution_once(catalog_server, smtp_server, sink):
    channel("ops webhook", sink.url())
    fail_restore_test(catalog_server)
    run_once()
    run_once()  # the alert still holds: nothing more is sent
    alert = Alert.objects.get(condition="restore_test_failed")
    [opened] = bodies(sink)
    assert opened["title"] == "[backupportal] maldives: Restore test failure"
    assert "Restore test #" in opened["message"] and "boom" in opened["message"]
    assert opened["event"] == "opened" and opened["alert_id"] == str(alert.pk)
    assert opened["condition"] == "restore_test_failed" and opened["server"] == "maldives"
    assert opened["url"] == f"https://backups.reliabilitymaldives.com/alerts/{alert.pk}/"
    assert opened["type"] == "failure"
    # The URL's own query reaches the sink as query: a token in it works as the receiver expects.
    assert sink.received[0]["path"] == f"/hook?token={WEBHOOK_TOKEN}"

    pass_restore_test(catalog_server)
    run_once()
    run_once()
    [_, resolved] = bodies(sink)
    assert resolved["title"] == "[backupportal] RESOLVED maldives: Restore test failure"
    assert resolved["event"] == "resolved" and resolved["type"] == "success" and resolved["resolved_at"]
    assert [m["Subject"] for m in mails(smtp_server)] == [
        "[backupportal] maldives: Restore test failure",
        "[backupportal] RESOLVED maldives: Restore test failure",
    ]
    assert JournalEntry.objects.filter(action="alert_channel_sent", object_id=str(alert.pk)).count() == 2
    assert AlertChannel.objects.get().status == "ok"


def test_an_alert_that_opens_and_resolves_between_two_sends_still_gets_both_in_order(catalog_server, sink):
    channel("ops webhook", sink.url())
    fail_restore_test(catalog_server)
    from watching.monitor import check_restore_tests

    check_restore_tests(catalog_server)  # a writer's own check, between two passes
    pass_restore_test(catalog_server)
    check_restore_tests(catalog_server)
    run_once()
    assert [b["event"] for b in bodies(sink)] == ["opened", "resolved"]


def test_a_failing_channel_is_retried_with_backoff_and_stops_neither_the_mail_nor_the_others(
    catalog_server, smtp_server, sink, broken_sink, client, sam
):
    channel("a broken receiver", broken_sink.url())
    channel("b nobody listens", f"http://127.0.0.1:{free_port()}/hook?token={WEBHOOK_TOKEN}")
    channel("c ops webhook", sink.url())
    fail_restore_test(catalog_server)
    result = run_once()
    assert result["channels"]["sent"] == 1 and result["channels"]["failed"] == 2
    assert [m["Subject"] for m in mails(smtp_server)] == ["[backupportal] maldives: Restore test failure"]
    assert len(sink.received) == 1 and len(broken_sink.received) == 1

    broken = AlertChannel.objects.get(name="a broken receiver")
    nobody = AlertChannel.objects.get(name="b nobody listens")
    assert broken.status == "failing" and "500" in broken.last_error
    assert nobody.status == "failing" and nobody.last_error
    delivery = ChannelDelivery.objects.get(channel=broken)
    assert delivery.sent_at is None and delivery.attempts == 1
    assert timedelta(seconds=50) < delivery.next_attempt_at - timezone.now() <= timedelta(minutes=1)

    run_once()  # before the backoff is over: not tried again
    assert len(broken_sink.received) == 1
    with time_machine.travel(timezone.now() + timedelta(minutes=2)):
        run_once()
    assert len(broken_sink.received) == 2
    delivery.refresh_from_db()
    assert delivery.attempts == 2, delivery.last_error
    assert timedelta(minutes=1) < delivery.next_attempt_at - timezone.now() <= timedelta(minutes=4)
    # The error is journaled once, not on every retry.
    assert JournalEntry.objects.filter(action="alert_channel_failed", details__channel=broken.name).count() == 1

    # Shown to the Sysadmin: status and error, never the secret.
    client.force_login(sam)
    page = client.get(reverse("admin:watching_alertchannel_changelist")).content.decode()
    assert "failing" in page and "500" in page and WEBHOOK_TOKEN not in page
    alert_page = client.get(reverse("alert", args=[delivery.alert_id])).content.decode()
    assert "a broken receiver" in alert_page and "error=500" in alert_page and WEBHOOK_TOKEN not in alert_page

    broken_sink.status = 200  # back: the owed message goes, once
    with time_machine.travel(timezone.now() + timedelta(minutes=10)):
        run_once()
        run_once()
    assert len(broken_sink.received) == 3 and bodies(broken_sink)[-1]["event"] == "opened"
    broken.refresh_from_db()
    assert broken.status == "ok" and broken.failures == 0
    assert len(sink.received) == 1  # the good channel was never sent anything twice


def test_a_channel_receives_only_its_conditions_and_servers(catalog_server, sink, db):
    other = Server.objects.create(name="addu", dsn="postgresql://postgres@127.0.0.1:1/addu")
    channel("restore tests of maldives", sink.url("/maldives"), conditions=["restore_test_failed"]).servers.add(
        catalog_server
    )
    channel("failed backups only", sink.url("/backups"), conditions=["backup_failed"])
    fail_restore_test(catalog_server)
    fail_restore_test(other)
    run_once()
    assert sorted((r["path"].split("?")[0], r["body"]["server"]) for r in sink.received) == [("/maldives", "maldives")]


def test_a_disabled_channel_is_sent_nothing(catalog_server, sink):
    channel("ops webhook", sink.url(), enabled=False)
    fail_restore_test(catalog_server)
    run_once()
    assert sink.received == []


# --- Settings: checked for their form, secrets write-only ------------------------------------


def form(**fields):
    data = {"name": "team", "kind": "webhook", "enabled": "on", "target": "", "new_secret": ""}
    return data | fields


@pytest.mark.parametrize(
    "kind,secret,target,hint",
    [
        ("slack", SLACK, "#dba-alerts", "https://hooks.slack.com/services/T0A1B2C3D/B0A1B2C3D/*** #dba-alerts"),
        ("teams", TEAMS, "", "https://prod-01.westus.logic.azure.com/workflows/***"),
        ("telegram", TELEGRAM, "-1001234567890", "bot 123456789:*** to -1001234567890"),
        ("discord", DISCORD, "", "https://discord.com/api/webhooks/123456789012345678/***"),
        ("webhook", f"https://hooks.example.mv/x?token={WEBHOOK_TOKEN}", "", "https://hooks.example.mv/***"),
    ],
)
def test_a_sysadmin_adds_each_kind_and_never_sees_its_secret_again(client, sam, kind, secret, target, hint):
    client.force_login(sam)
    response = client.post(
        reverse("admin:watching_alertchannel_add"), form(kind=kind, target=target, new_secret=secret)
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    made = AlertChannel.objects.get()
    assert made.secret == secret and made.secret_hint == hint and secret not in made.secret_sealed
    pages = [
        client.get(reverse("admin:watching_alertchannel_change", args=[made.pk])).content.decode(),
        client.get(reverse("admin:watching_alertchannel_changelist")).content.decode(),
        client.get(reverse("admin:backupportal_journalentry_changelist")).content.decode(),
    ]
    secret_part = secret.rsplit("/", 1)[-1].split("sig=")[-1].split("token=")[-1]
    for page in pages:
        assert secret_part not in page
    assert hint.split("***")[0] in pages[0]
    assert not any(secret_part in str(e.details) for e in JournalEntry.objects.all())

    # Another target with the stored secret kept: checked against it, the secret unchanged.
    if kind in ("slack", "telegram"):
        new_target = "#ops" if kind == "slack" else "@reliabilityops"
        response = client.post(
            reverse("admin:watching_alertchannel_change", args=[made.pk]), form(kind=kind, target=new_target)
        )
        assert response.status_code == 302
        made.refresh_from_db()
        assert made.target == new_target and made.secret == secret


@pytest.mark.parametrize(
    "kind,secret,target,says",
    [
        ("slack", "https://hooks.slack.com/services/T0A1B2C3D/short", "", "not a Slack incoming webhook URL"),
        ("slack", "https://evil.example.com/services/T0A1B2C3D/B0A1B2C3D/abcdefghijklmnopqrstuvwx", "", "Slack"),
        ("slack", SLACK, "dba alerts", "Slack channel"),
        ("teams", TEAMS.split("&sig=")[0], "", "workflow URL with its sig"),
        ("telegram", "123456789:short", "-1001234567890", "not a Telegram bot token"),
        ("telegram", TELEGRAM, "", "Telegram needs a chat"),
        ("discord", DISCORD.replace("discord.com", "discord.example.com"), "", "not a Discord webhook URL"),
        ("webhook", "ftp://127.0.0.1/hook", "", "not an http(s) URL"),
        ("webhook", "", "", "Give the secret"),
    ],
)
def test_malformed_settings_are_refused_with_one_line_saying_what_to_give(client, sam, kind, secret, target, says):
    client.force_login(sam)
    response = client.post(
        reverse("admin:watching_alertchannel_add"), form(kind=kind, target=target, new_secret=secret)
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.non_field_errors()
    assert len(errors) == 1 and says in errors[0] and "\n" not in errors[0]
    assert not AlertChannel.objects.exists()


def test_a_server_id_too_big_for_the_database_is_a_form_error(client, sam, sink):
    client.force_login(sam)
    data = form(new_secret=sink.url()) | {"servers": ["9" * 30]}
    response = client.post(reverse("admin:watching_alertchannel_add"), data)
    assert response.status_code == 200 and "is not a valid value" in response.content.decode()


def test_changing_the_kind_needs_the_secret_again(client, sam, sink):
    made = channel("team", sink.url())
    client.force_login(sam)
    response = client.post(reverse("admin:watching_alertchannel_change", args=[made.pk]), form(kind="discord"))
    assert "give the secret for the new kind" in response.content.decode()


def test_only_a_sysadmin_edits_channels(client, alice, charlie, sink):
    made = channel("team", sink.url())
    for user in (alice, charlie):
        client.force_login(user)
        assert client.post(reverse("admin:watching_alertchannel_add"), form(new_secret=sink.url())).status_code == 403
        page = client.get(reverse("admin:watching_alertchannel_change", args=[made.pk]))
        assert WEBHOOK_TOKEN not in page.content.decode()


def test_apprise_logs_no_secret(catalog_server, broken_sink, caplog):
    caplog.set_level(logging.DEBUG)
    channel("broken", broken_sink.url())
    fail_restore_test(catalog_server)
    run_once()
    assert broken_sink.received and WEBHOOK_TOKEN not in caplog.text
    assert WEBHOOK_TOKEN not in AlertChannel.objects.get().last_error


def test_a_sysadmin_sends_a_test_message_and_sees_how_it_went(client, sam, sink, broken_sink):
    good, bad = channel("ops webhook", sink.url()), channel("broken", broken_sink.url())
    client.force_login(sam)
    url = reverse("admin:watching_alertchannel_changelist")
    response = client.post(url, {"action": "send_test", "_selected_action": [good.pk, bad.pk]}, follow=True)
    page = response.content.decode()
    assert "Ops webhook: the test message was sent." in page  # the admin capitalises its messages
    assert "Broken: the test message failed: " in page and "error=500" in page and WEBHOOK_TOKEN not in page
    [test] = bodies(sink)
    assert test["event"] == "test" and test["title"] == "[backupportal] test message to ops webhook"
    tested = JournalEntry.objects.filter(action="alert_channel_tested")
    assert sorted((e.object_repr, e.outcome) for e in tested) == [
        ("broken (JSON webhook)", "failed"),
        ("ops webhook (JSON webhook)", "ok"),
    ]


# --- Where a channel may send: not inside the portal's network --------------------------------


def test_a_webhook_to_127_0_0_1_is_refused_unless_the_setting_lists_it(client, sam, sink, settings, catalog_server):
    settings.ALERT_CHANNEL_ALLOWED_HOSTS = []
    refusal = (
        "refused: 127.0.0.1 resolves to 127.0.0.1, a loopback address; "
        "list 127.0.0.1 in ALERT_CHANNEL_ALLOWED_HOSTS to allow it"
    )
    client.force_login(sam)
    response = client.post(reverse("admin:watching_alertchannel_add"), form(new_secret=sink.url()))
    assert response.status_code == 200
    assert response.context["adminform"].form.non_field_errors() == [refusal]

    # Saved while the setting listed it: refused at send time, nothing reaches the sink.
    made = channel("ops webhook", sink.url())
    fail_restore_test(catalog_server)
    run_once()
    assert sink.received == []
    made.refresh_from_db()
    assert made.status == "failing" and made.last_error == refusal
    client.post(
        reverse("admin:watching_alertchannel_changelist"), {"action": "send_test", "_selected_action": [made.pk]}
    )
    assert sink.received == [] and JournalEntry.objects.get(action="alert_channel_tested").details["error"] == refusal

    for listed in (["127.0.0.1"], ["127.0.0.0/8"]):
        settings.ALERT_CHANNEL_ALLOWED_HOSTS = listed
        page = client.post(
            reverse("admin:watching_alertchannel_changelist"),
            {"action": "send_test", "_selected_action": [made.pk]},
            follow=True,
        )
        assert "the test message was sent" in page.content.decode()
    assert [b["event"] for b in bodies(sink)] == ["test", "test"]


@pytest.mark.parametrize(
    "url,address,what",
    [
        ("http://169.254.169.254/latest/meta-data/iam/", "169.254.169.254", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/", "fd00:ec2::254", "cloud metadata"),
        ("http://[::ffff:169.254.169.254]/latest/", "169.254.169.254", "cloud metadata"),
        ("http://169.254.10.1:8080/", "169.254.10.1", "link-local"),
        ("http://[fe80::1]:6379/", "fe80::1", "link-local"),
        ("http://2130706433:6379/", "127.0.0.1", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "127.0.0.1", "loopback"),
        ("http://[::1]:5432/", "::1", "loopback"),
        ("http://0.0.0.0:6379/", "0.0.0.0", "unspecified"),
        ("http://224.0.0.1/", "224.0.0.1", "multicast"),
        ("http://10.20.0.5:8065/hooks/x", "10.20.0.5", "private"),
        ("http://192.168.1.10/", "192.168.1.10", "private"),
    ],
)
def test_addresses_inside_the_network_are_refused_with_one_line_naming_them(client, sam, settings, url, address, what):
    settings.ALERT_CHANNEL_ALLOWED_HOSTS = []
    client.force_login(sam)
    response = client.post(reverse("admin:watching_alertchannel_add"), form(new_secret=url))
    [error] = response.context["adminform"].form.non_field_errors()
    assert error.startswith("refused: ") and f"resolves to {address}, a {what} address" in error and "\n" not in error
    assert ("ALERT_CHANNEL_ALLOWED_HOSTS" in error) == (what != "cloud metadata")
    assert not AlertChannel.objects.exists()


def test_a_listed_private_network_is_allowed_and_the_metadata_address_never(client, sam, settings):
    settings.ALERT_CHANNEL_ALLOWED_HOSTS = ["10.20.0.0/16", "169.254.169.254", "169.254.0.0/16"]
    client.force_login(sam)
    add = reverse("admin:watching_alertchannel_add")
    assert client.post(add, form(name="mattermost", new_secret="http://10.20.0.5:8065/hooks/x")).status_code == 302
    response = client.post(add, form(name="imds", new_secret="http://169.254.169.254/latest/meta-data/"))
    assert response.context["adminform"].form.non_field_errors() == [
        "refused: 169.254.169.254 resolves to 169.254.169.254, a cloud metadata address, which no channel may reach"
    ]
    made = channel("imds", "http://169.254.169.254/latest/meta-data/")  # stored some other way: never sent
    assert channels.send_test(made, actor="sam").startswith("refused: 169.254.169.254")


def test_a_name_that_resolves_inside_the_network_after_the_check_is_not_connected_to(db, sink, settings, monkeypatch):
    """DNS rebinding: the check sees a public address, the connection a moment later would see 127.0.0.1."""
    settings.ALERT_CHANNEL_ALLOWED_HOSTS = []
    rebinding(monkeypatch, "hooks.rebind.example")
    made = channel("rebinding", f"http://hooks.rebind.example:{sink.port}/hook?token={WEBHOOK_TOKEN}")
    error = channels.send_test(made, actor="sam")
    assert sink.received == []
    assert error == "could not reach hooks.rebind.example: no answer, connection refused or name not found"


def test_a_redirect_from_the_receiver_is_not_followed_and_its_status_is_shown(client, sam, sink):
    elsewhere = Sink()
    try:
        sink.status, sink.location = 302, f"http://127.0.0.1:{elsewhere.port}/internal?x=1"
        made = channel("redirecting", sink.url())
        client.force_login(sam)
        page = client.post(
            reverse("admin:watching_alertchannel_changelist"),
            {"action": "send_test", "_selected_action": [made.pk]},
            follow=True,
        ).content.decode()
        assert len(sink.received) == 1
        assert elsewhere.gets == [] and elsewhere.received == []
        assert "Redirecting: the test message failed: " in page and "error=302" in page
    finally:
        elsewhere.close()


def test_closed_ports_and_other_connection_failures_read_alike(db, sink):
    """A port scan through "Send a test message" learns nothing but whether an HTTP server answers."""
    talker = socket.socket()
    talker.bind(("127.0.0.1", 0))
    talker.listen()

    def talk():  # an open port that is no web server, as Redis would answer
        while True:
            try:
                conn, _ = talker.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"-ERR unknown command\r\n")
            conn.close()

    threading.Thread(target=talk, daemon=True).start()
    try:
        closed = channel("closed", f"http://127.0.0.1:{free_port()}/hook")
        not_http = channel("not http", f"http://127.0.0.1:{talker.getsockname()[1]}/hook")
        tls_to_plain = channel("tls to plain http", f"https://127.0.0.1:{sink.port}/hook")
        nowhere = channel("nowhere", "http://hooks.does-not-resolve.invalid/hook")
        errors = {channels.send_test(c, actor="sam") for c in (closed, not_http, tls_to_plain)}
        assert errors == {"could not reach 127.0.0.1: no answer, connection refused or name not found"}
        assert channels.send_test(nowhere, actor="sam") == (
            "could not reach hooks.does-not-resolve.invalid: no answer, connection refused or name not found"
        )
    finally:
        talker.close()


# --- Teams: the workflow URL's query never becomes Apprise's options ----------------------------


def test_a_teams_url_is_sent_without_the_apprise_options_in_its_query(sink, client, sam):
    template = f"http://127.0.0.1:{sink.port}/card.json"
    evil = f"{TEAMS}&template={template}&verify=no&redirect=yes&wrap=no&image=no&pa=yes&route=1"
    url = channels.apprise_url("teams", "", evil)
    assert url == (
        "workflows://prod-01.westus.logic.azure.com/643e69f83c8944438d68119179a10a64/"
        "KODuebWbDGYFr0z0eu-6Rj8aUKz7108W3wrNJZxFE5A/?pa=no&ver=2016-06-01"
    )
    plugin = channels.plugin_for("teams", "", evil)
    assert plugin.verify_certificate is True and plugin.redirects is False and len(plugin.template) == 0
    assert plugin.include_image and plugin.wrap and not plugin.power_automate and plugin.routing_id is None

    for extra in (f"&template={template}", "&template=file:///etc/passwd", "&verify=no"):
        client.force_login(sam)
        response = client.post(
            reverse("admin:watching_alertchannel_add"),
            form(name="teams" + extra, kind="teams", new_secret=TEAMS + extra),
        )
        assert response.status_code == 302
    for made in AlertChannel.objects.all():
        channels.send_test(made, actor="sam")  # Microsoft cannot be reached from here; nothing is fetched first
    assert sink.gets == []


def test_a_power_automate_url_keeps_its_route_and_version():
    url = (
        "https://default0a1b.2c.environment.api.powerplatform.com/powerautomate/automations/direct/cu/42/workflows/"
        "abc123/triggers/manual/paths/invoke?api-version=2022-03-01-preview&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0"
        "&sig=KODuebWbDGYFr0z0eu-6Rj8aUKz7108W3wrNJZxFE5A"
    )
    plugin = channels.plugin_for("teams", "", url)
    assert plugin.power_automate and plugin.routing_id == "42" and plugin.api_version == "2022-03-01-preview"
    assert plugin.workflow == "abc123" and plugin.signature == "KODuebWbDGYFr0z0eu-6Rj8aUKz7108W3wrNJZxFE5A"
