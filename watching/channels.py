"""Alert messages to the channels beyond email, through Apprise, with the rules of the mail.

An alert owes each channel that receives it one message when it opens and one when it
resolves (`owe`, called by watching/alerts.py where the alert is opened or resolved). The
monitor pass sends what is due (`send_due`), after the mail and never before it: each message
on its own, each failure kept on its delivery and its channel (without the secret) and retried
with backoff. A channel that fails is skipped for the rest of the pass, so a dead one costs one
timeout and never holds up the others or the mail.

Each kind's secret is checked for its form before it is stored (`check_settings`): the fixed
hosts (Slack, Telegram, Discord, Microsoft) cannot be reached from every portal, so a typo must
be caught when it is typed.

Whoever edits a channel chooses where the portal's worker sends an HTTP request, so the Apprise
URL is rebuilt from the checked parts only (never the user's own Apprise options), TLS is always
verified, redirects are never followed, and a host the user names (a JSON webhook's, a Teams
workflow's) may not be an address inside the portal's network unless ALERT_CHANNEL_ALLOWED_HOSTS
lists it: checked when the channel is saved, before each message, and again on every connection
(backupportal.lib.addresses), so a name that resolves elsewhere a moment later gains nothing.

A database's name in a message shows as typed in every kind's markup, never as a link or a
mention (`literal`, `FORMATS`).
"""

import html
import logging
import re
from datetime import timedelta
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import apprise
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone

from backupportal import journal
from backupportal.lib import addresses
from backupportal.lib.redact import redact
from backupportal.lib.sealed import SealError
from watching.channel_models import AlertChannel, ChannelDelivery

log = logging.getLogger(__name__)
Kind = AlertChannel.Kind

# Each attempt waits at most this long to connect and to read: one dead channel costs seconds.
CONNECT_TIMEOUT, READ_TIMEOUT = 4, 10
# A failed message is tried again after 1, 2, 4 ... minutes, never more than an hour apart.
FIRST_RETRY, LONGEST_RETRY = timedelta(minutes=1), timedelta(hours=1)

SLACK_URL = re.compile(r"^https://hooks\.slack\.com/services/(T[A-Z0-9]{4,})/(B[A-Z0-9]{4,})/([A-Za-z0-9]{16,})$")
SLACK_CHANNEL = re.compile(r"^#[a-z0-9][a-z0-9._-]{0,79}$")
TEAMS_URL = re.compile(
    r"^https://(?P<host>[A-Za-z0-9.-]+\.(?:logic\.azure\.com|powerplatform\.com|powerautomate\.com))(?::443)?"
    r"(?P<pa>/powerautomate/automations/direct(?:/cu/(?P<route>[0-9]+))?)?/workflows/(?P<workflow>[A-Za-z0-9_-]+)"
    r"/triggers/manual/paths/invoke/?\?(?P<query>.+)$"
)
TEAMS_SIG = re.compile(r"^[A-Za-z0-9_-]{16,}$")
TEAMS_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(?:-preview)?$")
TELEGRAM_TOKEN = re.compile(r"^(\d{5,12}):([A-Za-z0-9_-]{30,})$")
TELEGRAM_CHAT = re.compile(r"^(-?\d{5,20}|@[A-Za-z][A-Za-z0-9_]{4,31})$")
DISCORD_URL = re.compile(r"^https://(?:discord\.com|discordapp\.com)/api/webhooks/(\d{15,25})/([A-Za-z0-9_-]{50,100})$")

SECRET_HELP = {
    Kind.SLACK: "the incoming webhook URL, https://hooks.slack.com/services/T.../B.../...",
    Kind.TEAMS: "the Power Automate workflow URL (https://...logic.azure.com/workflows/.../invoke?...&sig=...)",
    Kind.TELEGRAM: "the bot token from @BotFather, 123456789:AA...",
    Kind.DISCORD: "the webhook URL, https://discord.com/api/webhooks/ID/TOKEN",
    Kind.WEBHOOK: "the URL to POST JSON to, http(s)://host[:port]/path[?token=...]",
}


def check_settings(kind, target, secret):
    """The hint to show for a channel's secret; ValidationError naming what to change otherwise."""
    kind = Kind(kind)
    hint = _HINTS[kind](secret, target)
    if plugin_for(kind, target, secret) is None:
        raise ValidationError(f"Apprise does not accept these {kind.label} settings: check {SECRET_HELP[kind]}.")
    # A name that does not resolve from here is let through: it is checked again before every message.
    refusal = _host_refusal(user_host(kind, secret))
    if refusal:
        raise ValidationError(refusal)
    return hint


