"""The address of the client behind a request, for login limits and the journal.

Behind the README's TLS proxy every request comes from the proxy's address; the client's is in
`X-Forwarded-For`. That header is typed by anyone, so it is believed only when the request
comes from a proxy listed in TRUSTED_PROXIES, and only as far back as the chain of trusted
proxies goes: the first address from the right that is not a trusted proxy is the client.
"""

import ipaddress

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def parse_networks(values):
    """TRUSTED_PROXIES' entries (addresses or CIDRs) as networks; nonsense stops the start."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ImproperlyConfigured(
                f"TRUSTED_PROXIES: {value!r} is not an address or a CIDR (e.g. 10.0.0.5 or 10.0.0.0/24)."
            ) from None
    return networks


def _address(text):
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(address, networks):
    return address is not None and any(address in network for network in networks)


def client_address(request):
    """The client's address as text ('' when unknown)."""
    if request is None:
        return ""
    peer = request.META.get("REMOTE_ADDR", "")
    networks = parse_networks(settings.TRUSTED_PROXIES)
    if not _trusted(_address(peer), networks):
        return peer
    chain = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    for hop in reversed(chain):
        address = _address(hop)
        if address is None:
            return peer  # a forged or garbled hop: believe nothing further back than the proxy
        if not _trusted(address, networks):
            return str(address)
    return str(_address(chain[0])) if chain else peer


def from_trusted_proxy(request):
    """Whether the request's peer is one of TRUSTED_PROXIES (its X-Forwarded-* headers count)."""
    return _trusted(_address(request.META.get("REMOTE_ADDR", "")), parse_networks(settings.TRUSTED_PROXIES))


def on_this_host(request):
    """Whether the request's peer is this host: a loopback address, or none (a Unix socket)."""
    peer = request.META.get("REMOTE_ADDR", "")
    address = _address(peer)
    address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1, a dual-stack bind's
    return not peer or (address is not None and address.is_loopback)
