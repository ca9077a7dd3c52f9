"""receiver.providers.fetch against real HTTP servers on loopback (raw asyncio ones, so
connections can be counted and answers shaped byte by byte). No name is ever looked up in
DNS: IP literals, ``localhost`` (/etc/hosts), or a resolver the test passes in."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import shutil
import ssl
import struct
import subprocess
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.providers.fetch import (
    FetchPolicy,
    ImageRefused,
    address_problem,
    fetch_image,
    image_data_url,
)


def png() -> bytes:
    """A real 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00\x00")) + chunk(b"IEND", b""))


PNG = png()
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
Handler = Callable[[str, asyncio.StreamWriter], Awaitable[None]]


async def respond(writer: asyncio.StreamWriter, body: bytes = PNG, status: int = 200,
                  content_type: str = "image/png", headers: dict[str, str] | None = None) -> None:
    """One HTTP/1.1 answer, with a Content-Length unless ``headers`` say otherwise."""
    fields = {"Content-Type": content_type, "Connection": "close", **(headers or {})}
    if "Transfer-Encoding" not in fields and "Content-Length" not in fields:
        fields["Content-Length"] = str(len(body))
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()


async def serve_png(path: str, writer: asyncio.StreamWriter) -> None:
    await respond(writer)


class Server:
    """A raw HTTP server on 127.0.0.1 in the test's loop: counts accepted connections and
    records (path, headers) of each request; ``handler`` writes the answer."""

    def __init__(self, handler: Handler = serve_png, tls: ssl.SSLContext | None = None) -> None:
        self.handler, self.tls = handler, tls
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.tls)
        self.port: int = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
            path = head[0].split(" ")[1]
            fields = dict(line.split(": ", 1) for line in head[1:] if line)
            self.requests.append((path, {k.lower(): v for k, v in fields.items()}))
            await self.handler(path, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 5))  # a hang fails, it does not block the suite


async def refusal(awaitable: Awaitable[object]) -> str:
    with pytest.raises(ImageRefused) as info:
        await awaitable
    assert (info.value.status_code, info.value.code) == (400, "image_refused")
    return info.value.detail


def allow(*hosts: str, **kwargs: Any) -> FetchPolicy:
    return FetchPolicy(allow_hosts=frozenset(hosts), **kwargs)


class Resolver:
    """A DNS stand-in: name -> addresses, recording each lookup."""

    def __init__(self, **names: Sequence[str]) -> None:
        self.names = {name.replace("_", "."): list(found) for name, found in names.items()}
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        if host not in self.names:
            raise OSError(f"unknown test name {host}")
        return self.names[host]


