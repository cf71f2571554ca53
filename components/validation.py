"""Validate a data drop with Great Expectations; quarantine bad rows; never lose one.

For each table (users, items, then events, whose ids must point at accepted users and
items) the step:

1. checks table rules: required columns present, no unexpected columns. A broken table
   rule stops the run (``TableRuleError``) with the table, column and rule named;
2. parses each column into the contract's type; a value that does not parse (a timestamp
   that is not a date, an id that is a fraction) is a ``type`` failure of that row;
3. runs a GX 1.x expectation suite on the parsed rows: nulls, id format, allowed values,
   ranges, timestamps not in the future, unique ids, duplicate events, unknown users and
   items. GX names the failing rows (``unexpected_index_list``); for uniqueness the first
   occurrence is kept and the later ones are quarantined. ``validation.engine`` picks where
   the suite runs: on a pandas frame, or on a Spark DataFrame (GX's Spark data source), where
   rows have no index and GX names them by a row-number column instead;
4. writes accepted rows to ``<out>/<table>/`` and failed rows, as they came plus ``rule``
   and ``reason``, to ``<out>/quarantine/<table>/``; a self-contained summary page
   ``<out>/report/summary.html`` linking to GX Data Docs (``<out>/report/index.html``);
   and ``manifest.json`` with input, accepted and quarantined counts that add up.

A table whose quarantined fraction is above ``validation.max_bad_fraction`` fails the run
(``BadFractionError``) after quarantine and report are written, so the reason can be read.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.config import SparkConfig, ValidationConfig
from recsys.contracts import (
    AGE_BUCKETS,
    CONTRACTS,
    DEVICES,
    EVENT_TYPES,
    ID_PATTERN,
    TABLES,
    TableContract,
    conform,
)
from recsys.manifests import ValidatedTable, ValidateManifest
from recsys.storage import code_version, read_table, write_manifest, write_table
from recsys.timeutil import to_utc, utc_now, utc_series


class ValidationError(RuntimeError):
    """The data drop cannot be published."""


class TableRuleError(ValidationError):
    """A rule about a whole table is broken (a missing or unexpected column)."""

    def __init__(self, table: str, column: str, rule: str, detail: str) -> None:
        self.table, self.column, self.rule = table, column, rule
        super().__init__(f"table {table}: column {column!r} breaks rule {rule}: {detail}")


class BadFractionError(ValidationError):
    """Too many rows of a table failed row rules."""


@dataclass
class RowFailures:
    """Failed rows of one table: index -> list of (rule, reason), in rule order."""

    by_row: dict[Any, list[tuple[str, str]]] = field(default_factory=dict)
    # (rule, column) of each row's first failure, to name the column when a table fails.
    first_column: dict[Any, tuple[str, str]] = field(default_factory=dict)

    def add(self, index: Any, rule: str, reason: str, column: str | None = None) -> None:
        self.by_row.setdefault(index, []).append((rule, reason))
        self.first_column.setdefault(index, (rule, column or "-"))

    def add_many(
        self, indices: Any, rule: str, reason: Callable[[Any], str], column: str | None
    ) -> None:
        for i in indices:
            self.add(i, rule, reason(i), column)

    def __len__(self) -> int:
        return len(self.by_row)


@dataclass(frozen=True)
class RowRule:
    """One GX expectation and how to word a failure of it."""

    expectation: Any
    rule: str
    column: str | None
    describe: Callable[[pd.Series, Any], str]
    keep_first: bool = False  # uniqueness: the first occurrence is accepted


def validate_data(
    config: ValidationConfig,
    data_dir: Path,
    out_dir: Path,
    as_of: datetime | None = None,
    spark: SparkConfig | None = None,
) -> dict[str, Any]:
    """Validate ``data_dir`` (users/, items/, events/) into ``out_dir``.

    Args:
        config: thresholds and switches of the step.
        spark: the Spark session's settings when ``config.engine`` is ``spark`` (default:
            ``SparkConfig()``, a local master).
        data_dir: the drop to check.
        out_dir: replaced by this run: accepted tables, quarantine/, report/, manifest.json.
        as_of: the time that timestamps may not pass (plus a tolerance for clock skew);
            defaults to now. A scheduler passes the end of the run's interval, which makes a
            re-run of the same interval give the same result.

    Returns:
        The manifest: per table input, accepted, quarantined counts and quarantine reasons.

    Raises:
        TableRuleError: a table rule is broken; nothing is published.
        BadFractionError: a table's bad fraction passed the threshold; nothing is published.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    as_of = to_utc(as_of or utc_now())
    limit = as_of + timedelta(seconds=config.future_tolerance_seconds)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    ctx = _gx_context(out_dir / "report", config.engine, spark or SparkConfig())
    accepted: dict[str, pd.DataFrame] = {}
    tables: dict[str, ValidatedTable] = {}
    errors: list[ValidationError] = []
    for name in TABLES:
        accepted[name], tables[name], error = _validate_table(
            ctx, CONTRACTS[name], config, data_dir, out_dir, limit, accepted
        )
        if error is not None:
            errors.append(error)
    data_docs = _build_docs(ctx)
    report = _write_summary(out_dir, data_dir, as_of, tables, errors, data_docs)
    manifest = ValidateManifest(
        status="failed" if errors else "passed",
        input=str(data_dir),
        path=str(out_dir),
        as_of=as_of.isoformat(),
        tables=tables,
        rows={n: t.accepted for n, t in tables.items()},
        report=str(report),
        data_docs=str(data_docs),
        code_version=code_version(),
        engine=config.engine,
        errors=[str(e) for e in errors] if errors else None,
    )
    if errors:
        # Quarantine and report stay for reading; accepted tables are withdrawn so that
        # nothing downstream consumes a drop that failed.
        for name in TABLES:
            shutil.rmtree(out_dir / name, ignore_errors=True)
        write_manifest(out_dir, manifest)
        raise errors[0]
    write_manifest(out_dir, manifest)
    return manifest.model_dump()


