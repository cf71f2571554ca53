"""bench/open_loop: seeded schedules, latency from the time a request was due, a light client.

The client is driven against stub servers on loopback (threads of ``http.server``): one that
keeps connections alive (HTTP/1.1) and can stall a request, one that closes each (HTTP/1.0).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.open_loop import arrivals, drive, http_request, percentiles

STALL_S = 0.3


def test_poisson_arrivals_are_seeded_and_fixed_ones_even() -> None:
    a, b, c = arrivals(100, 20, seed=1), arrivals(100, 20, seed=1), arrivals(100, 20, seed=2)
    assert a == b and a != c  # a rerun sends the same schedule
    assert a == sorted(a) and 0 < a[0] and a[-1] < 20
    # 2000 expected; Poisson's standard deviation is sqrt(2000) ~ 45.
    assert abs(len(a) - 2000) < 5 * 45
    assert arrivals(4, 1) == [0.0, 0.25, 0.5, 0.75]
    assert arrivals(0, 10) == [] and arrivals(10, 0, seed=1) == []


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values, (50, 90, 99)) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {}


class _KeepAlive(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stall"):
            time.sleep(STALL_S)
        data = json.dumps({"n": body["n"], "client": self.client_address[1]}).encode()
        self.send_response(503 if body.get("shed") else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class _Closing(_KeepAlive):
    protocol_version = "HTTP/1.0"


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def keep_alive_url() -> Iterator[str]:
    yield from _serve(_KeepAlive)


@pytest.fixture(scope="module")
def closing_url() -> Iterator[str]:
    yield from _serve(_Closing)


def _requests(url: str, bodies: list[dict]) -> list[bytes]:
    host = url.removeprefix("http://")
    return [
        http_request("POST", "/x", host, json.dumps({"n": n, **b}).encode()) for n, b in enumerate(bodies)
    ]


def test_a_stall_shows_in_the_latency_of_the_requests_due_behind_it(keep_alive_url: str) -> None:
    # One connection: request 0 stalls; 1 and 2 are due 10 and 20 ms later and wait for it.
    # A closed-loop client would time them from their send (~0 ms); here they carry the wait.
    data = _requests(keep_alive_url, [{"stall": True}, {}, {}])
    outcomes, start = drive(keep_alive_url, [0.0, 0.01, 0.02], data.__getitem__, connections=1)
    assert [o.status for o in outcomes] == [200, 200, 200]
    late = [o.latency_ms for o in outcomes[1:]]
    assert all(ms >= (STALL_S - 0.03) * 1000 for ms in late), late
    assert all(abs(o.due - start - off) < 1e-9 for o, off in zip(outcomes, [0.0, 0.01, 0.02], strict=True))
    # The three went over one kept-alive connection.
    assert len({json.loads(o.body)["client"] for o in outcomes}) == 1


def test_statuses_bodies_and_closed_connections(keep_alive_url: str, closing_url: str) -> None:
    data = _requests(keep_alive_url, [{}, {"shed": True}, {}])
    outcomes, _ = drive(keep_alive_url, [0.0, 0.0, 0.0], data.__getitem__, connections=4)
    assert [(o.status, json.loads(o.body)["n"]) for o in outcomes] == [(200, 0), (503, 1), (200, 2)]
    # A server that closes every connection (HTTP/1.0): each request gets a fresh one.
    data = _requests(closing_url, [{}] * 5)
    outcomes, _ = drive(closing_url, [0.0, 0.01, 0.02, 0.03, 0.04], data.__getitem__, connections=1)
    assert [o.status for o in outcomes] == [200] * 5 and all(o.error is None for o in outcomes)


def test_a_server_that_is_not_there_is_an_error_outcome_not_an_exception() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        outcomes, _ = drive(url, [0.0], lambda n: b"GET / HTTP/1.1\r\n\r\n", timeout=2.0)
    assert outcomes[0].status == 0 and outcomes[0].error == "ConnectionRefusedError"
