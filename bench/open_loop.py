"""Open-loop load: requests start on a schedule whatever the server does, from a light client.

A closed-loop client waits for each answer before it sends the next request, so a server that
stalls is simply sent less, and the stall never shows in the percentiles ("coordinated
omission"). Here each request has a time it is *due* (a fixed rate, or Poisson arrivals from a
seeded generator) and its latency is counted from that time, not from when it was sent: a
request that waited for a free connection, or behind a slow one, carries the wait.

The client is a small HTTP/1.1 client on asyncio (one thread, keep-alive connections in a
pool of at most ``connections``; a request waits for a free one when all are busy), because
the load shares the machine with the servers it measures: per request it costs a fraction
of what a thread per connection with ``httpx`` does, and it adds less tail latency of its
own. ``python -m bench.open_loop check`` measures that overhead against a trivial server.

Used by ``bench.soak`` (a fixed rate, a mix of endpoints) and by ``bench.serving --open-loop``
(Poisson arrivals at several rates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# A keep-alive connection idle this long is not reused: uvicorn closes idle ones after 5 s.
IDLE_LIMIT_S = 4.0
# The scheduler wakes this much before a request is due (asyncio's timers are good to ~1 ms);
# a request sent early is timed from when it was sent, one sent late from when it was due.
WAKE_EARLY_S = 0.001


def arrivals(rate: float, seconds: float, seed: int | None = None) -> list[float]:
    """Offsets (s from the start) of the requests due in ``[0, seconds)`` at ``rate`` a second.

    With a ``seed``, Poisson arrivals (exponential gaps, drawn by a seeded generator, so a rerun
    sends the same schedule); without, a fixed rate (one every ``1 / rate`` s).
    """
    if rate <= 0 or seconds <= 0:
        return []
    if seed is None:
        return [n / rate for n in range(math.ceil(seconds * rate))]
    import numpy as np

    rng = np.random.default_rng(seed)
    # Enough gaps for the window with room to spare (the mean plus 10 standard deviations).
    n = int(seconds * rate + 10 * math.sqrt(seconds * rate) + 10)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return offsets[offsets < seconds].tolist()


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """``p<q>`` for each of ``qs`` and ``max`` of ``values`` in ms (nearest rank), or {} when empty."""
    if not values:
        return {}
    v = sorted(values)

    def rank(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, int(round(q * len(v))) - 1))], 2)

    return {**{f"p{q}": rank(q / 100) for q in qs}, "max": round(v[-1], 2)}


@dataclass(frozen=True)
class Outcome:
    """One request: when it was due and timed from (``start``, s on ``perf_counter``), when its
    answer ended, its status (0: no answer), body, and the error's type name when it failed."""

    n: int
    due: float
    start: float
    done: float
    status: int
    body: bytes
    error: str | None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.start) * 1000


