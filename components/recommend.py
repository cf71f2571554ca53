"""Batch recommendations from the pushed models: top-K unseen items for a list of users.

This reads exactly what a model server serves: the version that a label of
``<base>/models.config`` points at (``stable`` by default), its ``retrieve`` signature
(query tower + index in one graph), and the user's features as of the end of the
validated data. Items the user already had an event with are removed; since that removal
happens after retrieval, the model over-fetches (it returns ``push.retrieval_k``
candidates) and a user who has seen more than that gets the rest from an exact search
over the version's exported item embeddings. A user id the model never saw still gets
recommendations: the query tower maps it to its out-of-vocabulary embedding, and the list
is topped up by popularity if retrieval falls short.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.config import Settings
from components.indexing import EMBEDDINGS_FILE
from components.push import ITEM_IDS_FILE, version_for_label
from components.storage import read_manifest

BATCH = 256


def latest_validated_dir(settings: Settings) -> Path:
    """The validated data of the latest pipeline run (``<home>/runs/<key>/validate``)."""
    runs = sorted(p for p in settings.runs_dir.glob("*/validate") if (p / "manifest.json").is_file())
    if runs:
        return runs[-1]
    if (settings.validated_dir / "manifest.json").is_file():
        return settings.validated_dir
    raise FileNotFoundError(
        f"no validated data under {settings.runs_dir} or {settings.validated_dir}: "
        "run the pipeline or pass --data"
    )


def read_user_ids(path: Path) -> list[str]:
    """One user id per line; blank lines and surrounding spaces ignored, order kept."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


class PushedRetriever:
    """The retrieval model of one pushed version, loaded in-process.

    Loads the SavedModel with ScaNN's ops registered; where that fails (a TensorFlow
    without them: "Op type not registered 'Scann...'"), it uses the version's fallback
    assets instead: the query tower and exact search over the exported item embeddings.
    """

    def __init__(self, version_dir: Path) -> None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        import tensorflow as tf

        self.version_dir = Path(version_dir)
        extra = self.version_dir / "assets.extra"
        self.requirements = json.loads((extra / "requirements.json").read_text())
        self.item_ids = np.asarray(json.loads((extra / ITEM_IDS_FILE).read_text()), dtype=object)
        self._embeddings = np.load(extra / EMBEDDINGS_FILE)
        self.mode = "savedmodel"
        try:
            if self.requirements.get("custom_ops"):
                from scann import scann_ops  # noqa: F401  (registers the Scann ops)
            model = tf.saved_model.load(str(self.version_dir))
            self._retrieve = model.signatures["retrieve"]
            self._embed = model.signatures["embed"]
        except Exception as e:  # noqa: BLE001  (which error an unknown op raises varies by TF version)
            if "Scann" not in str(e) and not isinstance(e, ImportError):
                raise
            self.mode = "exact_fallback"
            self._embed = tf.saved_model.load(str(extra / "query_tower")).signatures["serving_default"]
            self._retrieve = None
        self._tf = tf

    def _tensors(self, features: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: self._tf.constant(v) for k, v in features.items()}

    def retrieve(self, features: dict[str, np.ndarray]) -> list[list[str]]:
        """Candidate item ids per row, best first (padding removed)."""
        if self._retrieve is None:
            return self.exact(features, len(self.item_ids))
        out = self._retrieve(**self._tensors(features))
        ids = out["item_ids"].numpy()
        return [[i.decode() for i in row if i] for row in ids]

    def exact(self, features: dict[str, np.ndarray], k: int) -> list[list[str]]:
        """Exact dot-product top-``k`` over the exported item embeddings (no index)."""
        q = self._embed(**self._tensors(features))["embedding"].numpy()
        scores = q @ self._embeddings.T
        k = min(k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[str(self.item_ids[j]) for j in row] for row in top]


def recommend(
    settings: Settings,
    users_file: Path,
    k: int,
    out: Path,
    data_dir: Path | None = None,
    label: str = "stable",
    base_path: Path | None = None,
) -> dict[str, Any]:
    """Write top-``k`` unseen items per user as JSON lines, from a pushed retrieval model.

    Args:
        settings: the configuration (model names, feature windows, home).
        users_file: one user id per line.
        k: items per user.
        out: the JSONL file; each line ``{"user_id": ..., "items": [ids, best first]}``.
        data_dir: validated data (seen items, user features); default the latest run's.
        label: the ``models.config`` label of the version to use.
        base_path: the model base path; default ``settings.models_dir``.

    Returns:
        A summary: version, mode, counts of users, unknown users, users topped up by exact
        search and by popularity, and users short of ``k`` (the catalog ran out).
    """
    from components.feature_rows import feature_rows, load_feature_source, popular_items, seen_items

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    base_path = Path(base_path or settings.models_dir)
    model = settings.push.retrieval_model
    version = version_for_label(base_path, model, label)
    retriever = PushedRetriever(base_path / model / str(version))
    data_dir = Path(data_dir) if data_dir else latest_validated_dir(settings)
    read_manifest(data_dir)
    inputs = retriever.requirements["inputs"]
    source = load_feature_source(settings.features, data_dir, list(inputs))
    seen = seen_items(source)
    catalog = set(map(str, retriever.item_ids))
    popular = [i for i in popular_items(source) if i in catalog]
    users = read_user_ids(users_file)

    stats = dict.fromkeys(("unknown_users", "exact_topped_up", "popularity_topped_up", "short"), 0)
    stats["users"] = len(users)
    lines: list[str] = []
    for start in range(0, len(users), BATCH):
        batch: Sequence[str] = users[start : start + BATCH]
        features = feature_rows(source, inputs, user_ids=batch)
        candidates = retriever.retrieve(features)
        for row, (user, cands) in enumerate(zip(batch, candidates, strict=True)):
            stats["unknown_users"] += user not in source.users.index
            exclude = seen.get(user, set())
            items = _take(cands, exclude, k)
            if len(items) < k:
                # Over-fetch was not enough: exact search over the whole catalog for this user.
                one = {name: col[row : row + 1] for name, col in features.items()}
                items = _take(retriever.exact(one, len(catalog))[0], exclude, k)
                stats["exact_topped_up"] += 1
            if len(items) < k:
                items = _take([*items, *popular], exclude, k)
                stats["popularity_topped_up"] += 1
            stats["short"] += len(items) < k
            lines.append(json.dumps({"user_id": user, "items": items}))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    return {
        "path": str(out),
        "model": model,
        "label": label,
        "version": version,
        "mode": retriever.mode,
        "data": str(data_dir),
        "k": k,
        **stats,
    }


def _take(candidates: Sequence[str], exclude: set[str], k: int) -> list[str]:
    """The first ``k`` distinct candidates not in ``exclude``, order kept."""
    out: list[str] = []
    taken: set[str] = set()
    for c in candidates:
        if c and c not in exclude and c not in taken:
            out.append(c)
            taken.add(c)
            if len(out) == k:
                break
    return out
