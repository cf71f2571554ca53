"""The truth a synthetic data set was sampled from, as a simulated user: expected and sampled reward.

The generator (``components.sources.synthetic``) writes beside its data the state it drew each
user's responses from; ``load_truth`` reads it back. A ``Truth`` then answers two questions
about showing items to a user:

- ``expected_reward``: the reward expected if shown, exactly as the ranker's objective
  weighs it (``training.objective_weights``): ``click`` x p(click) + ``engagement`` x
  E[engagement], where engagement is the ranker's label (``components.training.train``:
  0 unless clicked, else the largest ``engagement_of`` among what followed the click);
- ``respond``: a draw of what the user does (the generator's own ``draw_responses``), the
  events it writes, and the realized click, engagement and reward of each item.

Reward is the expectation over the response model, computed once per ``Truth`` on a fine
grid of affinity (every chance of the response model is a function of affinity alone): the
discrete outcomes are enumerated and dwell time, the one continuous outcome, is integrated
at quantiles of its lognormal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.sources.synthetic import (
    TRUTH_FOLDER,
    SyntheticTruth,
    affinity_of,
    draw_responses,
    read_truth,
    response_odds,
)
from components.training.train import engagement_of
from recsys.config import TrainingConfig
from recsys.feature_schema import POSITIVE_EVENT_TYPES

if TYPE_CHECKING:
    from recsys.config import Settings

# Affinities between these ends are tabulated; beyond them every chance has saturated.
AFFINITY_GRID = (-20.0, 20.0)
AFFINITY_STEP = 0.01
# Quantiles of the dwell time's lognormal that its expectation is integrated at.
DWELL_QUANTILES = 512
STARS = (1, 2, 3, 4, 5)


def truth_dir(data_folder: Path) -> Path:
    """Where the generator writes the truth of a data folder: ``<data folder>/truth``."""
    return Path(data_folder) / TRUTH_FOLDER


def latest_truth_dir(settings: Settings) -> Path:
    """The truth of the latest pipeline run's ingested data (``<home>/runs/<key>/ingest/truth``).

    Raises:
        FileNotFoundError: no run ingested synthetic data with its truth, naming where it looked.
    """
    runs = settings.runs_dir.glob(f"*/ingest/{TRUTH_FOLDER}")
    found = sorted(p for p in runs if (p / "manifest.json").is_file())
    if not found:
        raise FileNotFoundError(
            f"no truth under {settings.runs_dir}/*/ingest/{TRUTH_FOLDER}: run the pipeline on the "
            "synthetic source, or pass --truth (a truth folder or a data folder that holds one)"
        )
    return found[-1]


def find_truth(path: Path) -> Path:
    """The truth folder ``path`` names: itself, or the ``truth/`` of the data folder it is.

    Raises:
        FileNotFoundError: neither holds a finished truth (``manifest.json``), naming both.
    """
    path = Path(path)
    for folder in (truth_dir(path), path):
        if (folder / "manifest.json").is_file() and not (folder / "events").exists():
            return folder
    raise FileNotFoundError(
        f"no truth at {path} (nor {truth_dir(path)}): the synthetic generator writes one "
        "beside its data; other sources have none"
    )


def load_truth(path: Path, training: TrainingConfig | None = None) -> Truth:
    """Read the truth at ``path`` (a truth folder, or a data folder holding ``truth/``).

    Args:
        path: the folder.
        training: whose ``objective_weights`` and ``engagement_dwell_cap_seconds`` define the
            reward (default: the configuration's defaults).

    Raises:
        FileNotFoundError: neither ``path`` nor ``path/truth`` holds a finished truth.
        ValueError: the truth is of another kind or response model.
    """
    folder = find_truth(path)
    return Truth(read_truth(folder), training or TrainingConfig(), folder)


@dataclass(frozen=True)
class SimulatedResponse:
    """What a simulated user did with the items shown to them, one entry per item in order.

    ``events`` are the generator's events (``position``, ``item_id``, ``event_type``,
    ``value``), the impression first, in the order they happen.
    """

    item_ids: list[str]
    events: pd.DataFrame
    click: np.ndarray  # [k] bool
    engagement: np.ndarray  # [k] the ranker's engagement label
    reward: np.ndarray  # [k] objective-weighted


class Truth:
    """A synthetic data set's users as simulated users: what they would do if shown items.

    Args:
        synthetic: the generator's truth (``read_truth``).
        training: the reward's objective weights and dwell cap.
        source: the folder it was read from (for messages).
    """

    def __init__(
        self, synthetic: SyntheticTruth, training: TrainingConfig, source: Path | None = None
    ) -> None:
        self.synthetic = synthetic
        self.objective_weights = dict(training.objective_weights)
        self.dwell_cap = float(training.engagement_dwell_cap_seconds)
        self.source = source
        self._user_pos = {u: n for n, u in enumerate(synthetic.user_ids)}
        self._item_pos = {i: n for n, i in enumerate(synthetic.item_ids)}
        self._grid = np.arange(AFFINITY_GRID[0], AFFINITY_GRID[1] + AFFINITY_STEP / 2, AFFINITY_STEP)
        self._engagement_given_click = expected_engagement_given_click(self._grid, self.dwell_cap)
        self._credits: dict[tuple[str, float], float] = {}

    @property
    def user_ids(self) -> list[str]:
        return [str(u) for u in self.synthetic.user_ids]

    @property
    def item_ids(self) -> list[str]:
        return [str(i) for i in self.synthetic.item_ids]

    def has_items(self, item_ids: Sequence[str]) -> np.ndarray:
        """Which of ``item_ids`` the truth knows (their response can be simulated)."""
        return np.array([str(i) in self._item_pos for i in item_ids], dtype=bool)

    def user_positions(self, user_ids: Sequence[str]) -> np.ndarray:
        return _positions(self._user_pos, user_ids, "user", self.source)

    def item_positions(self, item_ids: Sequence[str]) -> np.ndarray:
        return _positions(self._item_pos, item_ids, "item", self.source)

    def affinity(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """[len(users), len(items)] affinities, as the generator computes them."""
        u, i = self.user_positions(user_ids), self.item_positions(item_ids)
        t = self.synthetic
        taste = t.taste[u][:, t.item_primary[i]]
        return affinity_of(taste, t.user_latent[u][:, None, :], t.item_latent[i][None, :, :])

    def expected_reward(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """[len(users), len(items)]: each item's expected reward if shown to each user.

        Raises:
            ValueError: an id the truth does not hold, naming it.
        """
        return self.expected_reward_of_affinity(self.affinity(user_ids, item_ids))

    def expected_reward_of_affinity(self, affinity: np.ndarray) -> np.ndarray:
        """The objective-weighted expected reward of impressions of these affinities."""
        p_click = response_odds(affinity).click
        engagement = p_click * np.interp(affinity, self._grid, self._engagement_given_click)
        w = self.objective_weights
        return w.get("click", 0.0) * p_click + w.get("engagement", 0.0) * engagement

    def respond(self, rng: np.random.Generator, user_id: str, item_ids: Sequence[str]) -> SimulatedResponse:
        """Draw what ``user_id`` does when shown ``item_ids``, as the generator draws it.

        Raises:
            ValueError: an id the truth does not hold, naming it.
        """
        items = [str(i) for i in item_ids]
        affinity = self.affinity([user_id], items)[0] if items else np.zeros(0)
        responses = draw_responses(rng, affinity)
        kinds = responses.events()
        position = np.concatenate([idx for _, idx, _, _ in kinds])
        event_type = np.concatenate([np.full(len(idx), name, dtype=object) for name, idx, _, _ in kinds])
        value = np.concatenate([v for _, _, v, _ in kinds])
        step = np.concatenate([np.full(len(idx), st) for _, idx, _, st in kinds])
        # In time order: item by item down the list, each item's events by their step.
        order = np.lexsort((np.arange(len(position)), step, position))
        position, event_type, value = position[order], event_type[order], value[order]
        events = pd.DataFrame(
            {
                "position": position,
                "item_id": np.asarray(items, dtype=object)[position],
                "event_type": event_type,
                "value": value,
            }
        )
        engagement = self._engagement_labels(position, event_type, value, len(items))
        w = self.objective_weights
        reward = w.get("click", 0.0) * responses.click + w.get("engagement", 0.0) * engagement
        return SimulatedResponse(items, events, responses.click.copy(), engagement, reward)

    def _engagement_labels(
        self, position: np.ndarray, event_type: np.ndarray, value: np.ndarray, k: int
    ) -> np.ndarray:
        """Per shown item, the ranker's engagement label: the largest engagement of the
        outcomes that followed, 0 when not clicked."""
        out = np.zeros(k)
        positive = np.isin(event_type, POSITIVE_EVENT_TYPES)
        credit = self._credit_of(event_type[positive], value[positive])
        np.maximum.at(out, position[positive], credit)
        clicked = np.zeros(k, dtype=bool)
        clicked[position[event_type == "click"]] = True
        return np.where(clicked, out, 0.0)

    def _credit_of(self, event_type: np.ndarray, value: np.ndarray) -> np.ndarray:
        """``engagement_of`` of each (event type, value), remembered: a simulation asks for the
        same few thousand pairs (dwell is rounded to 0.1 s) again and again."""
        # No value (NaN) is keyed as -1, since NaN never equals itself; no real value is negative.
        keys = list(zip(event_type.tolist(), np.nan_to_num(value, nan=-1.0).tolist(), strict=True))
        missing = list(dict.fromkeys(key for key in keys if key not in self._credits))
        if missing:
            values = [v if v >= 0 else np.nan for _, v in missing]
            frame = pd.DataFrame({"event_type": [t for t, _ in missing], "value": values})
            self._credits.update(zip(missing, engagement_of(frame, self.dwell_cap).tolist(), strict=True))
        return np.asarray([self._credits[key] for key in keys], dtype=np.float64)


def expected_engagement_given_click(affinity: np.ndarray, dwell_cap: float) -> np.ndarray:
    """E[engagement label | click] for impressions of these affinities (1-D).

    After a click come, independently as ``draw_responses`` draws them, a view (with dwell)
    and, given the view, a cart (and perhaps a purchase), a rating (stars) and a like. The
    label is the largest credit among them, the click's own at least. The discrete outcomes
    fix a floor ``m`` (their largest credit); the view adds ``E[max(m, credit(dwell))]``.
    """
    odds = response_odds(affinity)
    credit = _credits(dwell_cap)
    c_click = credit["click"]
    # (probability, floor) of each combination of the discrete outcomes after a view.
    cart_states = [
        (1 - odds.cart_given_view, 0.0),
        (odds.cart_given_view * (1 - odds.purchase_given_cart), credit["add_to_cart"]),
        (odds.cart_given_view * odds.purchase_given_cart, max(credit["add_to_cart"], credit["purchase"])),
    ]
    like_states = [(1 - odds.like_given_view, 0.0), (odds.like_given_view, credit["like"])]
    stars_p = _stars_probabilities(odds.stars_mean, odds.stars_sd)
    rating_states = [(np.full_like(affinity, 1 - odds.rate_given_view), 0.0)] + [
        (odds.rate_given_view * stars_p[:, n], credit[f"rating:{s}"]) for n, s in enumerate(STARS)
    ]
    floors: dict[float, np.ndarray] = {}
    for p_cart, v_cart in cart_states:
        for p_like, v_like in like_states:
            for p_rate, v_rate in rating_states:
                m = max(c_click, v_cart, v_like, v_rate)
                floors[m] = floors.get(m, 0.0) + p_cart * p_like * p_rate
    dwell_credit = _dwell_credit_at_quantiles(odds.dwell_log_mean, odds.dwell_log_sd, dwell_cap)
    after_view = sum(p * np.maximum(m, dwell_credit).mean(axis=1) for m, p in floors.items())
    v = odds.view_given_click
    return v * after_view + (1 - v) * c_click


def _credits(dwell_cap: float) -> dict[str, float]:
    """The ranker's engagement credit of each discrete outcome (``engagement_of``)."""
    kinds = [("click", np.nan), ("add_to_cart", np.nan), ("purchase", np.nan), ("like", np.nan)]
    kinds += [("rating", float(s)) for s in STARS]
    frame = pd.DataFrame({"event_type": [k for k, _ in kinds], "value": [v for _, v in kinds]})
    values = engagement_of(frame, dwell_cap).to_numpy()
    names = [k if k != "rating" else f"rating:{int(v)}" for k, v in kinds]
    return dict(zip(names, values.tolist(), strict=True))


