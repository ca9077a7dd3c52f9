"""Fetch a tenant's image URL server-side, without becoming an SSRF tool, and make it a data URL.

Some providers (midjourney-proxy, OhMyGPT) take images only as ``data:image/...;base64,``
URLs, so the service fetches the URL a tenant gave. Anyone can write any URL there, hence:
http(s) only, no userinfo; every address the host resolves to must be public (unless its
``host:port`` is in ``FetchPolicy.allow_hosts``); redirects followed by hand, each hop checked
again; a size cap, one deadline for the whole fetch, an ``image/*`` type and image magic bytes.

Pinning: each hop's host is resolved exactly once and the request is sent to the checked IP
literal, with the name in the ``Host`` header and, for https, ``extensions={"sni_hostname":
name}``, so TLS sends SNI for and verifies the certificate against the name. httpx never sees
the name, so there is no second lookup a DNS-rebinding attacker could answer differently. This
is stock httpx, no transport subclass: the simplest correct way. Keep-alive is off, so a TLS
connection verified for one name is never reused for another name at the same address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from receiver.core.errors import BadRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``: the system's by default; tests pass their own."""

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECTS = frozenset({301, 302, 303, 307, 308})
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"),
                      ipaddress.ip_address("fd00:ec2::254")})
# Most specific first, so that a detail says "loopback" rather than "private".
CLASSES = (("unspecified", "is_unspecified"), ("loopback", "is_loopback"),
           ("link-local", "is_link_local"), ("multicast", "is_multicast"),
           ("site-local", "is_site_local"), ("private", "is_private"),
           ("reserved", "is_reserved"))
_TRANSIENT = frozenset({408, 425, 429, 500, 502, 503, 504})  # answers worth asking again
DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+);base64,(.*)", re.IGNORECASE | re.DOTALL)


class ImageRefused(BadRequest):
    """The image URL was not fetched, or its answer not taken; the detail says why.
    ``transient``: the same fetch may work later (a timeout, a 5xx, no connection)."""

    code = "image_refused"

    def __init__(self, detail: str, transient: bool = False) -> None:
        super().__init__(detail)
        self.transient = transient


@dataclass(frozen=True)
class FetchPolicy:
    """``allow_hosts``: ``"host:port"`` entries (IPv6 as ``[::1]:80``, the port explicit even
    when the scheme's default) fetched from even when they resolve to private or loopback
    addresses, e.g. the service's own image store."""

    allow_hosts: frozenset[str] = frozenset()
    max_bytes: int = 32 * 1024 * 1024
    timeout: float = 10.0
    max_redirects: int = 3


