"""The proxy a call goes through, read from the environment; URLs as a user is shown them.

`env_proxy` reads ``$HTTP_PROXY``, ``$HTTPS_PROXY`` and ``$ALL_PROXY`` (any case) once per
session. ``$NO_PROXY`` exempts, as curl (≥ 7.86) and requests read it:

    *                                every server
    example.com, .example.com        that host and the names under it (urllib's matching)
    127.0.0.1, ::1, [::1]            a server named by that address
    10.0.0.0/8, fd00::/8             a server named by an address in that range

A name is never resolved to be matched against an address or a range.

Every URL the transport writes into a message goes through `storyflow.agents.urls.masked`
(re-exported here): its credentials show as ``***``.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from dataclasses import dataclass
from urllib.request import getproxies, proxy_bypass

from yarl import URL

from storyflow.agents.urls import masked
from storyflow.errors import PermanentError

__all__ = ["Proxy", "env_proxy", "masked"]

_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy")
"""Without one of these (any case) set, no proxy: the lookup is skipped."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """The proxy of one base URL."""

    url: URL
    """Without its user:password."""
    headers: dict[str, str] | None
    """``Proxy-Authorization`` with the URL's user:password; None without them."""
    shown: str
    """The URL as messages show it (`masked`)."""


def env_proxy(base_url: str) -> Proxy | None:
    """The proxy of ``$HTTP(S)_PROXY`` (else ``$ALL_PROXY``) for ``base_url`` unless
    ``$NO_PROXY`` exempts it (http:// or https://; its user:password as
    ``Proxy-Authorization``). aiohttp's ``trust_env`` looks it up on every request (and
    ``~/.netrc`` in a thread, whose entry for the server clashes with the key), skips an
    https:// proxy with a log line, going direct, and knows no address ranges."""
    if not any(name.lower() in _PROXY_ENV for name in os.environ):
        return None
    try:
        target = URL(base_url)
    except ValueError:
        return None  # the call says what is wrong with it
    proxies = getproxies()
    variable = target.scheme if target.scheme in proxies else "all"
    given = proxies.get(variable)
    if not given or (target.host is not None and _exempt(target.host, proxies.get("no", ""))):
        return None
    try:
        proxy = URL(given)
        usable = proxy.scheme in ("http", "https") and bool(proxy.host)
    except ValueError:
        usable = False
    if not usable:
        raise PermanentError(f"${variable.upper()}_PROXY is not an http:// or https:// "
                             "proxy URL", hint="e.g. http://proxy.example:3128; or exempt "
                             "the server in $NO_PROXY")
    if proxy.user is None:
        return Proxy(proxy, None, masked(given))
    basic = base64.b64encode(f"{proxy.user}:{proxy.password or ''}".encode()).decode()
    return Proxy(proxy.with_user(None), {"Proxy-Authorization": f"Basic {basic}"},
                 masked(given))


def _exempt(host: str, no_proxy: str) -> bool:
    """``$NO_PROXY`` exempts ``host``: a name (or ``*``) as urllib matches it, or an
    address in an address or range of the list."""
    if proxy_bypass(host):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name
    for entry in no_proxy.split(","):
        try:
            network = ipaddress.ip_network(entry.strip().replace("[", "").replace("]", ""),
                                           strict=False)
        except ValueError:
            continue  # a name, or not an address: urllib's to match
        if address in network:  # never, across IPv4 and IPv6
            return True
    return False
