"""bench/serving's summary of repeated load passes: the median-p99 pass and the spread."""

from bench.serving import _spread_table, representative_runs, spread, sustainable


def _run(level: int, rps: float, p50: float, p99: float, **extra: float) -> dict:
    return {
        "concurrency": level,
        "requests": 100,
        "throughput_rps": rps,
        "e2e_ms": {"p50": p50, "p99": p99},
        **extra,
    }


def test_median_p99_pass_per_level_in_first_seen_order():
    runs = [
        _run(8, 190, 41.0, 70.0),
        _run(1, 90, 10.0, 17.0),
        _run(8, 210, 37.0, 60.0),
        _run(8, 170, 46.0, 80.0),
        _run(1, 95, 9.5, 16.0),
    ]
    picked = representative_runs(runs)
    assert [r["concurrency"] for r in picked] == [8, 1]
    assert picked[0]["e2e_ms"]["p99"] == 70.0  # the middle of 60, 70, 80
    assert picked[1]["e2e_ms"]["p99"] == 16.0  # of two passes, the lower p99


def test_a_pass_without_answers_is_never_the_representative_nor_in_the_spread():
    runs = [_run(8, 200, 40.0, 65.0), {"concurrency": 8, "requests": 0, "errors": 12}]
    assert representative_runs(runs)[0]["requests"] == 100
    rows = spread(runs)
    assert rows == [
        {"concurrency": 8, "passes": 1, "req_s": (200, 200), "p50_ms": (40.0, 40.0), "p99_ms": (65.0, 65.0)}
    ]


def test_spread_table_shows_min_and_max():
    rows = spread([_run(8, 170, 46.0, 80.0), _run(8, 210, 37.0, 60.0)])
    table = _spread_table(rows)
    assert "| 8 | 2 | 170 - 210 | 37.0 - 46.0 | 60.0 - 80.0 |" in table


def test_spread_shows_the_speed_probe_range_only_when_every_pass_has_one():
    slow, fast = _run(8, 170, 46.0, 80.0, speed_probe_ms=61.0), _run(8, 210, 37.0, 60.0, speed_probe_ms=48.0)
    rows = spread([slow, fast])
    assert rows[0]["probe_ms"] == (48.0, 61.0)
    table = _spread_table(rows)
    assert "| e2e p99 ms | probe ms |" in table
    assert "| 8 | 2 | 170 - 210 | 37.0 - 46.0 | 60.0 - 80.0 | 48 - 61 |" in table

    unprobed = spread([_run(8, 170, 46.0, 80.0, speed_probe_ms=61.0), _run(8, 210, 37.0, 60.0)])
    assert "probe_ms" not in unprobed[0]
    assert "probe ms" not in _spread_table(unprobed)


def _rate(rate: float, p99: float, requests: int = 1000, shed: int = 0, errors: int = 0) -> dict:
    return {"rate": rate, "requests": requests, "ok": requests - shed - errors, "shed": shed,
            "errors": errors, "latency_ms": {"p99": p99}}  # fmt: skip


def test_the_sustainable_rate_is_the_highest_within_the_p99_and_failure_bounds():
    runs = [_rate(25, 20.0), _rate(50, 30.0), _rate(100, 45.0, shed=2), _rate(150, 49.0), _rate(200, 80.0)]
    # 100 req/s shed 0.2% of its requests (over 0.1%); 150 keeps p99 <= 50 ms; 200 does not.
    assert sustainable(runs, 50.0)["rate"] == 150
    assert sustainable(runs, 25.0)["rate"] == 25
    assert sustainable([_rate(25, 60.0)], 50.0) is None
    assert sustainable([_rate(25, 10.0, requests=1000, errors=1)], 50.0)["rate"] == 25  # 0.1% allowed
