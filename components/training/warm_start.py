"""Incremental training: warm-start a model from the serving version, train on the new days only.

A full retrain learns every id embedding and every layer from scratch on all events. Between
full retrains (``training.full_retrain_every_days``) a run may instead start from the weights
of the model that serves and fit a few epochs (``training.incremental_epochs``) on the events
after the serving version's training interval: yesterday's users and items keep what they
learned, new ones get fresh rows.

What makes a warm start possible is that every lookup appends: an id lookup maps padding to
row 0, the OOV buckets to the next rows, then the vocabulary in its order
(``models.id_lookup``). A new model whose vocabularies are the serving version's *in their
order* with the new ids appended (``merge_vocabularies``) keeps each old id at its row; its
embedding tables only grow at the bottom. ``warm_values`` then copies every variable of the
old model into the new one by position: the same shape is copied whole; a grown embedding
table gets the old rows and keeps its fresh initialisation for the new ones; any other
difference refuses (``WarmStartError``), and the run retrains in full.

The training step saves what a warm start needs beside its SavedModels
(``save_checkpoint``): ``checkpoints/<model>/weights.*`` (``model.save_weights``) and
``checkpoints/<model>/vocabularies.json`` (the lookups it was built from).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys.config import TrainingConfig

CHECKPOINTS = "checkpoints"
MODELS = ("retriever", "ranker")
WEIGHTS = "weights"
VOCABULARIES = "vocabularies.json"
# Parameters that shape a model's variables or what its rows mean: a serving version trained
# with other values cannot be warm-started from (its variables would not line up).
ARCHITECTURE = (
    "embedding_dim",
    "id_dim",
    "feature_dim",
    "text_dim",
    "hidden_units",
    "num_oov_buckets",
    "share_item_embeddings",
    "history_categories",
    "query_tower",
    "item_bias",
    "temperature",
    "text_max_tokens",
    "ranker_hidden_units",
    "ranker_window_features",
    "position_buckets",
    "objective_weights",
)
# A Keras ``Embedding`` layer's table (``.../embeddings:0``): rows indexed by a lookup.
EMBEDDING_TABLE = re.compile(r"(^|/)embeddings(:\d+)?$")


class WarmStartError(ValueError):
    """The serving version's model cannot seed the new one (its variables do not line up)."""


# --------------------------------------------------------------------------------------------
# Pure parts: vocabularies and variables
# --------------------------------------------------------------------------------------------


def merge_vocabulary(old: Sequence[str], new: Sequence[str], limit: int | None = None) -> list[str]:
    """``old`` in its order, then the ids of ``new`` it lacks in ``new``'s order, at most ``limit``.

    Old ids keep their index (and so their embedding row); the new ones come after them.
    """
    known = set(old)
    merged = [str(x) for x in old] + [str(x) for x in dict.fromkeys(new) if x not in known]
    if limit is not None and len(old) > limit:
        raise WarmStartError(f"the old vocabulary holds {len(old)} entries, more than the limit {limit}")
    return merged[:limit] if limit is not None else merged