class NoConnect(httpx.AsyncBaseTransport):
    """A transport that fails the test if any request reaches it."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"connected to {request.url}")


# --- the happy paths, and pinning -----------------------------------------------------------

def test_allowed_loopback_png_becomes_a_data_url() -> None:
    async def scenario() -> None:
        async with Server() as server:
            url = await image_data_url(f"http://{server.host}/cat.png", allow(server.host))
            assert url == PNG_URL
            assert server.requests[0][0] == "/cat.png"
            assert server.requests[0][1]["host"] == server.host
    run(scenario())


def test_a_name_is_resolved_once_and_its_checked_address_connected_to() -> None:
    async def scenario() -> None:
        async with Server() as server:
            resolver = Resolver(images_test=["127.0.0.1"])
            name = f"images.test:{server.port}"
            body, kind = await fetch_image(f"http://{name}/a.png", allow(name), resolver=resolver)
            assert (body, kind) == (PNG, "image/png")
            assert resolver.calls == [("images.test", server.port)]  # one lookup: pinned
            assert server.requests[0][1]["host"] == name  # the name travels in Host
    run(scenario())


def test_the_next_checked_address_is_tried_when_one_refuses_connections() -> None:
    async def scenario() -> None:
        async with Server() as server:  # listens on 127.0.0.1 only, not 127.0.0.2
            resolver = Resolver(images_test=["127.0.0.2", "127.0.0.1"])
            name = f"images.test:{server.port}"
            assert await image_data_url(f"http://{name}/", allow(name), resolver=resolver
                                        ) == PNG_URL
    run(scenario())


def test_localhost_through_the_system_resolver_when_allowed() -> None:
    async def scenario() -> None:
        async with Server() as server:
            name = f"localhost:{server.port}"
            assert await image_data_url(f"http://{name}/", allow(name)) == PNG_URL
    run(scenario())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for images.test (its own trust anchor)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_https_to_the_pinned_address_verifies_the_certificate_for_the_name(
        certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def scenario() -> None:
        async with Server(tls=server_tls) as server:
            resolver = Resolver(images_test=["127.0.0.1"], other_test=["127.0.0.1"])
            transport = httpx.AsyncHTTPTransport(
                verify=ssl.create_default_context(cafile=str(cert)))
            good, bad = f"images.test:{server.port}", f"other.test:{server.port}"
            policy = allow(good, bad)
            assert await image_data_url(f"https://{good}/", policy, resolver=resolver,
                                        transport=transport) == PNG_URL
            detail = await refusal(image_data_url(f"https://{bad}/", policy, resolver=resolver,
                                                  transport=transport))
            assert "CERTIFICATE_VERIFY_FAILED" in detail
    run(scenario())


# --- addresses ------------------------------------------------------------------------------

@pytest.mark.parametrize("form", [
    "127.0.0.1:{port}", "localhost:{port}", "127.1:{port}", "2130706433:{port}",
    "[::ffff:127.0.0.1]:{port}",
])
def test_loopback_not_allowed_is_refused_without_a_connection(form: str) -> None:
    async def scenario() -> None:
        async with Server() as server:
            host = form.format(port=server.port)
            other = FetchPolicy(allow_hosts=frozenset({"127.0.0.1:1"}))
            detail = await refusal(fetch_image(f"http://{host}/cat.png", other))
            assert "loopback" in detail and "127.0.0.1" in detail
            assert server.connections == 0
    run(scenario())


@pytest.mark.parametrize(("addresses", "expected"), [
    (["10.0.0.1"], "10.0.0.1, which is not public (private)"),
    (["169.254.169.254"], "169.254.169.254, which is not public (cloud metadata)"),
    (["fd00:ec2::254"], "cloud metadata"),
    (["::1"], "::1, which is not public (loopback)"),
    (["::ffff:127.0.0.1"], "IPv4-mapped 127.0.0.1, loopback"),
    (["::ffff:169.254.1.1"], "IPv4-mapped 169.254.1.1, link-local"),
    (["2002:a00:1::1"], "6to4/Teredo form of 10.0.0.1, private"),
    (["0.0.0.0"], "unspecified"),
    (["224.0.0.1"], "multicast"),
    (["100.64.0.1"], "not globally routable"),
    (["fec0::1"], "site-local"),  # deprecated, still routed inside some networks
    (["93.184.216.34", "10.0.0.1"], "resolves to 10.0.0.1"),  # ANY address refuses
])
def test_a_name_resolving_to_a_non_public_address_is_refused_without_connecting(
        addresses: list[str], expected: str) -> None:
    async def scenario() -> None:
        resolver = Resolver(evil_test=addresses)
        detail = await refusal(fetch_image("http://evil.test/x.png", FetchPolicy(),
                                           resolver=resolver, transport=NoConnect()))
        assert expected in detail
        assert resolver.calls == [("evil.test", 80)]
    run(scenario())


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "2002:808:808::1"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_allow_hosts_is_per_port_and_default_port_aware() -> None:
    async def scenario() -> None:
        resolver = Resolver(images_test=["10.0.0.1"])
        policy = allow("images.test:80")
        detail = await refusal(fetch_image("http://images.test:8080/", policy,
                                           resolver=resolver, transport=NoConnect()))
        assert "10.0.0.1" in detail
        with pytest.raises(AssertionError, match=r"connected to http://10\.0\.0\.1/"):
            await fetch_image("http://images.test/", policy, resolver=resolver,
                              transport=NoConnect())
    run(scenario())


def test_proxies_from_the_environment_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with Server() as proxy, Server() as server:
            for name in ("NO_PROXY", "no_proxy"):
                monkeypatch.delenv(name, raising=False)
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
                monkeypatch.setenv(name, f"http://{proxy.host}")
            assert await image_data_url(f"http://{server.host}/", allow(server.host)) == PNG_URL
            assert (proxy.connections, server.connections) == (0, 1)
    run(scenario())


# --- schemes and URL forms ------------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://127.0.0.1/x.png", "scheme 'ftp'"),
    ("gopher://127.0.0.1:70/_x", "scheme 'gopher'"),
    ("javascript:alert(1)", "scheme 'javascript'"),
    ("data:text/html;base64,PGh0bWw+", "data:image/<type>;base64"),
    ("http://user:pass@127.0.0.1/x.png", "credentials"),
    ("http:///x.png", "without a host"),
    ("/x.png", "scheme ''"),
])
def test_only_plain_http_and_https_urls(url: str, expected: str) -> None:
    async def scenario() -> None:
        policy = allow("127.0.0.1:80", "127.0.0.1:70")
        assert expected in await refusal(image_data_url(url, policy, transport=NoConnect()))
    run(scenario())


# --- redirects ------------------------------------------------------------------------------

@pytest.mark.parametrize("location", [
    "http://127.0.0.1:{other}/x.png", "http://evil.test/x.png", "file:///etc/passwd",
])
def test_a_redirect_from_an_allowed_host_to_a_refused_one_is_refused(location: str) -> None:
    async def scenario() -> None:
        async with Server() as target:
            async def redirect(path: str, writer: asyncio.StreamWriter) -> None:
                await respond(writer, b"", 302, "text/plain",
                              headers={"Location": location.format(other=target.port)})

            async with Server(redirect) as server:
                resolver = Resolver(evil_test=["169.254.169.254"])
                await refusal(fetch_image(f"http://{server.host}/", allow(server.host),
                                          resolver=resolver))
                assert server.connections == 1
                assert target.connections == 0
    run(scenario())


def test_redirects_are_followed_up_to_the_limit() -> None:
    async def countdown(path: str, writer: asyncio.StreamWriter) -> None:
        left = int(path.rsplit("/", 1)[1])
        if left:
            await respond(writer, b"", 307, "text/plain", headers={"Location": f"/r/{left - 1}"})
        else:
            await respond(writer)

    async def scenario() -> None:
        async with Server(countdown) as server:
            policy = allow(server.host, max_redirects=2)
            assert await image_data_url(f"http://{server.host}/r/2", policy) == PNG_URL
            server.requests.clear()
            detail = await refusal(image_data_url(f"http://{server.host}/r/3", policy))
            assert "more than 2 redirects" in detail
            assert [path for path, _ in server.requests] == ["/r/3", "/r/2", "/r/1"]
    run(scenario())


# --- size, time, type, status ---------------------------------------------------------------

def test_a_content_length_over_the_cap_is_refused_before_any_body() -> None:
    async def announce_only(path: str, writer: asyncio.StreamWriter) -> None:
        await respond(writer, b"", headers={"Content-Length": "1000000"})
        await asyncio.sleep(10)  # the body never comes: reading it would time out

    async def scenario() -> None:
        async with Server(announce_only) as server:
            started = time.monotonic()
            detail = await refusal(fetch_image(f"http://{server.host}/",
                                               allow(server.host, max_bytes=1000, timeout=3)))
            assert detail == "Content-Length 1000000 exceeds 1000 bytes"
            assert time.monotonic() - started < 1
    run(scenario())


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
def test_a_streamed_body_is_cut_once_past_the_cap(framing: str) -> None:
    sent = [0]

    async def endless(path: str, writer: asyncio.StreamWriter) -> None:
        chunked = framing == "chunked"
        framing_header = b"Transfer-Encoding: chunked" if chunked else b"Connection: close"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n%s\r\n\r\n" % framing_header)
        block = PNG + bytes(4096 - len(PNG))
        for _ in range(1000):  # 4 MB if nobody stops reading
            writer.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            await writer.drain()
            sent[0] += len(block)

    async def scenario() -> None:
        async with Server(endless) as server:
            detail = await refusal(fetch_image(f"http://{server.host}/",
                                               allow(server.host, max_bytes=10_000)))
            assert detail.startswith("body exceeds 10000 bytes")
        assert sent[0] < 1000 * 4096
    run(scenario())


async def silent(path: str, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(10)


async def drip(path: str, writer: asyncio.StreamWriter) -> None:
    await respond(writer, PNG, headers={"Content-Length": "100000"})
    for _ in range(10_000):  # each byte resets a per-read timeout, not the deadline
        await asyncio.sleep(0.02)
        writer.write(b"\x00")
        await writer.drain()


@pytest.mark.parametrize("handler", [silent, drip], ids=["silent", "dripping"])
def test_a_silent_server_or_a_dripping_body_is_bounded_by_the_whole_fetch_deadline(
        handler: Handler) -> None:
    async def scenario() -> None:
        async with Server(handler) as server:
            started = time.monotonic()
            detail = await refusal(fetch_image(f"http://{server.host}/",
                                               allow(server.host, timeout=0.3)))
            assert detail.startswith("timed out after 0.3 s")
            assert time.monotonic() - started < 0.8
    run(scenario())


@pytest.mark.parametrize(("body", "content_type", "status", "expected"), ids=[
    "html-type", "no-type", "html-bytes", "404", "304"], argvalues=[
    (PNG, "text/html", 200, "content type 'text/html' is not image/*"),
    (PNG, "", 200, "content type '(none)'"),
    (b"<html><script>x</script></html>", "image/png", 200,
     "body is not a PNG, JPEG, GIF or WebP image (sent as image/png)"),
    (PNG, "image/png", 404, "answered HTTP 404"),
    (b"", "text/plain", 304, "answered HTTP 304"),
])
def test_answers_that_are_not_an_image_are_refused(body: bytes, content_type: str,
                                                   status: int, expected: str) -> None:
    async def answer(path: str, writer: asyncio.StreamWriter) -> None:
        await respond(writer, body, status, content_type)

    async def scenario() -> None:
        async with Server(answer) as server:
            detail = await refusal(image_data_url(f"http://{server.host}/", allow(server.host)))
            assert expected in detail
    run(scenario())


def test_an_octet_stream_that_is_an_image_is_taken_and_a_compressed_answer_is_not() -> None:
    async def answer(path: str, writer: asyncio.StreamWriter) -> None:
        if path == "/gzip":
            await respond(writer, gzip.compress(PNG), headers={"Content-Encoding": "gzip"})
        else:  # what object stores often send
            await respond(writer, PNG, content_type="application/octet-stream")

    async def scenario() -> None:
        async with Server(answer) as server:
            base = f"http://{server.host}"
            assert await fetch_image(f"{base}/s3", allow(server.host)) == (PNG, "image/png")
            detail = await refusal(fetch_image(f"{base}/gzip", allow(server.host)))
            assert "a gzip-encoded answer is refused" in detail
            assert [h.get("accept-encoding") for _, h in server.requests] == ["identity"] * 2
    run(scenario())


@pytest.mark.parametrize(("magic", "kind"), ids=["jpeg", "gif", "webp"], argvalues=[
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"), (b"GIF89a\x01\x00", "image/gif"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "image/webp"),
])
def test_other_image_types_are_sniffed(magic: bytes, kind: str) -> None:
    async def answer(path: str, writer: asyncio.StreamWriter) -> None:
        await respond(writer, magic, content_type="image/png")  # the bytes win over the header

    async def scenario() -> None:
        async with Server(answer) as server:
            assert await fetch_image(f"http://{server.host}/", allow(server.host)) == (magic, kind)
    run(scenario())


# --- data URLs ------------------------------------------------------------------------------

def test_an_image_data_url_passes_through_unchanged() -> None:
    async def scenario() -> None:
        assert await image_data_url(PNG_URL, FetchPolicy(), transport=NoConnect()) == PNG_URL
    run(scenario())


@pytest.mark.parametrize(("url", "expected"), ids=[
    "junk", "padding", "html", "not-base64", "one-byte-over", "big-encoded"], argvalues=[
    (PNG_URL[:30] + "*" + PNG_URL[30:], "not valid base64"),
    ("data:image/png;base64,iVBORw0KGg", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"<html>").decode(), "not a PNG"),
    ("data:image/png," + PNG.decode("latin-1"), "data:image/<type>;base64"),
    ("data:image/png;base64," + base64.b64encode(PNG + bytes(1001 - len(PNG))).decode(),
     "exceeds 1000"),
    ("data:image/png;base64," + "A" * 5000, "exceeds 1000"),
])
def test_bad_data_urls_are_refused(url: str, expected: str) -> None:
    async def scenario() -> None:
        detail = await refusal(image_data_url(url, FetchPolicy(max_bytes=1000)))
        assert expected in detail
    run(scenario())