def http_request(
    method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """The bytes of one HTTP/1.1 request with a keep-alive connection (JSON body when given)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Conn:
    __slots__ = ("reader", "writer", "used")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.used = reader, writer, time.perf_counter()


class _Closed(Exception):
    """The server closed a reused keep-alive connection before answering: send again."""


class _Pool:
    """At most ``size`` keep-alive connections to one server, the most recently used first."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.slots = asyncio.Semaphore(size)
        self.idle: list[_Conn] = []

    async def exchange(self, data: bytes) -> tuple[int, bytes]:
        """Send one request and read its answer on a pooled connection: (status, body)."""
        async with self.slots:
            for _ in range(2):
                conn, reused = self._idle_conn(), True
                if conn is None:
                    conn, reused = _Conn(*await asyncio.open_connection(self.host, self.port)), False
                try:
                    status, body, keep = await _exchange(conn, data, reused)
                except _Closed:
                    conn.writer.close()
                    continue
                except BaseException:
                    conn.writer.close()
                    raise
                if keep:
                    conn.used = time.perf_counter()
                    self.idle.append(conn)
                else:
                    conn.writer.close()
                return status, body
            raise ConnectionResetError("the server closed the connection twice before answering")

    def _idle_conn(self) -> _Conn | None:
        now = time.perf_counter()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.used < IDLE_LIMIT_S and not conn.reader.at_eof():
                return conn
            conn.writer.close()
        return None

    def close(self) -> None:
        for conn in self.idle:
            conn.writer.close()
        self.idle.clear()


async def _exchange(conn: _Conn, data: bytes, reused: bool) -> tuple[int, bytes, bool]:
    """One request and its answer: status, body, and whether the connection stays open."""
    try:
        conn.writer.write(data)
        head = await conn.reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
        partial = getattr(e, "partial", b"")
        if reused and not partial:
            raise _Closed() from None
        raise
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    connection = headers.get("connection", "").lower()
    # HTTP/1.1 keeps a connection open unless told otherwise; HTTP/1.0 only when told to.
    keep = connection == "keep-alive" if lines[0].startswith("HTTP/1.0") else connection != "close"
    if "content-length" in headers:
        body = await conn.reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while size := int((await conn.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await conn.reader.readexactly(size))
            await conn.reader.readexactly(2)
        await conn.reader.readuntil(b"\r\n")  # the end: no trailers are sent here
        body = b"".join(parts)
    else:
        body, keep = await conn.reader.read(), False
    return status, body, keep


async def _drive(
    url: str,
    schedule: Sequence[float],
    make: Callable[[int], bytes],
    connections: int,
    timeout: float,
    marks: Sequence[tuple[float, Callable[[], None]]],
) -> tuple[list[Outcome], float]:
    target = urlsplit(url)
    pool = _Pool(target.hostname or "127.0.0.1", target.port or 80, connections)
    outcomes: list[Outcome | None] = [None] * len(schedule)
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.05

    async def one(n: int, due: float) -> None:
        sent = time.perf_counter()
        begin = min(due, sent)
        data = make(n)
        try:
            async with asyncio.timeout(timeout):
                status, body = await pool.exchange(data)
            outcomes[n] = Outcome(n, due, begin, time.perf_counter(), status, body, None)
        except Exception as e:  # noqa: BLE001 - every failure is an outcome, by its type
            outcomes[n] = Outcome(n, due, begin, time.perf_counter(), 0, b"", type(e).__name__)

    async def marker() -> None:
        for offset, call in sorted(marks, key=lambda m: m[0]):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            call()

    tasks = [loop.create_task(marker())]
    for n, offset in enumerate(schedule):
        due = start + offset
        delay = due - time.perf_counter()
        if delay > WAKE_EARLY_S:
            await asyncio.sleep(delay - WAKE_EARLY_S)
        tasks.append(loop.create_task(one(n, due)))
    await asyncio.gather(*tasks)
    pool.close()
    return [o for o in outcomes if o is not None], start


def drive(
    url: str,
    schedule: Sequence[float],
    make: Callable[[int], bytes],
    connections: int = 64,
    timeout: float = 10.0,
    marks: Sequence[tuple[float, Callable[[], None]]] = (),
) -> tuple[list[Outcome], float]:
    """Send request ``n`` (the bytes ``make(n)`` returns) when ``schedule[n]`` s have passed.

    Args:
        url: the server (scheme, host and port are read; paths come with each request).
        schedule: offsets in seconds from the start, ascending (``arrivals``).
        make: the bytes of request ``n`` (``http_request``), built when it is sent.
        connections: at most this many connections at once; a request waits for a free one.
        timeout: seconds from a request's send to its whole answer.
        marks: ``(offset, call)`` pairs: each ``call()`` runs at its offset (e.g. reading the
            servers' CPU counters at the edges of a measured window).

    Returns:
        Every request's ``Outcome`` (in the order they were due) and ``perf_counter`` at the start.
    """
    run = _drive(url, schedule, make, connections, timeout, marks)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run)
    return uvloop.run(run)


def sampler(into: list[Any], read: Callable[[], Any]) -> Callable[[], None]:
    """A mark's call (``drive``'s ``marks``) that appends ``read()`` to ``into``."""
    return lambda: into.append(read())


# --- the client's own overhead --------------------------------------------------------------

ECHO_BODY = json.dumps(
    {"items": [{"item_id": f"i{n:06d}", "score": 0.5, "reason": "x" * 60} for n in range(10)]}
)


def echo_server(port: int) -> None:
    """A trivial HTTP/1.1 server (asyncio) answering every request with a fixed JSON body of the
    size of a recommendation: what is left of a request's latency is the client's and loopback's."""
    body = ECHO_BODY.encode()
    answer = (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(h.split(b":", 1)[1])
                        for h in head.split(b"\r\n")
                        if h.lower().startswith(b"content-length")
                    ),
                    0,
                )
                if length:
                    await reader.readexactly(length)
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def client_check(
    rates: Sequence[float], seconds: float, seed: int, connections: int, warmup: float = 1.0
) -> list[dict[str, Any]]:
    """The client against ``echo_server`` (in its own process) at each rate: latency and the
    client's CPU per request, i.e. what the load generator itself adds to a measurement."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.open_loop", "echo", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}"
        data = http_request("POST", "/v1/recommendations", f"127.0.0.1:{port}", b'{"user_id": "u1", "k": 10}')
        rows = []
        for rate in rates:
            cpu: list[float] = []
            window = [(at, sampler(cpu, time.process_time)) for at in (warmup, warmup + seconds)]
            outcomes, start = drive(
                url, arrivals(rate, warmup + seconds, seed), lambda n: data, connections, marks=window
            )
            measured = [o for o in outcomes if o.due - start >= warmup]
            ok = [o.latency_ms for o in measured if o.status == 200]
            rows.append(
                {
                    "rate": rate,
                    "requests": len(measured),
                    "errors": len(measured) - len(ok),
                    "latency_ms": percentiles(ok, (50, 90, 99)),
                    "client_cpu_ms_per_request": round((cpu[1] - cpu[0]) * 1000 / max(len(measured), 1), 3),
                }
            )
        return rows
    finally:
        server.terminate()
        server.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["check", "echo"])
    p.add_argument("--rates", default="25,50,100,150,200,300")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    if args.mode == "echo":
        echo_server(args.port)
        return 0
    load = os.getloadavg()[0]
    rows = client_check([float(r) for r in args.rates.split(",")], args.seconds, args.seed, args.connections)
    print(f"load before {load:.2f}, after {os.getloadavg()[0]:.2f}")
    print("| rate | requests | errors | p50 ms | p90 ms | p99 ms | max ms | client CPU ms/request |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        lat = r["latency_ms"]
        print(
            f"| {r['rate']:.0f} | {r['requests']} | {r['errors']} | {lat.get('p50', 0):.2f} | "
            f"{lat.get('p90', 0):.2f} | {lat.get('p99', 0):.2f} | {lat.get('max', 0):.2f} | "
            f"{r['client_cpu_ms_per_request']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