def _validate_table(
    ctx: Any,
    contract: TableContract,
    config: ValidationConfig,
    data_dir: Path,
    out_dir: Path,
    limit: pd.Timestamp,
    accepted: dict[str, pd.DataFrame],
) -> tuple[pd.DataFrame, ValidatedTable, BadFractionError | None]:
    """Check one table, write its accepted and quarantined rows; the error if too many failed.

    ``accepted`` holds the tables validated before this one (foreign keys point into them).

    Raises:
        TableRuleError: a column is missing or unexpected; Data Docs are built first.
    """
    name = contract.name
    raw = read_table(data_dir, name).reset_index(drop=True)
    try:
        raw, dropped_columns = _check_columns(raw, contract, config)
    except TableRuleError:
        _run_suite(ctx, name, raw, [_columns_expectation(contract)])
        _build_docs(ctx)
        raise
    parsed, failures = _parse(raw, contract)
    rules = _row_rules(contract, config, limit, accepted)
    results = _run_suite(ctx, name, parsed, [_columns_expectation(contract)] + [r.expectation for r in rules])
    for rule, result in zip(rules, results[1:], strict=True):
        _collect(rule, result, parsed, failures)
    bad_index = pd.Index(sorted(failures.by_row))
    good = parsed.drop(index=bad_index)
    quarantined = _quarantine_frame(raw, failures)
    table = conform(good, contract)
    write_table(table, out_dir / name, contract)
    _write_quarantine(quarantined, out_dir / "quarantine" / name)
    n_in, n_bad = len(raw), len(bad_index)
    assert n_in == len(good) + n_bad, "conservation: every row accepted or quarantined"
    fraction = n_bad / n_in if n_in else 0.0
    counts = ValidatedTable(
        input=n_in,
        accepted=len(good),
        quarantined=n_bad,
        bad_fraction=round(fraction, 6),
        quarantine_by_rule=quarantined["rule"].value_counts().to_dict() if n_bad else {},
        dropped_columns=dropped_columns,
    )
    if fraction <= config.max_bad_fraction:
        return table, counts, None
    (top_rule, column), top_count = Counter(failures.first_column.values()).most_common(1)[0]
    return table, counts, BadFractionError(
        f"table {name}: {n_bad} of {n_in} rows ({fraction:.1%}) failed row rules, above "
        f"max_bad_fraction {config.max_bad_fraction:.1%}; most common: rule {top_rule} "
        f"on column {column!r} ({top_count} rows); see "
        f"{out_dir / 'quarantine' / name}"
    )


