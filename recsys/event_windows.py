"""Trailing-window counts over an event table, as the change rows a point-in-time join needs.

The transformations of the feature repo's ``BatchFeatureView``s call this: Feast runs them
on materialization (its compute engine, local or Spark) and training data runs the same
registered transformation (``components.features.training_data``), so both read one rule.

A count over a trailing window W, at time s, counts the entity's events with ``ts`` in
``(s - W, s]``. As a function of s it changes only at an event's time (it enters) and W
later (it leaves), so a row at each of those instants is exact: the latest row stamped at
or before any t carries the value at t, both in Feast's point-in-time join and as the
online store's latest row. An entity that goes quiet gets a row of zeros W after its last
event instead of keeping its last busy value, and with ``ttl`` equal to the largest window
no row with a non-zero value can expire before it is replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

TIMESTAMP = "event_timestamp"


def trailing_counts(
    events: Any,
    key: str,
    counts: Mapping[str, Callable[[pd.DataFrame], Any]],
    windows: Mapping[str, timedelta],
    rates: Mapping[str, tuple[str, str]] | None = None,
) -> Any:
    """Per ``key``, the counts of ``counts`` over each of ``windows``, one row per change.

    Rows are stamped at each event's ``event_timestamp`` and at that time plus each window,
    up to the latest event of ``events``: nothing is stamped after what the table knows, so
    the online store never holds a row from the future. The counts at a row are complete
    when ``events`` holds every event of the largest window before it; the whole table
    (training data) or a read starting two windows before the interval (materialization)
    does.

    Feast's local engine hands a transformation a pandas frame, its Spark engine a Spark
    DataFrame: this takes either and returns the same kind (on Spark, per key in pandas,
    with ``applyInPandas``).

    Args:
        events: rows with ``key`` and ``event_timestamp`` (Feast's column of the source).
        key: the entity's join key column.
        counts: metric name -> function of an events frame (pandas) giving each event's
            weight (a boolean mask or a number); the output column is
            ``{prefix}_{metric}_{window}``, the prefix being ``key`` without ``_id``
            (``user_events_1h``).
        windows: window name -> length (``{"1h": timedelta(hours=1)}``).
        rates: output name -> (numerator metric, denominator metric), per window
            (``{"positive_rate": ("positives", "events")}``): 0.0 where the denominator is 0.

    Returns:
        Columns ``key``, ``event_timestamp``, then the counts (int64) and rates (float32) by
        window, sorted by key and time; at most one row per (key, time).
    """
    prefix = key.removesuffix("_id")
    rates = dict(rates or {})
    names = [f"{prefix}_{m}_{w}" for w in windows for m in counts]
    names += [f"{prefix}_{r}_{w}" for w in windows for r in rates]
    if isinstance(events, pd.DataFrame):
        return _counts(events, key, counts, windows, rates, prefix, names, None)
    return _spark_counts(events, key, counts, windows, rates, prefix, names)


def _spark_counts(
    events: Any,
    key: str,
    counts: Mapping[str, Callable[[pd.DataFrame], Any]],
    windows: Mapping[str, timedelta],
    rates: Mapping[str, tuple[str, str]],
    prefix: str,
    names: list[str],
) -> Any:
    from pyspark.sql import functions as F  # noqa: N812

    # Every key's rows stop at the table's latest event, as on the local engine (epoch
    # microseconds: independent of the session's time zone).
    last = events.agg(F.unix_micros(F.max(TIMESTAMP))).first()[0]
    cap = None if last is None else pd.Timestamp(last, unit="us", tz="UTC")
    rate_names = {f"{prefix}_{r}_{w}" for w in windows for r in rates}
    columns = [f"{n} {'float' if n in rate_names else 'long'}" for n in names]
    schema = ", ".join([f"{key} string", f"{TIMESTAMP} timestamp", *columns])

    def one_key(frame: pd.DataFrame) -> pd.DataFrame:
        return _counts(frame, key, counts, windows, rates, prefix, names, cap)

    return events.groupBy(key).applyInPandas(one_key, schema=schema)


def _counts(
    events: pd.DataFrame,
    key: str,
    counts: Mapping[str, Callable[[pd.DataFrame], Any]],
    windows: Mapping[str, timedelta],
    rates: Mapping[str, tuple[str, str]],
    prefix: str,
    names: list[str],
    cap: pd.Timestamp | None,
) -> pd.DataFrame:
    """``trailing_counts`` on a pandas frame; rows up to ``cap`` (default: its latest event)."""
    if events.empty:
        out = pd.DataFrame({key: pd.Series(dtype=object), TIMESTAMP: pd.Series(dtype="datetime64[ns, UTC]")})
        return out.assign(**{n: pd.Series(dtype=np.int64) for n in names})
    t = pd.DatetimeIndex(pd.to_datetime(events[TIMESTAMP], utc=True)).as_unit("ns").asi8
    codes, uniques = pd.factorize(events[key].astype(str))
    lengths = {w: pd.Timedelta(d).value for w, d in windows.items()}
    last = t.max() if cap is None else pd.Timestamp(cap).as_unit("ns").value

    # The instants a count can change: each event, and each window's length after it.
    stamps = np.concatenate([t, *(t + n for n in lengths.values())])
    owners = np.tile(codes, 1 + len(lengths))
    keep = stamps <= last
    rows = pd.DataFrame({"k": owners[keep], "s": stamps[keep]}).drop_duplicates(ignore_index=True)
    rows = rows.sort_values(["k", "s"], ignore_index=True)
    qk, qs = rows["k"].to_numpy(), rows["s"].to_numpy()

    out = pd.DataFrame({key: uniques.to_numpy()[qk]})
    out[TIMESTAMP] = pd.to_datetime(qs, utc=True)
    for w, n in lengths.items():
        for m, weights in counts.items():
            wt = np.asarray(pd.Series(weights(events)).to_numpy(), dtype=np.int64)
            upto = _sum_upto(codes, t, wt, qk, qs)
            before = _sum_upto(codes, t, wt, qk, qs - n)
            out[f"{prefix}_{m}_{w}"] = (upto - before).astype(np.int64)
        for r, (num, den) in rates.items():
            top = out[f"{prefix}_{num}_{w}"].to_numpy(dtype=np.float64)
            bottom = out[f"{prefix}_{den}_{w}"].to_numpy(dtype=np.float64)
            rate = np.divide(top, bottom, out=np.zeros_like(top), where=bottom > 0)
            out[f"{prefix}_{r}_{w}"] = rate.astype(np.float32)
    return out[[key, TIMESTAMP, *names]]


def _sum_upto(
    codes: np.ndarray, t: np.ndarray, weights: np.ndarray, qk: np.ndarray, qs: np.ndarray
) -> np.ndarray:
    """For each query (entity ``qk``, time ``qs``): the sum of that entity's weights with ``t <= qs``."""
    # One sort of events and queries together; an event sorts before a query at its instant.
    k = np.concatenate([codes, qk])
    s = np.concatenate([t, qs])
    is_query = np.concatenate([np.zeros(len(t), np.int8), np.ones(len(qs), np.int8)])
    w = np.concatenate([weights, np.zeros(len(qs), np.int64)])
    order = np.lexsort((is_query, s, k))
    running = pd.Series(w[order]).groupby(k[order]).cumsum().to_numpy()
    result = np.empty(len(qs), dtype=np.int64)
    picked = is_query[order] == 1
    result[order[picked] - len(t)] = running[picked]
    return result