def merge_vocabularies(
    old: Mapping[str, Any], new: Mapping[str, Any], limits: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """``merge_vocabulary`` of each list of ``new`` (nested mappings merged alike).

    Names keep ``old``'s order, then ``new``'s others (a name one side lacks is empty there);
    ``limits`` caps a top-level list by its name.
    """
    limits = limits or {}
    out: dict[str, Any] = {}
    for name in [*old, *(k for k in new if k not in old)]:
        either = new[name] if name in new else old[name]
        if isinstance(either, Mapping):
            out[name] = merge_vocabularies(old.get(name, {}), new.get(name, {}))
        else:
            out[name] = merge_vocabulary(old.get(name, []), new.get(name, []), limits.get(name))
    return out


@dataclass(frozen=True)
class CopyReport:
    """What ``warm_values`` did: variables copied whole, tables grown (name -> old, new rows)."""

    copied: int
    grown: dict[str, tuple[int, int]]

    def summary(self) -> dict[str, Any]:
        return {"copied": self.copied, "grown": {k: list(v) for k, v in self.grown.items()}}


def warm_values(
    old: Sequence[tuple[str, np.ndarray]], new: Sequence[tuple[str, np.ndarray]]
) -> tuple[list[np.ndarray], CopyReport]:
    """The values the new model's variables start from, pairing ``old`` and ``new`` by position.

    Args:
        old: (name, value) of the trained model's variables.
        new: (name, freshly initialised value) of the new model's, built by the same code.

    Returns:
        One value per ``new`` variable: the old value where the shapes agree; for an embedding
        table (``.../embeddings``) with more rows, the old rows then the new rows as initialised;
        and what was done.

    Raises:
        WarmStartError: the models differ in their variables' count, or a variable in its
            shape other than an embedding table growing rows.
    """
    if len(old) != len(new):
        raise WarmStartError(f"the old model has {len(old)} variables, the new one {len(new)}")
    values, grown = [], {}
    for (old_name, before), (name, fresh) in zip(old, new, strict=True):
        if before.shape == fresh.shape:
            values.append(before)
        elif _grows_rows(name, before, fresh):
            values.append(np.concatenate([before, fresh[len(before) :]]))
            grown[name] = (len(before), len(fresh))
        else:
            raise WarmStartError(
                f"variable {name} has shape {fresh.shape}, the old model's {old_name} {before.shape}: "
                "only an embedding table may change shape, and only by more rows"
            )
    return values, CopyReport(len(values) - len(grown), grown)


def _grows_rows(name: str, before: np.ndarray, fresh: np.ndarray) -> bool:
    return (
        bool(EMBEDDING_TABLE.search(name))
        and before.ndim == fresh.ndim == 2
        and before.shape[1] == fresh.shape[1]
        and before.shape[0] < fresh.shape[0]
    )


# --------------------------------------------------------------------------------------------
# The plan: full or incremental
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPlan:
    """How a training run trains, and why (``plan_training``).

    ``run_end``: the run's interval end (ISO), the date a full run records as its full
    retrain. Incremental: ``last_full``, the serving version's last full retrain;
    ``warm_from``, its training folder; ``after``, the end of its training interval (the run
    trains on later events).
    """

    mode: Literal["full", "incremental"]
    reason: str
    run_end: str | None = None
    last_full: str | None = None
    warm_from: Path | None = None
    after: str | None = None

    @property
    def incremental(self) -> bool:
        return self.mode == "incremental"

    @property
    def full_retrain_of(self) -> str | None:
        """The date of the full retrain the run's models descend from (None: not known yet)."""
        return self.last_full if self.incremental else self.run_end

    def as_full(self, reason: str) -> TrainingPlan:
        return replace(self, mode="full", reason=reason, last_full=None, warm_from=None, after=None)

    def checkpoint(self, model: str) -> Path:
        assert self.warm_from is not None, "a full plan has no checkpoint to start from"
        return self.warm_from / CHECKPOINTS / model

    def describe(self) -> str:
        if self.incremental:
            return (
                f"incremental: warm start from {self.warm_from}, events after {self.after} "
                f"(full retrain of {self.full_retrain_of}; {self.reason})"
            )
        return f"full retrain: {self.reason}"


def plan_training(
    config: TrainingConfig, serving_dir: Path | None, interval_end: datetime, newest_event: Any = None
) -> TrainingPlan:
    """Full or incremental for a run ending at ``interval_end``, with the reason.

    Full when ``training.incremental`` is off, nothing serves, the serving version has no
    checkpoints (older code) or other architecture parameters, the query tower is sequential,
    its last full retrain is ``full_retrain_every_days`` or more before ``interval_end``, or
    no event (``newest_event``, when given) is newer than its training interval.
    """
    end = _utc(interval_end)
    full = TrainingPlan("full", "", run_end=end.isoformat())
    if not config.incremental:
        return full.as_full("training.incremental is off")
    if config.query_tower == "sequential":
        return full.as_full("the sequential query tower is not warm-started (not measured)")
    if serving_dir is None:
        return full.as_full("no model serves yet")
    refused = _unusable(config, serving_dir)
    if refused:
        return full.as_full(f"the serving version {serving_dir} {refused}")
    manifest = json.loads((serving_dir / "manifest.json").read_text())
    last_full = _utc(manifest["full_retrain_of"])
    age = end - last_full
    if age >= timedelta(days=config.full_retrain_every_days):
        return full.as_full(
            f"the last full retrain ({last_full.date()}) is {age.days} days before the interval end, "
            f"training.full_retrain_every_days is {config.full_retrain_every_days}"
        )
    after = manifest["data_interval"]["end"]
    if newest_event is not None and _utc(newest_event) <= _utc(after):
        return full.as_full(f"no event after the serving version's training interval (ends {after})")
    return replace(
        full,
        mode="incremental",
        reason=f"last full retrain {last_full.date()}, {age.days} days ago "
        f"(training.full_retrain_every_days: {config.full_retrain_every_days})",
        last_full=last_full.isoformat(),
        warm_from=serving_dir,
        after=after,
    )


def _utc(moment: Any) -> pd.Timestamp:
    at = pd.Timestamp(moment)
    return at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")


def _unusable(config: TrainingConfig, serving_dir: Path) -> str | None:
    """Why the serving version cannot seed this config's models, or None."""
    manifest = json.loads((serving_dir / "manifest.json").read_text())
    missing = [m for m in MODELS if not (serving_dir / CHECKPOINTS / m / VOCABULARIES).is_file()]
    if missing or not manifest.get("full_retrain_of") or not manifest.get("data_interval"):
        return "has no checkpoints to warm-start from (trained by older code)"
    ours, theirs = config.model_dump(mode="json"), manifest.get("parameters", {})
    changed = [k for k in ARCHITECTURE if ours.get(k) != theirs.get(k)]
    if changed:
        return f"was trained with other architecture parameters ({', '.join(changed)})"
    return None


# --------------------------------------------------------------------------------------------
# Keras: save, load, copy
# --------------------------------------------------------------------------------------------


def save_checkpoint(model: Any, vocabularies: Mapping[str, Any], folder: Path) -> Path:
    """The model's weights (``model.save_weights``) and the vocabularies it was built from."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(folder / WEIGHTS))
    (folder / VOCABULARIES).write_text(json.dumps(vocabularies))
    return folder


def read_vocabularies(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / VOCABULARIES).read_text()))


def warm_model(
    build: Callable[[Mapping[str, Any]], Any],
    vocabularies: Mapping[str, Any],
    checkpoint: Path,
    create_variables: Callable[[Any], None],
    limits: Mapping[str, int] | None = None,
) -> tuple[Any, dict[str, Any], CopyReport]:
    """A new model seeded with a checkpoint's weights, and the vocabularies it was built with.

    Phases: merge (the checkpoint's vocabularies, then this run's new ids), rebuild the old
    model from its vocabularies and load its weights, build the new one, copy (``warm_values``).

    Args:
        build: vocabularies -> an untrained, compiled model (the same code for both).
        vocabularies: this run's own vocabularies (what a full run would build from).
        checkpoint: a ``save_checkpoint`` folder.
        create_variables: calls a model once on a batch, so its variables exist.
        limits: caps of vocabularies by name (see ``merge_vocabularies``).
    """
    previous = read_vocabularies(checkpoint)
    merged = merge_vocabularies(previous, vocabularies, limits)
    old = build(previous)
    create_variables(old)
    old.load_weights(str(checkpoint / WEIGHTS)).expect_partial().assert_existing_objects_matched()
    model = build(merged)
    create_variables(model)
    values, report = warm_values(_named(old.weights), _named(model.weights))
    for variable, value in zip(model.weights, values, strict=True):
        variable.assign(value)
    return model, merged, report


def _named(variables: Sequence[Any]) -> list[tuple[str, np.ndarray]]:
    return [(v.name, v.numpy()) for v in variables]
