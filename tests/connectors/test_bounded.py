"""Answers are bounded: in size (``max_response_bytes``) and in time (one deadline per round trip).

The oversized and slow answers come from a small HTTP server on 127.0.0.1 that
writes them for real, byte by byte; shapes no server sends on demand come from respx.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
import respx

from connectors import (
    BearerAuth,
    InvalidResponse,
    NotFound,
    OAuth2ClientCredentials,
    RetryPolicy,
    ScimClient,
    TransientError,
)

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """Answers every request with what ``answer`` writes; counts the body bytes it managed to send."""

    answer: Writer
    sent: int = 0
    base_url: str = ""


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Writer], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Writer) -> RawServer:
        state = RawServer(answer)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await state.answer(writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        state.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v2"
        return state

    yield start
    for server in servers:
        server.close()


def client_for(base_url: str, **options: object) -> ScimClient:
    return ScimClient(base_url, auth=BearerAuth("t"), allow_insecure_http=True, retry=RetryPolicy(max_attempts=1),
                      **options)  # type: ignore[arg-type]  # fmt: skip


async def test_a_50_mb_answer_to_a_lookup_is_refused_without_reading_it_all(
    raw_server: Callable[[Writer], Awaitable[RawServer]],
) -> None:
    total = 50 * 1024 * 1024
    chunk = b'{"id": "u1", "userName": "x"},' * 2048

    async def huge(writer: asyncio.StreamWriter) -> None:
        # Chunked, no Content-Length: the size is only known by reading.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/scim+json\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = b'{"totalResults": 1, "Resources": ['
        writer.write(b"%x\r\n%s\r\n" % (len(head), head))
        while server.sent < total:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            server.sent += len(chunk)

    server = await raw_server(huge)
    async with client_for(server.base_url, max_response_bytes=1024 * 1024) as scim:
        with pytest.raises(InvalidResponse, match="over 1048576 bytes") as raised:
            await scim.find("Users", "userName", "x")

    assert raised.value.ambiguous  # transient: asked again later, never taken as "no such user"
    assert server.sent < total / 4
    assert len(scim.history[-1].response_body or "") <= 2000


async def dripping(raw_server: Callable[[Writer], Awaitable[RawServer]], content_type: bytes) -> RawServer:
    """A server whose answer declares 1000 bytes of ``content_type`` and sends one every 20 ms."""

    async def drip(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b" ")
            await writer.drain()
            server.sent += 1
            await asyncio.sleep(0.02)

    server = await raw_server(drip)
    return server


async def test_a_target_dripping_its_answer_is_cut_off_by_the_deadline(
    raw_server: Callable[[Writer], Awaitable[RawServer]],
) -> None:
    """Each byte comes well within the read timeout; the whole answer never does."""

    server = await dripping(raw_server, b"application/scim+json")
    async with client_for(server.base_url, timeout=httpx.Timeout(5.0), deadline=0.3) as scim:
        with pytest.raises(TransientError, match="no complete answer within 0.3s") as raised:
            await scim.get("Users", "u1")

    # Like any timeout: retried (the policy allows one attempt here), and perhaps applied.
    assert raised.value.status is None and raised.value.ambiguous
    assert server.sent < 1000


async def test_the_deadline_is_the_longest_part_of_the_timeout() -> None:
    async with client_for("https://scim.example/v2", timeout=httpx.Timeout(30.0, connect=10.0)) as scim:
        assert scim.deadline == 30.0
    async with client_for("https://scim.example/v2", timeout=7.5) as scim:
        assert scim.deadline == 7.5


@respx.mock(base_url="https://scim.example/v2")
async def test_a_declared_length_over_the_cap_is_refused_before_reading(respx_mock: respx.MockRouter) -> None:
    respx_mock.get("/ServiceProviderConfig").mock(
        return_value=httpx.Response(200, headers={"Content-Length": str(50 * 1024 * 1024)}, content=b"{}")
    )

    async with client_for("https://scim.example/v2", max_response_bytes=1024) as scim:
        with pytest.raises(InvalidResponse, match="over 1024 bytes"):
            await scim.capabilities()


@respx.mock(base_url="https://scim.example/v2")
async def test_an_error_answer_over_the_cap_keeps_its_meaning(respx_mock: respx.MockRouter) -> None:
    respx_mock.get("/Users/u1").mock(return_value=httpx.Response(404, content=b"<html>" + b"x" * 5000))

    async with client_for("https://scim.example/v2", max_response_bytes=1024) as scim:
        with pytest.raises(NotFound) as raised:
            await scim.get("Users", "u1")

    assert len(raised.value.response_body or "") <= 2000


@respx.mock(base_url="https://scim.example/v2")
async def test_an_answer_within_the_cap_is_read_whole(respx_mock: respx.MockRouter) -> None:
    user = {"id": "u1", "userName": "ada", "title": "t" * 900}
    respx_mock.get("/Users/u1").mock(return_value=httpx.Response(200, json=user))

    async with client_for("https://scim.example/v2", max_response_bytes=1024) as scim:
        assert (await scim.get("Users", "u1")).resource == user


async def test_a_token_endpoint_dripping_its_answer_is_cut_off_too(
    raw_server: Callable[[Writer], Awaitable[RawServer]],
) -> None:
    server = await dripping(raw_server, b"application/json")
    tokens = OAuth2ClientCredentials(server.base_url + "/token", "client", "s3cret-value", timeout=httpx.Timeout(0.3),
                                     allow_insecure_http=True)  # fmt: skip
    async with tokens:
        with pytest.raises(TransientError, match="timed out"):
            await tokens.token()

    assert server.sent < 1000