# --- table rules -------------------------------------------------------------------------


def _check_columns(
    raw: pd.DataFrame, contract: TableContract, config: ValidationConfig
) -> tuple[pd.DataFrame, list[str]]:
    missing = [c for c in contract.required_names if c not in raw.columns]
    if missing:
        raise TableRuleError(
            contract.name,
            missing[0],
            "columns_present",
            f"required column missing (missing: {missing}; found: {list(raw.columns)})",
        )
    unexpected = [c for c in raw.columns if c not in contract.names]
    if unexpected and not config.allow_unexpected_columns:
        raise TableRuleError(
            contract.name,
            unexpected[0],
            "no_unexpected_columns",
            f"column not in the contract (unexpected: {unexpected}; expected: {contract.names}); "
            "set validation.allow_unexpected_columns to drop such columns instead",
        )
    return raw.drop(columns=unexpected), unexpected


def _columns_expectation(contract: TableContract) -> Any:
    import great_expectations.expectations as gxe

    return gxe.ExpectTableColumnsToMatchSet(column_set=contract.names, exact_match=False)


# --- parsing -----------------------------------------------------------------------------


def _parse(raw: pd.DataFrame, contract: TableContract) -> tuple[pd.DataFrame, RowFailures]:
    """Parse every column into its contract type; unparseable values are type failures."""
    failures = RowFailures()
    out = pd.DataFrame(index=raw.index)
    for col in contract.columns:
        if col.name not in raw.columns:
            out[col.name] = pd.Series(pd.NA, index=raw.index, dtype="object")
            continue
        values = raw[col.name]
        parsed = _PARSERS[col.dtype](values)
        broke = values.notna() & parsed.isna()
        for i in raw.index[broke.to_numpy()]:
            failures.add(i, "type", f"{col.name}={_show(values[i])} is not a {col.dtype}", col.name)
        out[col.name] = parsed
    return out, failures


def _parse_string(values: pd.Series) -> pd.Series:
    if pd.api.types.is_integer_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.astype("string")
    if pd.api.types.is_float_dtype(values):
        # An id stored as a float (a column that once held a null) is fine when integral.
        integral = values.notna() & (values % 1 == 0)
        out = pd.Series(pd.NA, index=values.index, dtype="string")
        out[integral] = values[integral].astype("int64").astype("string")
        return out

    def one(v: Any) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(v)
        return pd.NA

    return values.map(one, na_action="ignore").astype("string")


