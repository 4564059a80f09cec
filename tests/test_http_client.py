"""The bench's lean HTTP client against a real aiohttp server: keep-alive, close, timeouts."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from imgsearch_tools.bench.http_client import HttpClient


async def serve(handler):
    app = web.Application()
    app.router.add_post("/echo", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def test_replies_come_back_over_reused_connections():
    peers = set()

    async def echo(request):
        peers.add(request.transport.get_extra_info("peername"))
        body = await request.json()
        return web.json_response({"got": body, "auth": request.headers.get("Authorization")})

    async def main():
        runner, port = await serve(echo)
        client = HttpClient(f"http://127.0.0.1:{port}/echo")
        try:
            request = client.request_bytes(b'{"n": 1}', {"Authorization": "Bearer t"})
            replies = [await client.send(request, timeout=5) for _ in range(5)]
            together = await asyncio.gather(*(client.send(request, 5) for _ in range(4)))
        finally:
            client.close()
            await runner.cleanup()
        return replies + list(together)

    replies = asyncio.run(main())
    assert {status for status, _ in replies} == {200}
    assert json.loads(replies[0][1]) == {"got": {"n": 1}, "auth": "Bearer t"}
    # One connection for the five in a row, at most four for the four at once.
    assert 1 <= len(peers) <= 4


def test_errors_closed_connections_and_timeouts():
    async def handler(request):
        if request.headers.get("X-Mode") == "slow":
            await asyncio.sleep(2)
        if request.headers.get("X-Mode") == "close":
            return web.Response(status=404, text="gone", headers={"Connection": "close"})
        return web.json_response({"ok": True})

    async def main():
        runner, port = await serve(handler)
        client = HttpClient(f"http://127.0.0.1:{port}/echo")
        try:
            closing = await client.send(client.request_bytes(b"{}", {"X-Mode": "close"}), 5)
            assert client.idle == []  # the server closed it: not kept
            fine = await client.send(client.request_bytes(b"{}"), 5)
            with pytest.raises(TimeoutError):
                await client.send(client.request_bytes(b"{}", {"X-Mode": "slow"}), 0.2)
            after = await client.send(client.request_bytes(b"{}"), 5)
        finally:
            client.close()
            await runner.cleanup()
        return closing, fine, after

    closing, fine, after = asyncio.run(main())
    assert closing == (404, b"gone")
    assert fine[0] == after[0] == 200