def _wrong(kind, what):
    return ValidationError(f"{what}: give {SECRET_HELP[kind]}.")


def _slack_hint(secret, target):
    match = SLACK_URL.match(secret)
    if not match:
        raise _wrong(Kind.SLACK, "This is not a Slack incoming webhook URL")
    if target and not SLACK_CHANNEL.match(target):
        raise ValidationError(f"Slack channel {target!r}: give #name in lower case, or leave it empty.")
    return f"https://hooks.slack.com/services/{match[1]}/{match[2]}/***" + (f" {target}" if target else "")


def _teams_hint(secret, target):
    match = TEAMS_URL.match(secret)
    if not match or not _teams_query(match):
        raise _wrong(Kind.TEAMS, "This is not a Power Automate workflow URL with its sig")
    if target:
        raise ValidationError("A Teams channel takes no target: the workflow decides where the message goes.")
    return f"https://{match['host']}/workflows/***"


def _telegram_hint(secret, target):
    match = TELEGRAM_TOKEN.match(secret)
    if not match:
        raise _wrong(Kind.TELEGRAM, "This is not a Telegram bot token")
    if not TELEGRAM_CHAT.match(target or ""):
        raise ValidationError("Telegram needs a chat: give its numeric id (-100...) or @channelname as the target.")
    return f"bot {match[1]}:*** to {target}"


def _discord_hint(secret, target):
    match = DISCORD_URL.match(secret)
    if not match:
        raise _wrong(Kind.DISCORD, "This is not a Discord webhook URL")
    if target:
        raise ValidationError("A Discord channel takes no target: the webhook decides where the message goes.")
    return f"https://discord.com/api/webhooks/{match[1]}/***"


def _webhook_hint(secret, target):
    parts = urlsplit(secret)
    try:
        port = parts.port
    except ValueError:
        port = None
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise _wrong(Kind.WEBHOOK, "This is not an http(s) URL")
    if target:
        raise ValidationError("A JSON webhook takes no target: everything is in its URL.")
    return f"{parts.scheme}://{parts.hostname}{f':{port}' if port else ''}/***"


_HINTS = {
    Kind.SLACK: _slack_hint,
    Kind.TEAMS: _teams_hint,
    Kind.TELEGRAM: _telegram_hint,
    Kind.DISCORD: _discord_hint,
    Kind.WEBHOOK: _webhook_hint,
}


def apprise_url(kind, target, secret, extras=None):
    """The Apprise URL of a channel, built from the checked parts of its settings only: nothing the
    user typed becomes an Apprise option. `extras` become fields of a JSON webhook's payload."""
    if kind == Kind.SLACK:
        tokens = SLACK_URL.match(secret)
        return "slack://{}/{}/{}".format(*tokens.groups()) + (f"/{quote(target)}" if target else "")
    if kind == Kind.TELEGRAM:
        return "tgram://{}:{}/{}".format(*TELEGRAM_TOKEN.match(secret).groups(), target)
    if kind == Kind.DISCORD:
        return "discord://{}/{}".format(*DISCORD_URL.match(secret).groups())
    if kind == Kind.TEAMS:
        return _teams_url(secret)
    return _json_url(secret, extras or {})


def _teams_query(match):
    """The sig and api-version of a workflow URL's query, checked; {} when its sig is missing or odd."""
    query = dict(parse_qsl(match["query"]))
    if not TEAMS_SIG.match(query.get("sig", "")):
        return {}
    version = query.get("api-version", "")
    return {"sig": query["sig"], "ver": version if TEAMS_API_VERSION.match(version) else ""}


def _teams_url(secret):
    """workflows://host/workflow/sig: the rest of the workflow URL's query (template=, verify=, ...) would be
    Apprise's own options, so it is dropped; Apprise adds the fixed sp and sv itself."""
    match = TEAMS_URL.match(secret)
    query = _teams_query(match)
    options = {"pa": "yes" if match["pa"] else "no", "route": match["route"] or "", "ver": query["ver"]}
    options = urlencode({k: v for k, v in options.items() if v})
    return f"workflows://{match['host'].lower()}/{match['workflow']}/{query['sig']}/?{options}"