def _parse_float(values: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        return pd.Series(np.nan, index=values.index)
    return pd.to_numeric(values, errors="coerce").astype("float64")


def _parse_bool(values: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        return values.astype("boolean")
    words = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    return values.map(
        lambda v: words.get(str(v).strip().lower(), pd.NA), na_action="ignore"
    ).astype("boolean")


def _parse_timestamp(values: pd.Series) -> pd.Series:
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values):
        return utc_series(values)
    if pd.api.types.is_numeric_dtype(values):
        # Numbers are ambiguous (seconds? milliseconds?): the contract wants timestamps.
        return pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    return pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")


_PARSERS: dict[str, Callable[[pd.Series], pd.Series]] = {
    "string": _parse_string,
    "float": _parse_float,
    "bool": _parse_bool,
    "timestamp": _parse_timestamp,
}


# --- row rules ---------------------------------------------------------------------------


def _row_rules(
    contract: TableContract,
    config: ValidationConfig,
    limit: pd.Timestamp,
    accepted: dict[str, pd.DataFrame],
) -> list[RowRule]:
    """Every row rule of a table, in the order a row's failures are reported (its first names
    the quarantine ``rule``)."""
    import great_expectations.expectations as gxe

    return [
        *_presence_rules(gxe, contract),
        *_value_rules(gxe, contract, config),
        _future_rule(gxe, contract, limit),
        *_uniqueness_rules(gxe, contract),
        *_reference_rules(gxe, contract, accepted),
    ]


def _presence_rules(gxe: Any, contract: TableContract) -> list[RowRule]:
    """A value in every column that may not be null."""
    return [
        RowRule(
            gxe.ExpectColumnValuesToNotBeNull(column=col.name),
            "not_null",
            col.name,
            lambda df, i, c=col.name: f"{c} is null",
        )
        for col in contract.columns
        if not col.nullable
    ]


def _value_rules(gxe: Any, contract: TableContract, config: ValidationConfig) -> list[RowRule]:
    """Ids in the id format, values from their allowed sets, no empty text, events' values in range."""
    from great_expectations.expectations.row_conditions import Column as GxColumn

    rules: list[RowRule] = []
    for c in [contract.key, *contract.foreign_keys]:
        rules.append(
            RowRule(
                gxe.ExpectColumnValuesToMatchRegex(column=c, regex=ID_PATTERN),
                "id_format",
                c,
                lambda df, i, c=c: f"{c}={_show(df.at[i, c])} does not match {ID_PATTERN}",
            )
        )
    allowed = {"event_type": EVENT_TYPES, "device": DEVICES, "age_bucket": AGE_BUCKETS}
    for c, values in allowed.items():
        if c in contract.names:
            rules.append(
                RowRule(
                    gxe.ExpectColumnValuesToBeInSet(column=c, value_set=list(values)),
                    "allowed_values",
                    c,
                    lambda df, i, c=c, v=values: f"{c}={_show(df.at[i, c])} not in {list(v)}",
                )
            )
    for c in ("title", "category", "country", "signup_source", "session_id"):
        if c in contract.names:
            rules.append(
                RowRule(
                    gxe.ExpectColumnValueLengthsToBeBetween(column=c, min_value=1),
                    "empty_value",
                    c,
                    lambda df, i, c=c: f"{c} is empty",
                )
            )
    if "position" in contract.names:
        rules.append(
            RowRule(
                gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0),
                "value_range",
                "position",
                lambda df, i: f"position={_show(df.at[i, 'position'])} is negative (a rank counts from 0)",
            )
        )
    if contract.name == "events":
        ranges = [
            ("rating", config.rating_min, config.rating_max),
            ("view", 0.0, config.max_dwell_seconds),
        ]
        for event_type, lo, hi in ranges:
            rules.append(
                RowRule(
                    gxe.ExpectColumnValuesToBeBetween(
                        column="value",
                        min_value=lo,
                        max_value=hi,
                        row_condition=GxColumn("event_type") == event_type,
                    ),
                    "value_range",
                    "value",
                    lambda df, i, lo=lo, hi=hi, t=event_type: (
                        f"value={_show(df.at[i, 'value'])} outside [{lo}, {hi}] for event_type={t}"
                    ),
                )
            )
    return rules


def _future_rule(gxe: Any, contract: TableContract, limit: pd.Timestamp) -> RowRule:
    """The table's time column not after ``limit`` (as-of plus the clock-skew tolerance)."""
    tc = contract.time_column
    return RowRule(
        gxe.ExpectColumnValuesToBeBetween(column=tc, max_value=limit),
        "future_timestamp",
        tc,
        lambda df, i, tc=tc: (
            f"{tc}={df.at[i, tc].isoformat()} is after as-of {limit.isoformat()}"
        ),
    )


def _uniqueness_rules(gxe: Any, contract: TableContract) -> list[RowRule]:
    """Unique ids and, for events, no repeat of the same event; the first occurrence is kept."""
    rules = [
        RowRule(
            gxe.ExpectColumnValuesToBeUnique(column=contract.key),
            "duplicate_id",
            contract.key,
            lambda df, i, k=contract.key: f"{k}={_show(df.at[i, k])} repeats an earlier row",
            keep_first=True,
        )
    ]
    if contract.name == "events":
        same = ["user_id", "item_id", "event_type", "ts", "session_id"]
        rules.append(
            RowRule(
                gxe.ExpectCompoundColumnsToBeUnique(column_list=same),
                "duplicate_event",
                None,
                lambda df, i: (
                    "same user_id, item_id, event_type, ts and session_id as an earlier event"
                ),
                keep_first=True,
            )
        )
    return rules


