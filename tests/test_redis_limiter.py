"""The RESP client of the Redis rate-limit backend (`weft.redis_limiter`) against a scripted
server on a trio memory stream: encoding, replies, pipelining, a caller that gives up."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from weft.redis_limiter import RedisError, RespConnection, encode, parse_url


def test_commands_are_arrays_of_bulk_strings_and_urls_are_checked():
    assert encode(b"GET", "k", 5) == b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    assert parse_url("redis://10.0.0.1:6390/3") == ("10.0.0.1", 6390, 3)
    assert parse_url("redis://localhost") == ("localhost", 6379, 0)
    with pytest.raises(ValueError):
        parse_url("http://localhost")


async def serve(stream: trio.abc.Stream, replies: list[tuple[float, bytes]]) -> None:
    """Answer each command (one per read: the client sends one write per call) after a
    delay, in order."""
    buf = b""
    for delay, reply in replies:
        while buf.count(b"*") < 1:
            buf += await stream.receive_some(4096)
        # drop one command from the buffer (all commands here are short and whole)
        n = int(buf[1 : buf.index(b"\r\n")])
        parts = buf.split(b"\r\n")
        buf = b"\r\n".join(parts[1 + 2 * n :])
        await trio.sleep(delay)
        await stream.send_all(reply)


async def test_replies_of_every_type_come_back_in_order_to_concurrent_callers():
    client, server = trio.testing.memory_stream_pair()
    conn = RespConnection(client)
    replies = [
        (0.0, b"+OK\r\n"),
        (0.0, b":42\r\n"),
        (0.0, b"$3\r\nabc\r\n"),
        (0.0, b"*2\r\n:1\r\n$-1\r\n"),
        (0.0, b"-ERR nope\r\n"),
    ]
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        try:
            results[i] = await conn.call(b"PING", i)
        except RedisError as e:
            results[i] = str(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, server, replies)
            for i in range(5):
                nursery.start_soon(one, i)
                await trio.sleep(0.001)
    assert results == {0: b"OK", 1: 42, 2: b"abc", 3: [1, None], 4: "ERR nope"}
    assert conn.broken is None  # an error reply leaves the connection in step


async def test_a_caller_that_gives_up_leaves_the_connection_in_step():
    client, server = trio.testing.memory_stream_pair()
    conn = RespConnection(client)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, server, [(0.2, b":1\r\n"), (0.0, b":2\r\n")])
            with trio.move_on_after(0.05):
                await conn.call(b"SLOW")
            assert await conn.call(b"NEXT") == 2  # the late :1 was read and dropped
    assert conn.broken is None


async def test_when_the_reader_gives_up_another_caller_takes_over_reading():
    client, server = trio.testing.memory_stream_pair()
    conn = RespConnection(client)
    got: list[object] = []

    async def impatient() -> None:
        with trio.move_on_after(0.05):
            await conn.call(b"FIRST")  # the reader, until it gives up at 0.05 s

    async def patient() -> None:
        got.append(await conn.call(b"SECOND"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, server, [(0.2, b":1\r\n"), (0.0, b":2\r\n")])
            nursery.start_soon(impatient)
            await trio.sleep(0.001)
            nursery.start_soon(patient)
    assert got == [2] and conn.broken is None
