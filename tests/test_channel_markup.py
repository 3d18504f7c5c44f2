"""Alert channels show a database's name as it is named, never as markup: whoever may CREATE
DATABASE on a monitored cluster chooses the name, and it reaches the channels in the alert's
message. A database named "[x](http://evil.example) **b** <at>bob</at> <!here> @here" is no link in
Teams or Discord, no mention anywhere, no formatting in Slack or Telegram.

Slack, Teams, Telegram and Discord are reached over HTTPS at their own names: here those names
resolve to a TLS server on 127.0.0.1 whose certificate a CA made for the test signs, as a
company proxy's would be (REQUESTS_CA_BUNDLE), and the posted JSON is read as the service would
read it. Apprise and requests run as in production; only the name lookup is the test's."""

import datetime
import ipaddress
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backups.models import Database, Server
from watching import channels
from watching.models import AlertChannel
from watching.monitor import check_databases

SLACK = "https://hooks.slack.com/services/T0A1B2C3D/B0A1B2C3D/abcdefghijklmnopqrstuvwx"
TEAMS_HOST = "prod-01.westus.logic.azure.com"
TEAMS = (
    f"https://{TEAMS_HOST}:443/workflows/643e69f83c8944438d68119179a10a64/triggers/manual/paths/"
    "invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=KODuebWbDGYFr0z0eu-6Rj8aUKz7108W3wrNJZxFE5A"
)
TELEGRAM = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw1"
DISCORD = (
    "https://discord.com/api/webhooks/123456789012345678/"
    "Zq8cXkWJ3sV0r2tDgGkLqYbN5mHcP7aE1uF9iO4pR6sT2vW8xY0zA3bC5dE7fG9h"
)
SERVICE_HOSTS = {"hooks.slack.com", TEAMS_HOST, "api.telegram.org", "discord.com"}

# 57 characters: PostgreSQL allows 63.
EVIL = "[x](http://evil.example) **b** <at>bob</at> <!here> @here"
# Each character of Markdown's markup after a backslash: shown as typed, read as no markup.
EVIL_IN_MARKDOWN = r"\[x\](http://evil.example) \*\*b\*\* \<at\>bob\</at\> \<!here\> @here"
EVIL_IN_DISCORD = EVIL_IN_MARKDOWN.replace("@", "@\u200b")


def _certificate(subject, issuer, public_key, signing_key, *, ca, names=()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:  # and 127.0.0.1, for a JSON webhook sent to it by address
        alternatives = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


class ServiceSink:
    """A TLS server on 127.0.0.1 answering for Slack, Teams, Telegram and Discord: it keeps each
    JSON body posted to it by the first part of its path, and answers as each service does."""

    def __init__(self, directory):
        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("test CA", "test CA", ca_key.public_key(), ca_key, ca=True)
        leaf = _certificate("services", "test CA", key.public_key(), ca_key, ca=False, names=sorted(SERVICE_HOSTS))
        self.ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.received = {}
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                service = self.path.strip("/").split("/")[0]  # services, workflows, bot..., api
                sink.received.setdefault(service, []).append(json.loads(self.rfile.read(length)))
                answer = b"ok" if service == "services" else b'{"ok": true}'  # Slack's webhooks answer "ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def only(self, service):
        [body] = self.received[service]
        return body

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def services(tmp_path, monkeypatch):
    """The services' names resolve to the sink, and their HTTPS port is the sink's: for Teams the
    connection guard connects to the address it checked (127.0.0.1) on port 443."""
    sink = ServiceSink(tmp_path)
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host in SERVICE_HOSTS or (host == "127.0.0.1" and port == 443):
            address = ("127.0.0.1", sink.port if port in (443, "443", "https") else (port or 0))
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sink.ca_file))
    yield sink
    sink.close()


def make_channel(kind, secret, target="", name=None):
    made = AlertChannel(name=name or kind, kind=kind, target=target)
    made.secret = secret
    made.save()
    return made


def alert_on_database_named(name):
    """What the monitor raises for a database it found and cannot back up."""
    server = Server.objects.create(name="maldives", dsn="postgresql://postgres@127.0.0.1:1/maldives")
    Database.objects.create(server=server, name=name, state=Database.State.UNREACHABLE, problem="no CONNECT")
    check_databases(server)


