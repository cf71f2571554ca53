"""bench/soak's bounds: the bands it parses, the checks it reports, the exit status it gives.

The end-to-end cases drive a stub gateway on loopback (a thread of ``http.server``) that
answers every known user from ``retrieval`` and every other id from ``global_popularity``
with ``cold_start`` set, as the real gateway answers a user no store has a row for.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.soak import NEW_USER_PREFIX, check_bounds, main, parse_band, parse_source_band


def test_bands_parse_and_bad_ones_are_refused():
    assert parse_band("0.6:1") == (0.6, 1.0)
    assert parse_source_band("global_popularity=0:0.05") == ("global_popularity", (0.0, 0.05))
    for bad in ("0.6", "0.8:0.6", "0:1.5", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_band(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_source_band("0.6:1.0")


def _result(errors: dict[str, int] | None = None) -> dict:
    return {
        "errors": errors or {},
        "candidate_source_shares": {"retrieval": 0.7, "segment_popularity": 0.3},
        "cold_start_share": 0.0,
        "latency_ms": {"recommendations": {"p50": 20.0, "p99": 400.0}},
    }


def test_each_broken_bound_is_named_and_a_source_never_seen_has_share_zero():
    bounds = check_bounds(
        _result({"recommendations:503": 2}),
        {"retrieval": (0.8, 1.0), "segment_popularity": (0.0, 0.5), "cold_start": (0.01, 0.1)},
        cold_start=(0.0, 0.05),
        max_p99_ms=300,
    )
    broken = [b["violation"] for b in bounds if not b["ok"]]
    assert broken == [
        "2 errors: {'recommendations:503': 2}",
        "share of candidate source retrieval is 0.7000, outside [0.8, 1]",
        "share of candidate source cold_start is 0.0000, outside [0.01, 0.1]",
        "recommendations p99 is 400.0 ms, over 300 ms",
    ]
    # Without bounds given, zero errors is still checked.
    assert [b["bound"] for b in check_bounds(_result())] == ["errors == 0"]


class _Gateway(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = {}
        if self.path == "/v1/recommendations":
            new = body["user_id"].startswith(NEW_USER_PREFIX)
            out = {
                "arm": "stable",
                "candidate_source": "global_popularity" if new else "retrieval",
                "cold_start": new,
                "fallback": [],
            }
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _soak(url: str, out: Path, *bounds: str) -> int:
    args = ["--url", url, "--rps", "400", "--seconds", "1", "--workers", "4", "--new-user-fraction", "0.25"]
    return main([*args, "--out", str(out), *bounds])


def test_soak_reports_shares_and_passes_bounds_that_hold(gateway_url: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "soak.json"
    sources = ["--expect-source", "retrieval=0.6:0.9", "--expect-source", "global_popularity=0.1:0.4"]
    code = _soak(gateway_url, out, *sources, "--expect-cold-start", "0.1:0.4", "--max-p99-ms", "5000")
    result = json.loads(out.read_text())
    assert code == 0, result["violations"]
    kinds = result["requests_by_kind"]
    # One request in ten is an event; about a quarter of the rest ask for a new user.
    assert kinds["events"] == 40 and kinds["known_users"] + kinds["new_users"] == 360
    shares = result["candidate_source_shares"]
    assert shares["global_popularity"] == result["cold_start_share"] == round(kinds["new_users"] / 360, 4)
    assert [b["ok"] for b in result["bounds"]] == [True] * 5
    assert capsys.readouterr().err == ""


def test_soak_exits_non_zero_naming_each_broken_bound(gateway_url: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "soak.json"
    code = _soak(gateway_url, out, "--expect-source", "retrieval=0.95:1", "--expect-cold-start", "0:0.01")
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("soak: bound broken: share of ") for line in err)
    assert "candidate source retrieval" in err[0] and "cold-start answers" in err[1]
    assert json.loads(out.read_text())["violations"] == [e.removeprefix("soak: bound broken: ") for e in err]