def sniff(data: bytes) -> str | None:
    """The image type the bytes' magic says, whatever a header claimed, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def address_problem(ip: IPAddress) -> str | None:
    """Why no request may go to ``ip`` ("loopback", ...), or None if it is public. IPv4
    addresses inside IPv6 forms (mapped, 6to4, Teredo) are judged as themselves."""
    if ip in METADATA:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # the socket connects to the IPv4 address itself
            problem = address_problem(ip.ipv4_mapped)
            return problem and f"IPv4-mapped {ip.ipv4_mapped}, {problem}"
        inner = [ip.sixtofour] if ip.sixtofour else list(ip.teredo or ())
        for v4 in inner:
            if (problem := address_problem(v4)) is not None:
                return f"6to4/Teredo form of {v4}, {problem}"
    for label, attribute in CLASSES:
        if getattr(ip, attribute, False):  # is_site_local: IPv6 only
            return label
    return None if ip.is_global else "not globally routable"


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``loop.getaddrinfo`` gives, in its order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _parse(url: str, base: httpx.URL | None = None) -> httpx.URL:
    """``url`` (relative to ``base``, for a redirect's Location) if http(s) without userinfo."""
    try:
        parsed = base.join(url) if base is not None else httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ImageRefused(f"not a valid URL ({exc}): {url[:200]!r}") from None
    if parsed.scheme not in DEFAULT_PORTS:
        raise ImageRefused(f"scheme {parsed.scheme!r} refused: only http and https")
    if parsed.userinfo:
        raise ImageRefused("URLs with credentials (user:password@) are refused")
    if not parsed.host:
        raise ImageRefused(f"URL without a host: {url[:200]!r}")
    return parsed


async def _resolve(host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    """The host's addresses: itself if an IP literal, else one lookup through ``resolver``."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        addresses = [ipaddress.ip_address(address) for address in await resolver(host, port)]
    except (OSError, ValueError) as exc:
        raise ImageRefused(f"cannot resolve host {host!r}: {exc}", transient=True) from None
    if not addresses:
        raise ImageRefused(f"host {host!r} resolves to no address")
    return addresses


async def _addresses(target: httpx.URL, policy: FetchPolicy,
                     resolver: Resolver) -> tuple[str, list[IPAddress]]:
    """(host name, addresses to connect to): resolved once here, each one checked."""
    host = target.raw_host.decode("ascii")  # the IDNA form; IPv6 without brackets
    port = target.port or DEFAULT_PORTS[target.scheme]
    addresses = await _resolve(host, port, resolver)
    key = f"{f'[{host}]' if ':' in host else host}:{port}".lower()
    if key in {entry.lower() for entry in policy.allow_hosts}:
        return host, addresses
    for ip in addresses:
        if (problem := address_problem(ip)) is not None:
            where = f"address {ip}" if str(ip) == host else f"host {host!r} resolves to {ip}, which"
            raise ImageRefused(f"{where} is not public ({problem}); refused")
    return host, addresses


@asynccontextmanager
async def _pinned(client: httpx.AsyncClient, target: httpx.URL, host: str,
                  addresses: list[IPAddress]) -> AsyncIterator[httpx.Response]:
    """GET ``target`` from the first of the checked ``addresses`` that accepts a connection,
    the name kept for the Host header and TLS (SNI and certificate verification)."""
    # identity: a compressed body would be inflated a network read at a time, well past the
    # size cap before the cap is checked (300 KB of gzip measured 167 MB of peak memory)
    headers = {"Host": target.netloc.decode("ascii"), "Accept": "image/*",
               "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    error: httpx.ConnectError | None = None
    for ip in addresses:
        request = client.build_request("GET", target.copy_with(host=str(ip)),
                                       headers=headers, extensions=extensions)
        try:
            response = await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            error = exc
            continue
        try:
            yield response
        finally:
            await response.aclose()
        return
    raise ImageRefused(f"cannot connect to {host!r}: {error}", transient=True)


async def _read(response: httpx.Response, target: httpx.URL,
                policy: FetchPolicy) -> tuple[bytes, str]:
    """The body, if a 2xx image no larger than the cap: read as a stream, stopped past it."""
    if not 200 <= response.status_code < 300:
        raise ImageRefused(f"{target} answered HTTP {response.status_code}",
                           transient=response.status_code in _TRANSIENT)
    declared = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not declared.startswith("image/") and declared != "application/octet-stream":
        # (object stores often serve images as octet-stream: the bytes decide, below)
        raise ImageRefused(f"content type {declared or '(none)'!r} is not image/*: {target}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise ImageRefused(f"a {encoding}-encoded answer is refused (asked for identity): "
                           f"{target}")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise ImageRefused(f"Content-Length {length} exceeds {policy.max_bytes} bytes")
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > policy.max_bytes:
            raise ImageRefused(f"body exceeds {policy.max_bytes} bytes: {target}")
    kind = sniff(bytes(body))
    if kind is None:
        raise ImageRefused(f"body is not a PNG, JPEG, GIF or WebP image (sent as {declared})")
    return bytes(body), kind


async def _fetch(url: str, policy: FetchPolicy, resolver: Resolver,
                 transport: httpx.AsyncBaseTransport | None) -> tuple[bytes, str]:
    target = _parse(url)
    async with httpx.AsyncClient(
        transport=transport, trust_env=False, follow_redirects=False, timeout=policy.timeout,
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        for _ in range(policy.max_redirects + 1):
            host, addresses = await _addresses(target, policy, resolver)
            async with _pinned(client, target, host, addresses) as response:
                location = response.headers.get("location")
                if response.status_code in REDIRECTS and location:
                    target = _parse(location, base=target)
                    continue
                return await _read(response, target, policy)
    raise ImageRefused(f"more than {policy.max_redirects} redirects from {url[:200]!r}")


async def fetch_image(url: str, policy: FetchPolicy, *, resolver: Resolver | None = None,
                      transport: httpx.AsyncBaseTransport | None = None) -> tuple[bytes, str]:
    """(bytes, sniffed content type) of the image at ``url``, under ``policy``, or
    ``ImageRefused``. ``resolver`` and ``transport`` replace the system's (for tests, or a
    custom TLS trust); the whole fetch, lookups included, gets ``policy.timeout``."""
    try:
        async with asyncio.timeout(policy.timeout):
            return await _fetch(url, policy, resolver or system_resolver, transport)
    except (TimeoutError, httpx.TimeoutException):
        raise ImageRefused(f"timed out after {policy.timeout:g} s: {url[:200]!r}",
                           transient=True) from None
    except httpx.HTTPError as exc:
        raise ImageRefused(f"fetch failed ({type(exc).__name__}: {exc}): {url[:200]!r}",
                           transient=True) from None


def check_data_url(url: str, policy: FetchPolicy) -> None:
    """Refuse a data URL that is not base64 of a PNG/JPEG/GIF/WebP within the size cap."""
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise ImageRefused("a data URL must be data:image/<type>;base64,<data>")
    payload = match.group(2)
    if len(payload) > (policy.max_bytes + 2) // 3 * 4:  # refused before decoding it
        raise ImageRefused(f"data URL image exceeds {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused("data URL is not valid base64") from None
    if len(data) > policy.max_bytes:
        raise ImageRefused(f"data URL image exceeds {policy.max_bytes} bytes")
    if sniff(data) is None:
        raise ImageRefused("data URL is not a PNG, JPEG, GIF or WebP image")


async def image_data_url(url: str, policy: FetchPolicy, *, resolver: Resolver | None = None,
                         transport: httpx.AsyncBaseTransport | None = None) -> str:
    """``url`` unchanged if it is a valid image data URL, else the image fetched from it
    (``fetch_image``) as ``data:<sniffed type>;base64,...``."""
    if url[:5].lower() == "data:":
        check_data_url(url, policy)
        return url
    data, kind = await fetch_image(url, policy, resolver=resolver, transport=transport)
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"