def _teams_text(posted, block_id):
    return next(b["text"] for b in posted["attachments"][0]["content"]["body"] if b.get("id") == block_id)


# How each kind's service reads a message (its title and text), and the evil name as it must arrive.
KINDS = {
    # An Adaptive Card, whose text is Markdown; "<at>bob</at>" would be made a mention of bob.
    "teams": (TEAMS, "", "workflows", lambda posted: _teams_text(posted, "body"), EVIL_IN_MARKDOWN),
    # Plain text with its &, < and > escaped: no <!here> mention, no <url|link>.
    "slack": (
        SLACK,
        "",
        "services",
        lambda posted: posted["attachments"][0]["text"],
        "[x](http://evil.example) **b** &lt;at&gt;bob&lt;/at&gt; &lt;!here&gt; @here",
    ),
    # HTML: escaped.
    "telegram": (
        TELEGRAM,
        "-1001234567890",
        f"bot{TELEGRAM}",
        lambda posted: posted["text"],
        "[x](http://evil.example) **b** &lt;at&gt;bob&lt;/at&gt; &lt;!here&gt; @here",
    ),
    # Markdown, and @here pings wherever it stands: a zero-width space breaks it.
    "discord": (DISCORD, "", "api", lambda posted: posted["content"], EVIL_IN_DISCORD),
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_database_named_as_markup_reaches_the_channel_as_its_name(services, db, kind):
    secret, target, service, text_of, shown = KINDS[kind]
    make_channel(kind, secret, target)
    # A JSON webhook's receiver decides how to show the text: it gets the name exactly as it is.
    make_channel("webhook", f"https://127.0.0.1:{services.port}/hook", name="ops webhook")
    alert_on_database_named(EVIL)
    assert channels.send_due() == {"sent": 2, "failed": 0, "errors": []}

    assert f"database {shown} on maldives cannot be backed up: no CONNECT" in text_of(services.only(service))
    if kind == "teams":
        assert "entities" not in services.only(service)["attachments"][0]["content"]["msteams"]  # no mention
    assert services.only("hook")["message"].startswith(f"database {EVIL} on maldives cannot be backed up")


CHANNEL_NAME = "**ops** <at>bob</at> [x](http://evil.example)"


@pytest.mark.parametrize(
    "kind,title_of,title",
    [
        (
            "teams",
            lambda posted: _teams_text(posted, "title"),
            r"[backupportal] test message to \*\*ops\*\* \<at\>bob\</at\> \[x\](http://evil.example)",
        ),
        (
            "telegram",
            lambda posted: posted["text"].split("\r\n")[0],
            "<b>[backupportal] test message to **ops** &lt;at&gt;bob&lt;/at&gt; [x](http://evil.example)</b>",
        ),
        (
            "discord",
            lambda posted: posted["content"].split("\r\n")[0],
            r"[backupportal] test message to \*\*ops\*\* \<at\>bob\</at\> \[x\](http://evil.example)",
        ),
    ],
)
def test_a_channel_named_as_markup_is_named_literally_in_its_test_message(services, db, kind, title_of, title):
    """The channel's name is in the title, which Apprise sends to Teams, Telegram and Discord as it is."""
    secret, target, service, _, _ = KINDS[kind]
    made = make_channel(kind, secret, target, name=CHANNEL_NAME)
    assert channels.send_test(made, actor="sam") == ""
    assert title_of(services.only(service)) == title


def test_a_name_on_lines_of_its_own_cannot_start_a_heading_a_quote_or_a_list():
    """A database name may hold line breaks: what would start a block on its own line is escaped."""
    from watching.channels import Kind, literal

    name = "ok\n# Heading\n> quote\n- item\n12. item\n  + item"
    assert literal(Kind.TEAMS, name) == "ok\n\\# Heading\n\\> quote\n\\- item\n12\\. item\n  \\+ item"
    assert literal(Kind.TEAMS, "v1.2 (main) - ok!") == "v1.2 (main) - ok!"  # nothing that escapes nothing