def _reference_rules(gxe: Any, contract: TableContract, accepted: dict[str, pd.DataFrame]) -> list[RowRule]:
    """Foreign keys that point at accepted rows of the tables validated before."""
    rules = []
    for c, table in contract.foreign_keys.items():
        known = accepted[table][CONTRACTS[table].key].dropna().unique().tolist()
        rules.append(
            RowRule(
                gxe.ExpectColumnValuesToBeInSet(column=c, value_set=known),
                f"unknown_{c.removesuffix('_id')}",
                c,
                lambda df, i, c=c, t=table: (
                    f"{c}={_show(df.at[i, c])} is not an accepted row of {t}"
                ),
            )
        )
    return rules


def _collect(rule: RowRule, result: Any, parsed: pd.DataFrame, failures: RowFailures) -> None:
    if result.success:
        return
    indices = result.result.get("unexpected_index_list")
    if indices is None:
        raise ValidationError(
            f"expectation {rule.expectation.expectation_type} on {rule.column} failed without row "
            f"indices: {result.exception_info}"
        )
    # On Spark each failing row comes as {ROW_COLUMN: index, <column>: value}.
    indices = [i[ROW_COLUMN] if isinstance(i, dict) else i for i in indices]
    if rule.rule == "not_null":
        # A value that failed to parse is null after parsing; its type failure says it all.
        typed = f"{rule.column}="
        indices = [
            i
            for i in indices
            if not any(
                r == "type" and why.startswith(typed) for r, why in failures.by_row.get(i, [])
            )
        ]
    if rule.keep_first:
        cols = [rule.column] if rule.column else list(rule.expectation.column_list)
        flagged = parsed.loc[indices, cols]
        indices = flagged.index[flagged.duplicated(keep="first")].tolist()
    failures.add_many(indices, rule.rule, lambda i: rule.describe(parsed, i), rule.column)


def _show(value: Any) -> str:
    """A value as a person would type it: 9.0, not np.float64(9.0)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


# --- GX plumbing -------------------------------------------------------------------------


# Spark DataFrames have no row index: the rows GX names are named by this column instead.
ROW_COLUMN = "_recsys_row"


def _gx_context(report_dir: Path, engine: str = "pandas", spark: SparkConfig | None = None) -> Any:
    """An in-memory GX context whose only output is the Data Docs site in ``report_dir``.

    Its data source ``recsys`` is pandas, or Spark (a session of ``spark``) for the Spark engine.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    cfg = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            "report": {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(report_dir),
                },
            }
        },
    )
    ctx = gx.get_context(mode="ephemeral", project_config=cfg)
    if engine == "spark":
        from recsys.spark import spark_session

        spark_session(spark or SparkConfig())
        ctx.data_sources.add_spark("recsys")
    else:
        ctx.data_sources.add_pandas("recsys")
    return ctx


def _as_engine_frame(source: Any, df: pd.DataFrame) -> tuple[Any, dict[str, Any]]:
    """The frame the source validates and the result format that names failing rows in it.

    Pandas frames name rows by their index. A Spark DataFrame gets the index as a column, and
    GX reports each failing row's value of it.
    """
    if type(source).__name__ != "SparkDatasource":
        return df, {"result_format": "COMPLETE"}
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
    framed = df.assign(**{ROW_COLUMN: np.asarray(df.index, dtype=np.int64)})
    return session.createDataFrame(framed), {
        "result_format": "COMPLETE",
        "unexpected_index_column_names": [ROW_COLUMN],
    }


