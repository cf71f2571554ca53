"""Item-to-item neighbours: the second candidate source beside the two-tower retriever.

A pushed retrieval version may carry ``assets.extra/item_neighbours.npz``: for each item of
the catalog its strongest neighbours and their weights (an item-item regression fitted by
the train step, ``components.training.neighbours``). A user's neighbour score of an item is
the sum of the weights from the items of the user's history to it, so it reads the whole
recent history at once and needs no model call. The gateway, batch recommendations and the
evaluation's replay all score and blend it with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.artifacts import ITEM_NEIGHBOURS_FILE


@dataclass(frozen=True)
class ItemNeighbours:
    """Each item's top neighbours by weight.

    Attributes:
        item_ids: [N] the items with a neighbour row (str).
        neighbours: [N, K] int32 rows of ``item_ids`` (-1: no neighbour in that slot).
        weights: [N, K] float32, the weight of each neighbour (0 in empty slots).
        l2: the regularization the weights were fitted with (chosen on validation).
    """

    item_ids: np.ndarray
    neighbours: np.ndarray
    weights: np.ndarray
    l2: float

    def __post_init__(self) -> None:
        if self.neighbours.shape != self.weights.shape or self.neighbours.shape[0] != len(self.item_ids):
            raise ValueError(
                f"neighbours {self.neighbours.shape}, weights {self.weights.shape} and item_ids "
                f"({len(self.item_ids)}) disagree"
            )
        object.__setattr__(self, "_row", {str(i): n for n, i in enumerate(self.item_ids)})

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of the known ids among ``ids`` (unknown ids are skipped)."""
        row: dict[str, int] = self._row  # type: ignore[attr-defined]
        return np.asarray([row[i] for i in ids if i in row], dtype=np.int64)

    def score(self, history: Sequence[str], top: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``top`` items with the highest summed weight from the items of ``history``.

        Items of the history themselves are not returned (serving filters them anyway), nor
        items whose summed weight is not positive.

        Returns:
            item ids [<= top] (str, best first) and their scores.
        """
        rows = self.rows(list(dict.fromkeys(history)))
        if not len(rows) or top <= 0:
            return np.zeros(0, dtype=object), np.zeros(0, dtype=np.float32)
        nb, w = self.neighbours[rows].ravel(), self.weights[rows].ravel()
        valid = nb >= 0
        totals = np.bincount(nb[valid], weights=w[valid], minlength=len(self.item_ids))
        totals[rows] = 0.0
        hits = np.flatnonzero(totals > 0)
        if len(hits) > top:
            hits = hits[np.argpartition(-totals[hits], top - 1)[:top]]
        hits = hits[np.argsort(-totals[hits], kind="stable")]
        return self.item_ids[hits].astype(object), totals[hits].astype(np.float32)

    def strongest_sources(self, history: Sequence[str], item_ids: Sequence[str]) -> list[str | None]:
        """For each of ``item_ids``, the item of ``history`` with the largest positive weight to
        it (what an explanation names); None where no history item points to it."""
        rows = self.rows(list(dict.fromkeys(history)))
        row: dict[str, int] = self._row  # type: ignore[attr-defined]
        targets = np.asarray([row.get(str(i), -2) for i in item_ids], dtype=np.int64)
        out: list[str | None] = [None] * len(targets)
        if not len(rows) or not len(targets):
            return out
        nb, w = self.neighbours[rows].ravel(), self.weights[rows].ravel()
        source = np.repeat(rows, self.neighbours.shape[1])
        hit = np.isin(nb, targets) & (w > 0)
        strongest = np.argsort(-w[hit], kind="stable")
        found, first = np.unique(nb[hit][strongest], return_index=True)
        best = dict(zip(found.tolist(), source[hit][strongest][first].tolist(), strict=True))
        for j, t in enumerate(targets.tolist()):
            if t in best:
                out[j] = str(self.item_ids[best[t]])
        return out

    def save(self, path: Path) -> Path:
        """Write ``item_neighbours.npz`` (ids as unicode, no pickles)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez_compressed(
                f,
                item_ids=np.asarray(self.item_ids, dtype=str),
                neighbours=self.neighbours.astype(np.int32),
                weights=self.weights.astype(np.float32),
                l2=np.float64(self.l2),
            )
        return path

    @classmethod
    def load(cls, path: Path) -> ItemNeighbours:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(
                item_ids=data["item_ids"].astype(object),
                neighbours=data["neighbours"],
                weights=data["weights"],
                l2=float(data["l2"]),
            )


def read_item_neighbours(directory: Path) -> ItemNeighbours | None:
    """The neighbours in ``directory`` (a train folder or a version's assets.extra); None if absent."""
    path = Path(directory) / ITEM_NEIGHBOURS_FILE
    return ItemNeighbours.load(path) if path.is_file() else None
