"""Validation on a generated drop with each corruption injected: caught, reasoned, conserved.

On pandas and, the same drop again, on Spark (GX's Spark data source): same verdicts, same rows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.validation import BadFractionError, TableRuleError, validate_data
from recsys.config import SparkConfig, ValidationConfig
from tests.support.paths import REPO
from tests.support.tiny_data import TINY_END

pytestmark = pytest.mark.integration


def _load(raw: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(raw / t) for t in ("users", "items", "events")}


def _write(frames: dict[str, pd.DataFrame], out: Path) -> Path:
    for name, df in frames.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        df.to_parquet(out / name / "part-0.parquet", index=False)
    return out


def _quarantine(out: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(out / "quarantine" / table)


@pytest.fixture(scope="module")
def corrupted(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory):
    """One drop carrying every row-level corruption, each at known rows."""
    f = _load(tiny_raw)
    users, items, events = f["users"].copy(), f["items"].copy(), f["events"].copy()
    expect: dict[tuple[str, str], str] = {}  # (table, key) -> rule

    # users: a null id, an id with spaces, an unknown age bucket, a duplicate id
    users = users.astype({"age_bucket": object, "user_id": object})
    users.loc[0, "user_id"] = None
    users.loc[1, "user_id"] = "bad id"
    expect[("users", "bad id")] = "id_format"
    users.loc[2, "age_bucket"] = "ancient"
    expect[("users", users.loc[2, "user_id"])] = "allowed_values"
    dup_user = users.iloc[[3]].copy()
    dup_user["country"] = "XX"  # a second row under an id already seen
    users = pd.concat([users, dup_user], ignore_index=True)
    # items: an empty title and a published time in the future
    items.loc[0, "title"] = ""
    expect[("items", items.loc[0, "item_id"])] = "empty_value"
    items.loc[1, "published_ts"] = pd.Timestamp(TINY_END) + pd.Timedelta(days=30)
    expect[("items", items.loc[1, "item_id"])] = "future_timestamp"

    # events: timestamps as text, so one can fail to parse; values as text too
    events = events.astype({"ts": object, "value": object, "event_type": object, "device": object})
    events["ts"] = [t.isoformat() for t in events["ts"]]
    events["value"] = [None if pd.isna(v) else str(v) for v in events["value"]]
    first_user_events = set(events.index[events["user_id"] == users.loc[0, "user_id"]])
    rows = [i for i in range(10, 400, 3) if i not in first_user_events]
    inject = {
        "type_ts": ("ts", "not-a-date", "type"),
        "type_value": ("value", "abc", "type"),
        "null_item": ("item_id", None, "not_null"),
        "event_type": ("event_type", "teleport", "allowed_values"),
        "device": ("device", "fridge", "allowed_values"),
        "unknown_user": ("user_id", "u-nobody", "unknown_user"),
        "unknown_item": ("item_id", "i-nothing", "unknown_item"),
        "future": (
            "ts",
            (pd.Timestamp(TINY_END) + pd.Timedelta(days=3)).isoformat(),
            "future_timestamp",
        ),
    }
    for row, (column, value, rule) in zip(rows, inject.values(), strict=False):
        events.loc[row, column] = value
        expect[("events", events.loc[row, "event_id"])] = rule
    r_rating, r_view = rows[len(inject)], rows[len(inject) + 1]
    events.loc[r_rating, ["event_type", "value"]] = ["rating", "9.0"]
    expect[("events", events.loc[r_rating, "event_id"])] = "value_range"
    events.loc[r_view, ["event_type", "value"]] = ["view", "-5.0"]
    expect[("events", events.loc[r_view, "event_id"])] = "value_range"
    # A resent event (same id) and a double-logged one (same content, new id).
    resent = events.iloc[[500]].copy()
    double = events.iloc[[501]].copy()
    double["event_id"] = "e-double"
    expect[("events", "e-double")] = "duplicate_event"
    events = pd.concat([events, resent, double], ignore_index=True)

    out_raw = _write(
        {"users": users, "items": items, "events": events}, tmp_path_factory.mktemp("bad") / "raw"
    )
    return out_raw, expect, {"users": len(users), "items": len(items), "events": len(events)}


@pytest.fixture(scope="module")
def validated(corrupted, tmp_path_factory):
    raw, expect, sizes = corrupted
    out = tmp_path_factory.mktemp("val") / "validated"
    manifest = validate_data(ValidationConfig(max_bad_fraction=0.5), raw, out, as_of=TINY_END)
    return out, manifest, expect, sizes


def test_spark_engine_gives_the_same_verdicts_and_quarantine(corrupted, validated, tmp_path):
    """The suites on Spark DataFrames (GX's Spark data source) decide every row as on pandas."""
    raw, *_ = corrupted
    pandas_out, pandas_manifest, *_ = validated
    out = tmp_path / "validated"
    config = ValidationConfig(max_bad_fraction=0.5, engine="spark")
    manifest = validate_data(config, raw, out, as_of=TINY_END, spark=SparkConfig())
    assert manifest["status"] == pandas_manifest["status"] == "passed"
    assert manifest["engine"] == "spark" and pandas_manifest["engine"] == "pandas"
    assert manifest["tables"] == pandas_manifest["tables"]
    for table in ("users", "items", "events"):
        key = {"users": "user_id", "items": "item_id", "events": "event_id"}[table]
        for part in (table, f"quarantine/{table}"):
            a, b = (pd.read_parquet(o / part) for o in (pandas_out, out))
            order = [key, "rule"] if part.startswith("quarantine") else [key]
            pd.testing.assert_frame_equal(
                a.sort_values(order, ignore_index=True), b.sort_values(order, ignore_index=True), obj=part
            )
    # The comparison has something to compare: every kind of rule quarantined rows.
    assert len(manifest["tables"]["events"]["quarantine_by_rule"]) >= 6


def test_spark_engine_fails_a_bad_drop_as_pandas_does(tiny_raw, tmp_path):
    f = _load(tiny_raw)
    f["events"] = f["events"].assign(device="fridge")  # every row breaks allowed_values
    raw = _write(f, tmp_path / "raw")
    with pytest.raises(BadFractionError, match="rule allowed_values on column 'device'"):
        validate_data(ValidationConfig(engine="spark"), raw, tmp_path / "out", as_of=TINY_END)


def test_every_corruption_is_caught_with_its_rule(validated):
    out, _, expect, _ = validated
    q = {t: _quarantine(out, t) for t in ("users", "items", "events")}
    keys = {"users": "user_id", "items": "item_id", "events": "event_id"}
    for (table, key), rule in expect.items():
        hits = q[table][q[table][keys[table]] == key]
        assert len(hits) >= 1, f"{table} {key} should be quarantined for {rule}"
        assert rule in set(hits["rule"]), (
            f"{table} {key}: expected {rule}, got {hits[['rule', 'reason']]}"
        )
    # The null user id is quarantined as not_null, and the events of that user follow it
    # as unknown_user: nothing refers to a row that was not accepted.
    assert "not_null" in set(q["users"]["rule"])
    assert {"duplicate_id", "duplicate_event", "type", "value_range"} <= set(q["events"]["rule"])


def test_reasons_name_field_and_value(validated):
    out, *_ = validated
    reasons = " | ".join(_quarantine(out, "events")["reason"])
    assert "ts='not-a-date' is not a timestamp" in reasons
    assert "event_type='teleport' not in" in reasons
    assert "value=9.0 outside [0.5, 5.0] for event_type=rating" in reasons
    assert "user_id='u-nobody' is not an accepted row of users" in reasons


def test_nothing_is_lost_counts_add_up(validated):
    out, manifest, _, sizes = validated
    for table, n in sizes.items():
        t = manifest["tables"][table]
        accepted = pd.read_parquet(out / table)
        quarantined = _quarantine(out, table)
        assert t["input"] == n
        assert t["accepted"] == len(accepted) and t["quarantined"] == len(quarantined)
        assert len(accepted) + len(quarantined) == n
        # The quarantine keeps the row as it came (all its columns) plus rule and reason.
        assert {"rule", "reason"} <= set(quarantined.columns)
    # Duplicates keep their first occurrence: every accepted id is unique.
    assert pd.read_parquet(out / "events")["event_id"].is_unique
    assert pd.read_parquet(out / "users")["user_id"].is_unique


def test_accepted_rows_follow_the_contract(validated):
    out, manifest, *_ = validated
    ev = pd.read_parquet(out / "events")
    assert str(ev["ts"].dtype) == "datetime64[us, UTC]"
    assert ev["value"].dtype == np.float64
    assert set(ev["user_id"]) <= set(pd.read_parquet(out / "users")["user_id"])
    assert Path(manifest["report"]).is_file() and manifest["report"].endswith("summary.html")
    assert Path(manifest["data_docs"]).is_file() and manifest["data_docs"].endswith("index.html")
    summary = Path(manifest["report"]).read_text()
    assert "PASSED" in summary and "duplicate_event" in summary and "teleport" in summary
    assert manifest["status"] == "passed"


def test_missing_column_stops_the_run_naming_table_column_rule(tiny_raw, tmp_path):
    f = _load(tiny_raw)
    f["items"] = f["items"].drop(columns=["in_stock"])
    raw = _write(f, tmp_path / "raw")
    with pytest.raises(
        TableRuleError, match=r"table items: column 'in_stock' breaks rule columns_present"
    ):
        validate_data(ValidationConfig(), raw, tmp_path / "out", as_of=TINY_END)
    assert (tmp_path / "out" / "report" / "index.html").is_file()
    assert not (tmp_path / "out" / "items").exists()


def test_unexpected_column_refused_or_dropped_by_config(tiny_raw, tmp_path):
    f = _load(tiny_raw)
    f["users"]["favourite_colour"] = "blue"
    raw = _write(f, tmp_path / "raw")
    with pytest.raises(
        TableRuleError, match=r"users: column 'favourite_colour' breaks rule no_unexpected"
    ):
        validate_data(ValidationConfig(), raw, tmp_path / "out", as_of=TINY_END)
    m = validate_data(
        ValidationConfig(allow_unexpected_columns=True), raw, tmp_path / "out2", as_of=TINY_END
    )
    assert m["tables"]["users"]["dropped_columns"] == ["favourite_colour"]
    assert "favourite_colour" not in pd.read_parquet(tmp_path / "out2" / "users").columns


def test_integer_ids_from_a_foreign_drop_are_accepted_as_strings(tiny_raw, tmp_path):
    f = _load(tiny_raw)
    mapping = {u: i for i, u in enumerate(f["users"]["user_id"])}
    f["users"]["user_id"] = f["users"]["user_id"].map(mapping).astype("int64")
    f["events"]["user_id"] = f["events"]["user_id"].map(mapping).astype("int64")
    raw = _write(f, tmp_path / "raw")
    m = validate_data(ValidationConfig(), raw, tmp_path / "out", as_of=TINY_END)
    assert m["tables"]["events"]["quarantined"] == 0
    assert pd.read_parquet(tmp_path / "out" / "users")["user_id"].iloc[0].isdigit()


def test_bad_fraction_above_threshold_fails_but_keeps_quarantine(tiny_raw, tmp_path):
    f = _load(tiny_raw)
    ev = f["events"].astype({"device": object})
    ev.loc[: len(ev) // 5, "device"] = "toaster"  # 20% bad, threshold 5%
    f["events"] = ev
    raw = _write(f, tmp_path / "raw")
    with pytest.raises(
        BadFractionError, match=r"table events: .*rule allowed_values on column 'device'"
    ):
        validate_data(
            ValidationConfig(max_bad_fraction=0.05), raw, tmp_path / "out", as_of=TINY_END
        )
    assert len(_quarantine(tmp_path / "out", "events")) == len(ev) // 5 + 1
    assert not (tmp_path / "out" / "events").exists()  # nothing published downstream
    assert '"status": "failed"' in (tmp_path / "out" / "manifest.json").read_text()
    assert "FAILED: table events" in (tmp_path / "out" / "report" / "summary.html").read_text()


def test_cli_exits_nonzero_with_the_reason(tiny_raw, tmp_path):
    f = _load(tiny_raw)
    f["events"] = f["events"].drop(columns=["session_id"])
    raw = _write(f, tmp_path / "raw")
    proc = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "recsys"),
            "validate",
            "--data",
            str(raw),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "RECSYS_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)},
    )
    assert proc.returncode == 1
    assert (
        "events" in proc.stderr and "session_id" in proc.stderr and "columns_present" in proc.stderr
    )


def test_rerun_is_idempotent(tiny_raw, tmp_path):
    a = validate_data(ValidationConfig(), tiny_raw, tmp_path / "a", as_of=TINY_END)
    b = validate_data(ValidationConfig(), tiny_raw, tmp_path / "a", as_of=TINY_END)
    assert a["tables"] == b["tables"]
    shutil.rmtree(tmp_path / "a")