def _json_url(url, extras):
    """json(s)://host/path: the URL's own query goes through as query (-name), extras into the payload (:name)."""
    parts = urlsplit(url)
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    if parts.username is not None:
        login = quote(unquote(parts.username), safe="")
        if parts.password is not None:
            login += ":" + quote(unquote(parts.password), safe="")
        netloc = f"{login}@{netloc}"
    query = [(f"-{k}", v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    query += [(f":{k}", str(v)) for k, v in extras.items()]
    scheme = "jsons" if parts.scheme == "https" else "json"
    return f"{scheme}://{netloc}{parts.path or '/'}" + (f"?{urlencode(query)}" if query else "")


def plugin_for(kind, target, secret, extras=None):
    """The channel's Apprise plugin, or None: certificates verified and redirects never followed,
    whatever the URL says (a redirect would take the request past the host check)."""
    plugin = apprise.Apprise.instantiate(
        apprise_url(kind, target, secret, extras), asset=apprise.AppriseAsset(http_redirects=False)
    )
    if plugin is not None:
        plugin.verify_certificate, plugin.redirects = True, False
        plugin.socket_connect_timeout, plugin.socket_read_timeout = CONNECT_TIMEOUT, READ_TIMEOUT
    return plugin


# --- Where a channel may send ------------------------------------------------------------------------

# A team whose Mattermost runs on 10.x lists that host (or its network) in ALERT_CHANNEL_ALLOWED_HOSTS
# (backupportal.lib.addresses says what is refused and why, and checks every connection).


def user_host(kind, secret):
    """The host a channel's user chose, or None for the services whose hosts are fixed."""
    if kind == Kind.WEBHOOK:
        return urlsplit(secret).hostname
    if kind == Kind.TEAMS:
        return TEAMS_URL.match(secret)["host"].lower()
    return None


CHANNEL_HOSTS = addresses.Policy("ALERT_CHANNEL_ALLOWED_HOSTS", "no channel")


def _resolve(host):
    return addresses.resolve(host)


def _host_refusal(host, resolved=None):
    """'' when `host` may be sent to; else one line naming it, its address and what to do."""
    return CHANNEL_HOSTS.refusal(host, resolved)


def _guarded(on):
    """While a channel is sent to, this thread connects only where the channel rules allow."""
    return addresses.guarding(CHANNEL_HOSTS if on else None)


# --- What alerts owe -----------------------------------------------------------------------------


def owe(alert, event):
    """Note the message `alert` now owes each channel: "opened" to every enabled channel that
    receives it, "resolved" to those that were owed its opening (a channel added meanwhile never
    hears of an end it did not hear begin)."""
    if event == ChannelDelivery.Event.OPENED:
        channels = [
            channel
            for channel in AlertChannel.objects.filter(enabled=True).prefetch_related("servers")
            if channel.receives(alert, {s.pk for s in channel.servers.all()})
        ]
    else:
        opened = ChannelDelivery.objects.filter(alert=alert, event=ChannelDelivery.Event.OPENED)
        channels = list(AlertChannel.objects.filter(pk__in=opened.values("channel_id")))
    ChannelDelivery.objects.bulk_create(
        [ChannelDelivery(alert=alert, channel=channel, event=event) for channel in channels], ignore_conflicts=True
    )


def send_due(now=None):
    """Send every message that is due. Returns {"sent", "failed", "errors": [one line per channel]}."""
    now = now or timezone.now()
    result = {"sent": 0, "failed": 0, "errors": []}
    failing = set()
    due = (
        ChannelDelivery.objects.filter(sent_at=None, next_attempt_at__lte=now, channel__enabled=True)
        .select_related("channel", "alert__server", "alert__location")
        .order_by("alert__opened_at", "alert_id", "event", "pk")
    )
    for delivery in due:
        if delivery.channel_id in failing or not _opening_sent(delivery):
            continue
        if not _claim(delivery, now):
            continue  # another pass took it a moment ago
        error = _send(delivery)
        if error:
            failing.add(delivery.channel_id)
            result["failed"] += 1
            result["errors"].append(f"channel {delivery.channel.name}: {error}")
            _failed(delivery, error)
        else:
            result["sent"] += 1
            _sent(delivery)
    return result


def _opening_sent(delivery):
    """A resolution waits until the channel has had the opening, as the mail does."""
    if delivery.event == ChannelDelivery.Event.OPENED:
        return True
    return (
        ChannelDelivery.objects.filter(
            alert_id=delivery.alert_id, channel_id=delivery.channel_id, event=ChannelDelivery.Event.OPENED
        )
        .exclude(sent_at=None)
        .exists()
    )


def _claim(delivery, now):
    """Move the next attempt past this one: a pass running beside this one leaves it alone."""
    claimed = ChannelDelivery.objects.filter(
        pk=delivery.pk, sent_at=None, attempts=delivery.attempts, next_attempt_at=delivery.next_attempt_at
    ).update(next_attempt_at=now + LONGEST_RETRY)
    return claimed == 1


def _send(delivery):
    """'' when the channel took the message; else what went wrong, without the secret."""
    alert, event, kind = delivery.alert, delivery.event, delivery.channel.kind
    return notify(
        delivery.channel,
        title(alert, event, kind),
        body(alert, event, kind),
        _type(event),
        payload_fields(alert, event),
    )


def send_test(channel, actor):
    """A test message, from the admin: '' when the channel took it, else the error. Journaled."""
    name, kind = channel.name, channel.kind
    error = notify(
        channel,
        f"[backupportal] test message to {literal(kind, name)}",
        f"A test of the alert channel {literal(kind, name)}, sent by {literal(kind, actor)} from {settings.SITE_URL}.",
        apprise.NotifyType.INFO,
        {"event": "test"},
    )
    journal.record("alert_channel_tested", actor=actor, obj=channel, outcome="failed" if error else "ok", error=error)
    return error


def notify(channel, subject, text, notify_type, extras):
    """Send one message through Apprise: '' when the channel took it, else what went wrong, without the secret.
    `subject` and `text` are as the channel's kind shows them: what came from outside went through `literal`."""
    try:
        secret = channel.secret
        _HINTS[Kind(channel.kind)](secret, channel.target)  # stored before a rule was tightened: not sent
        plugin = plugin_for(channel.kind, channel.target, secret, extras)
    except SealError as e:
        return str(e)
    except ValidationError:
        plugin = None
    if plugin is None:
        return f"the {channel.get_kind_display()} settings are not accepted any more: enter the secret again"
    host = user_host(channel.kind, secret)
    addresses = _resolve(host) if host else None
    if addresses == []:
        return _unreachable(host)
    refusal = _host_refusal(host, addresses)
    if refusal:
        return refusal
    with apprise.LogCapture(level=logging.WARNING) as captured, _guarded(host is not None):
        try:
            ok = plugin.notify(body=text, title=subject, notify_type=notify_type, body_format=FORMATS[channel.kind])
        except Exception as e:  # noqa: BLE001  a plugin's bug is this channel's failure, not the pass's
            return _without_secret(f"{type(e).__name__}: {e}", secret)
        logged = captured.getvalue()
    if ok:
        return ""
    # Apprise's lines read "2026-12-03 13:19:05,424 - WARNING - what happened": keep what happened,
    # an HTTP status above all. Without one, a connection that failed is one line whatever the cause:
    # refused, reset, timed out or not a web server must not tell a port scan which ports are open.
    lines = [re.sub(r"^.*? - [A-Z]+ - ", "", line).strip() for line in logged.splitlines() if line.strip()]
    if "connection error" in logged.lower() and not re.search(r"\berror=\d{3}\b", logged):
        return _unreachable(host or channel.get_kind_display())
    return _without_secret(" ".join(lines[-2:]) or "the service refused the message", secret)


def _unreachable(host):
    return f"could not reach {host}: no answer, connection refused or name not found"


def _without_secret(text, secret):
    """Apprise's own words may quote a URL: the secret and each of its long parts become ***."""
    pieces = {secret, quote(secret, safe=""), *(p for p in re.split(r"[/:?&=@]", secret) if len(p) >= 8)}
    for piece in sorted(pieces, key=len, reverse=True):
        if piece:
            text = text.replace(piece, "***")
    return redact(text)[:500]


def _sent(delivery):
    now = timezone.now()
    delivery.sent_at, delivery.attempts, delivery.last_error = now, delivery.attempts + 1, ""
    delivery.save(update_fields=["sent_at", "attempts", "last_error"])
    AlertChannel.objects.filter(pk=delivery.channel_id).update(last_sent_at=now, failures=0, last_error="")
    journal.record(
        "alert_channel_sent",
        actor="job:monitor",
        obj=delivery.alert,
        server=delivery.alert.server or "",
        channel=delivery.channel.name,
        message=delivery.event,
        attempts=delivery.attempts,
    )


def _failed(delivery, error):
    """Keep the error; retry after a wait that doubles; journal an error only when it is new."""
    now = timezone.now()
    first_time = delivery.last_error != error
    delivery.attempts += 1
    delivery.last_error = error
    delivery.next_attempt_at = now + min(FIRST_RETRY * 2 ** (delivery.attempts - 1), LONGEST_RETRY)
    delivery.save(update_fields=["attempts", "last_error", "next_attempt_at"])
    channel = delivery.channel
    channel.failures += 1
    AlertChannel.objects.filter(pk=channel.pk).update(last_failed_at=now, failures=channel.failures, last_error=error)
    if first_time:
        journal.record(
            "alert_channel_failed",
            actor="job:monitor",
            obj=delivery.alert,
            server=delivery.alert.server or "",
            outcome="failed",
            channel=channel.name,
            message=delivery.event,
            error=error,
            attempts=delivery.attempts,
        )


# --- The message ---------------------------------------------------------------------------------

# A database's name reaches an alert's message from the monitored cluster, where anyone who may
# CREATE DATABASE chooses it; a channel's name and a user's come from the portal's users. Each
# kind renders markup of its own, and such text must show as typed, never as a link, a mention
# or formatting. Slack is handed plain text, which Apprise escapes for it (&, < and >; passed
# through instead, "&lt;!here&gt;" would be made a mention again). Teams' Adaptive Cards and
# Discord render Markdown that Apprise passes on unescaped (a Teams title untouched,
# "<at>name</at>" made a mention), and Apprise 2.2 skips its text-to-HTML step for Telegram when
# a plugin is called directly, as here: for those `literal` escapes. A JSON webhook receives data.
FORMATS = {
    Kind.SLACK: apprise.NotifyFormat.TEXT,
    Kind.WEBHOOK: apprise.NotifyFormat.TEXT,
    Kind.TELEGRAM: apprise.NotifyFormat.HTML,
    Kind.TEAMS: apprise.NotifyFormat.MARKDOWN,
    Kind.DISCORD: apprise.NotifyFormat.MARKDOWN,
}
# The characters that open markup anywhere in a line in CommonMark, Adaptive Cards or Discord
# (emphasis, code, links and images, which need their "[", tags such as Teams' "<at>", entities,
# Discord's spoilers), and those that do only at a line's start (headings, quotes, lists): a
# backslash before each shows it as typed. No more: some Teams clients show a backslash that
# escapes nothing.
INLINE_MARKUP = re.compile(r"([\\`*_~\[\]<>&|])")
LINE_START_MARKUP = re.compile(r"^([ \t]*)([#>+=-])", re.MULTILINE)
LINE_START_NUMBER = re.compile(r"^([ \t]*\d+)([.)])", re.MULTILINE)


def literal(kind, text):
    """`text` as the channel's kind shows it as typed, whatever markup it holds."""
    if kind == Kind.TELEGRAM:
        return html.escape(text, quote=False)
    if kind == Kind.TEAMS:
        return _markdown_literal(text)
    if kind == Kind.DISCORD:
        # Discord reads @everyone and @here as mentions wherever they stand: a zero-width space after the @ stops it.
        return _markdown_literal(text).replace("@", "@\u200b")
    return text


def _markdown_literal(text):
    text = INLINE_MARKUP.sub(r"\\\1", text)
    text = LINE_START_MARKUP.sub(r"\1\\\2", text)
    return LINE_START_NUMBER.sub(r"\1\\\2", text)


def title(alert, event, kind):
    prefix = "RESOLVED " if event == ChannelDelivery.Event.RESOLVED else ""
    return f"[backupportal] {prefix}{literal(kind, alert.subject_label)}: {alert.get_condition_display()}"


def body(alert, event, kind):
    link = settings.SITE_URL + alert.get_absolute_url()
    message = literal(kind, alert.message)
    if event == ChannelDelivery.Event.RESOLVED:
        lasted = alert.resolved_at - alert.opened_at
        return f"Resolved at {_local(alert.resolved_at)} after {_duration(lasted)}. {message}\n{link}"
    return f"{message}\nOpened at {_local(alert.opened_at)} ({settings.TIME_ZONE}).\n{link}"


def payload_fields(alert, event):
    """What a JSON webhook receives besides title and message: enough to act on without parsing text."""
    return {
        "event": event,
        "alert_id": alert.pk,
        "condition": alert.condition,
        "subject": alert.subject,
        "server": alert.server.name if alert.server_id else "",
        "opened_at": alert.opened_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else "",
        "url": settings.SITE_URL + alert.get_absolute_url(),
    }


def _type(event):
    return apprise.NotifyType.SUCCESS if event == ChannelDelivery.Event.RESOLVED else apprise.NotifyType.FAILURE


def _local(when):
    return f"{timezone.localtime(when):%Y-%m-%d %H:%M}"


def _duration(delta):
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
