"""The pushed retrieval model as a simulation policy's scorer: the query tower and exact search.

Reads the version that a ``models.config`` label points at (``recsys.model_registry``) the way
``recsys recommend`` does (``components.batch_recommend.PushedRetriever``), and scores every
item the version exported by the dot product with the user's query embedding. The query is
the user's features as of the validated data's end (``components.features.rows``) with the
simulation's recent items in front, as the gateway merges a user's new events into the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.features.rows import FeatureSource, feature_rows
from recsys.item_ages import ages_of, epoch_seconds
from recsys.model_registry import version_for_label


class PushedQueryEmbedder:
    """Scores of every exported item for a user, from one pushed retrieval version.

    Args:
        models_dir: the model base path (``settings.models_dir``).
        model: the retrieval model's name (``push.retrieval_model``).
        source: the users' features (``load_feature_source`` over the validated data).
        label: the ``models.config`` label whose version to read.
    """

    def __init__(self, models_dir: Path, model: str, source: FeatureSource, label: str = "stable") -> None:
        from components.batch_recommend import PushedRetriever

        self.version = version_for_label(Path(models_dir), model, label)
        self.retriever = PushedRetriever(Path(models_dir) / model / str(self.version))
        self.item_ids = np.asarray([str(i) for i in self.retriever.item_ids], dtype=object)
        self._position = {i: n for n, i in enumerate(self.item_ids)}
        self.inputs: dict[str, str] = dict(self.retriever.requirements["inputs"])
        self.source = source

    def item_scores(self, user_id: str, recent_items: Sequence[str]) -> np.ndarray:
        """query . item for every exported item, in ``item_ids`` order."""
        features = feature_rows(self.source, self.inputs, user_ids=[user_id])
        if "recent_items" in features:
            features["recent_items"] = np.asarray([" ".join(recent_items)], dtype=object)
        if "recent_item_ages" in features:
            # Each merged item keeps its stored time (the simulation's own: unknown), as the
            # gateway ages a request's recent items.
            row = self.source.users.reindex([user_id]).iloc[0]
            stored_items, stored_times = row.get("recent_items"), row.get("recent_item_times")
            aged = ages_of(recent_items, stored_items, stored_times, epoch_seconds(self.source.as_of))
            features["recent_item_ages"] = np.asarray([aged], dtype=object)
        ranked = self.retriever.exact(features, len(self.item_ids))[0]
        scores = np.full(len(self.item_ids), -np.inf)
        for item, score in ranked:
            scores[self._position[item]] = score
        return scores