def _stars_probabilities(mean: np.ndarray, sd: float) -> np.ndarray:
    """[n, 5] P(stars = s): a normal around ``mean`` rounded to the nearest star, clipped to 1..5."""
    cdf = np.vectorize(NormalDist().cdf)
    cuts = cdf((np.asarray([1.5, 2.5, 3.5, 4.5])[None, :] - mean[:, None]) / sd)
    below = np.concatenate([np.zeros((len(mean), 1)), cuts, np.ones((len(mean), 1))], axis=1)
    return np.diff(below, axis=1)


def _dwell_credit_at_quantiles(log_mean: np.ndarray, log_sd: float, dwell_cap: float) -> np.ndarray:
    """[n, DWELL_QUANTILES] the view's credit (``engagement_of``) at evenly spaced quantiles of
    each dwell lognormal, in seconds rounded to 0.1 as the generator writes them."""
    z = np.array([NormalDist().inv_cdf((j + 0.5) / DWELL_QUANTILES) for j in range(DWELL_QUANTILES)])
    dwell = np.round(np.exp(log_mean[:, None] + log_sd * z[None, :]), 1)
    # Rounded dwell takes a few thousand distinct values: the definition is evaluated on those.
    values, inverse = np.unique(dwell, return_inverse=True)
    credit = engagement_of(pd.DataFrame({"event_type": "view", "value": values}), dwell_cap).to_numpy()
    return credit[inverse].reshape(dwell.shape)


def _positions(index: dict[str, int], ids: Sequence[str], what: str, source: Path | None) -> np.ndarray:
    out = [index.get(str(x), -1) for x in ids]
    missing = [str(x) for x, p in zip(ids, out, strict=True) if p < 0]
    if missing:
        where = f" at {source}" if source is not None else ""
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(f"{what} ids not in the truth{where}: {shown}")
    return np.asarray(out, dtype=np.int64)