def _run_suite(ctx: Any, table: str, df: pd.DataFrame, expectations: list[Any]) -> list[Any]:
    """Run expectations on a frame through a GX checkpoint; results in expectation order."""
    import great_expectations as gx

    source = ctx.data_sources.get("recsys")
    frame, result_format = _as_engine_frame(source, df)
    asset = source.add_dataframe_asset(f"{table}_{len(source.assets)}")
    batch = asset.add_batch_definition_whole_dataframe("whole")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{table}_suite_{len(source.assets)}"))
    for e in expectations:
        suite.add_expectation(e)
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=asset.name, data=batch, suite=suite)
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name=f"{asset.name}_checkpoint",
            validation_definitions=[vd],
            result_format=result_format,
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = run.run_results.values()
    by_id = {r.expectation_config.id: r for r in validation.results}
    return [by_id[e.id] for e in suite.expectations]


def _build_docs(ctx: Any) -> Path:
    ctx.build_data_docs()
    url = ctx.get_docs_sites_urls()[0]["site_url"]
    return Path(url.removeprefix("file://"))


# --- the page a person opens ----------------------------------------------------------------


def _write_summary(
    out_dir: Path,
    data_dir: Path,
    as_of: pd.Timestamp,
    tables: dict[str, ValidatedTable],
    errors: list[ValidationError],
    data_docs: Path,
) -> Path:
    """A self-contained HTML summary (no external assets) that links to the GX Data Docs.

    GX's own index builds its tables with JavaScript from a CDN; this page reads the same
    outcome offline: counts per table, quarantine reasons with examples, and the verdict.
    """
    from html import escape

    rows = []
    for name, t in tables.items():
        reasons = "".join(
            f"<li><code>{escape(rule)}</code>: {n:,}</li>" for rule, n in t.quarantine_by_rule.items()
        )
        examples = ""
        qdir = out_dir / "quarantine" / name
        if t.quarantined:
            sample = pd.read_parquet(qdir).groupby("rule", sort=True).head(2)[["rule", "reason"]]
            examples = sample.to_html(index=False, escape=True, border=0)
        rows.append(
            f"<tr><td>{name}</td><td>{t.input:,}</td><td>{t.accepted:,}</td>"
            f"<td>{t.quarantined:,}</td><td>{100 * t.bad_fraction:.2f}%</td>"
            f"<td><ul>{reasons or '<li>none</li>'}</ul>{examples}</td></tr>"
        )
    verdict = (
        "<p class=bad>FAILED: " + "<br>".join(escape(str(e)) for e in errors) + "</p>"
        if errors
        else "<p class=good>PASSED: every row accepted or quarantined with its reason.</p>"
    )
    docs_link = Path(data_docs).relative_to(out_dir / "report")
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>recsys validation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}}
.good{{color:#1a7f37;font-weight:bold}}.bad{{color:#cf222e;font-weight:bold}}</style></head><body>
<h1>Validation of {escape(str(data_dir))}</h1>
<p>as of {as_of.isoformat()}; output {escape(str(out_dir))}</p>{verdict}
<table><tr><th>table</th><th>input</th><th>accepted</th><th>quarantined</th><th>bad</th>
<th>quarantine reasons (rows) and examples</th></tr>{"".join(rows)}</table>
<p>Expectation-level detail: <a href="{docs_link}">Great Expectations Data Docs</a>.
Quarantined rows: <code>quarantine/&lt;table&gt;/</code> (the row as it came, plus rule and reason).</p>
</body></html>"""
    path = out_dir / "report" / "summary.html"
    path.write_text(html)
    return path


# --- quarantine --------------------------------------------------------------------------


def _quarantine_frame(raw: pd.DataFrame, failures: RowFailures) -> pd.DataFrame:
    index = sorted(failures.by_row)
    out = raw.loc[index].copy()
    out["rule"] = [failures.by_row[i][0][0] for i in index]
    out["reason"] = ["; ".join(reason for _, reason in failures.by_row[i]) for i in index]
    # Arrow needs one type per column; a raw object column may mix types, so keep its text.
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(lambda v: v if v is None or isinstance(v, str) else repr(v))
    return out.reset_index(drop=True)


def _write_quarantine(df: pd.DataFrame, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out_dir / "part-0.parquet", index=False)
