"""Where the portal's worker may be sent by what a user types: a host is refused when it
resolves inside the portal's network, unless a setting lists it.

The portal sits beside the database servers, the NAS and MinIO, on a host whose cloud metadata
service hands out credentials. Whoever edits an alert channel's URL or a storage location's S3
endpoint chooses where the worker sends requests: neither must make it a probe of the network.
Private addresses (RFC 1918, 100.64/10, fc00::/7), loopback and link-local ones are refused
unless the setting lists the host, its address or its network; metadata addresses always.

A check when the URL is saved is not enough: a name may resolve to a public address then and to
10.x a moment later. So every connection urllib3 makes (requests' and botocore's alike) goes
through `_connect_guard`, which, for a host under a policy, connects only to the addresses it
has just checked: the hosts of alert channels while one is sent to (`guarding`, this thread),
and the S3 endpoints (host and port) of storage locations whichever thread connects (`guard_host`).
"""

import ipaddress
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import urllib3.util.connection
from django.conf import settings

# Never, even when listed: what answers there hands out the cloud host's credentials.
METADATA_ADDRESSES = {
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NOT_PUBLIC = [
    ("loopback", lambda ip: ip.is_loopback),
    ("link-local", lambda ip: ip.is_link_local),
    ("unspecified", lambda ip: ip.is_unspecified),
    ("multicast", lambda ip: ip.is_multicast),
    ("private", lambda ip: ip.is_private),
    ("non-public", lambda ip: not ip.is_global),
]


def resolve(host):
    """Every address `host` resolves to, as getaddrinfo gives them; [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except (OSError, ValueError):  # ValueError: a NUL, or a label too long for IDNA
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def refusal(host, allowed, setting, reaching, addresses=None):
    """'' when `host` may be reached; else one line naming it, its address and what to do:
    list it in `setting` (whose value is `allowed`). `reaching` names what may not reach a
    metadata address ("no channel")."""
    if host is None:
        return ""
    for address in resolve(host) if addresses is None else addresses:
        ip = as_itself(ipaddress.ip_address(address))
        if ip in METADATA_ADDRESSES:
            return f"refused: {host} resolves to {ip}, a cloud metadata address, which {reaching} may reach"
        what = next((what for what, test in NOT_PUBLIC if test(ip)), "")
        if what and not listed(allowed, host, ip):
            return f"refused: {host} resolves to {ip}, a {what} address; list {host} in {setting} to allow it"
    return ""


def as_itself(ip):
    """An IPv4 address written as IPv6 (::ffff:127.0.0.1, 6to4, NAT64) is judged as the IPv4 address."""
    if ip.version == 4:
        return ip
    ip = ipaddress.ip_address(str(ip).split("%")[0])  # fe80::1%eth0: the scope changes nothing
    return ip.ipv4_mapped or ip.sixtofour or (ipaddress.ip_address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else ip)


def listed(allowed, host, ip):
    """Whether `allowed` lists the host's name, its address or a network holding it."""
    for entry in allowed:
        entry = entry.strip().lower().rstrip(".")
        try:
            if ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                return True
        except ValueError:
            if entry == host.lower().rstrip("."):
                return True
    return False


class Refused(OSError):
    """A connection the guard did not make: its message is the one line to show."""


def refusal_in(error):
    """The guard's Refused behind `error` (a library wraps it in its own), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Refused):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__ or getattr(error, "kwargs", {}).get("error")
    return None


@dataclass(frozen=True)
class Policy:
    """Which setting lists the hosts allowed inside the network, and what may never reach a
    metadata address, in the refusal's words."""

    setting: str
    reaching: str

    def refusal(self, host, resolved=None):
        return refusal(host, getattr(settings, self.setting), self.setting, self.reaching, resolved)


_thread = threading.local()
_hosts = {}  # (host: lower case, no brackets; port) -> Policy, for every thread's connections


def _key(host, port):
    return str(host).lower().strip("[]").rstrip("."), int(port)


def guard_host(host, port, policy):
    """Every connection to `host`:`port` from now on, in any thread, is checked under `policy`."""
    _hosts[_key(host, port)] = policy


@contextmanager
def guarding(policy):
    """Every connection this thread makes meanwhile is checked under `policy`."""
    _thread.policy = policy
    try:
        yield
    finally:
        _thread.policy = None


def _connect_guard(create_connection):
    """urllib3's create_connection, which, for a host under a policy, connects only to addresses
    it has checked: a name that resolved to a public address for the check cannot answer
    127.0.0.1 now. A name that does not resolve is refused."""

    def guarded(address, *args, **kwargs):
        host = str(address[0])
        policy = getattr(_thread, "policy", None) or _hosts.get(_key(host, address[1]))
        if policy is None:
            return create_connection(address, *args, **kwargs)
        resolved = resolve(host)
        refused = policy.refusal(host, resolved)
        if refused or not resolved:
            raise Refused(refused or f"refused: {host} does not resolve")
        error = None
        for checked in resolved:
            try:
                return create_connection((checked, address[1]), *args, **kwargs)
            except OSError as e:
                error = e
        raise error

    guarded.checks_hosts = True
    return guarded


if not getattr(urllib3.util.connection.create_connection, "checks_hosts", False):
    urllib3.util.connection.create_connection = _connect_guard(urllib3.util.connection.create_connection)
