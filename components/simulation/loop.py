"""The simulation: sampled users of the truth ask each policy for items, and respond as the truth says.

For every policy the same users make the same number of requests, and request ``r`` of user
``u`` draws its response with the seed ``(seed, u, r)``: two policies that show the same items
get the same response (common random numbers), so differences between policies are theirs,
not the dice's. Each policy keeps its own copy of each user's state: what they engaged with
in the simulation is not shown to them again, and their recent items move to the front of
the query, exactly as the gateway filters and queries (``Request``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.simulation.policies import Policy, Request, Universe
from components.simulation.truth import Truth
from recsys.contracts import CATEGORY_SEPARATOR
from recsys.feature_schema import POSITIVE_EVENT_TYPES
from recsys.storage import read_table

if TYPE_CHECKING:
    from components.features.rows import FeatureSource
    from recsys.config import Settings

# Columns of the per-request records.
RECORD_COLUMNS = (
    "policy", "user_id", "user_index", "request", "arm", "fallback", "items", "shown", "unsimulated",
    "not_allowed", "reward", "expected_reward", "clicks", "engagement", "purchases",
)  # fmt: skip


@dataclass(frozen=True)
class SimulatedUser:
    """A user of the truth as the simulation replays them: history and usual context."""

    user_id: str
    index: int  # position in the sample: part of each response's seed
    recent_items: list[str]  # recent positive items in the data, newest first
    device: str
    hour: int


@dataclass(frozen=True)
class World:
    """What every policy is simulated against: the truth, the items, the sampled users."""

    truth: Truth
    universe: Universe
    users: list[SimulatedUser]
    popular_items: list[str]  # catalog items by positive events in the data, most first
    recent_limit: int  # the gateway's recent items length (``features.recent_items``)


def load_feature_source(settings: Settings, validated_dir: Path) -> FeatureSource:
    """Users' and items' features as of the end of the validated data (history, context, popularity)."""
    from components.features.rows import load_feature_source as load

    return load(settings.features, validated_dir)


def build_world(
    settings: Settings, truth: Truth, source: FeatureSource, validated_dir: Path, n_users: int, seed: int
) -> World:
    """The items the system may show and ``n_users`` users of the truth, sampled with ``seed``.

    The universe is the validated catalog as the gateway filters it (in stock when
    ``gateway.exclude_out_of_stock``, not in ``gateway.excluded_categories``), less items the
    truth does not know (their response cannot be simulated).

    Raises:
        ValueError: ``n_users`` below 1, or nothing left to show, naming the counts.
    """
    from components.features.rows import popular_items

    if n_users < 1:
        raise ValueError(f"--users must be at least 1, got {n_users}")
    items = read_table(validated_dir, "items", columns=["item_id", "category", "in_stock"])
    keep = truth.has_items(items["item_id"].astype(str).tolist())
    if settings.gateway.exclude_out_of_stock:
        keep &= items["in_stock"].fillna(False).to_numpy(dtype=bool)
    excluded = set(settings.gateway.excluded_categories)
    if excluded:
        cats = items["category"].fillna("").astype(str).str.split(CATEGORY_SEPARATOR)
        keep &= ~cats.map(lambda cs: bool(excluded & set(cs))).to_numpy(dtype=bool)
    universe = Universe.of(items["item_id"].astype(str)[keep].tolist())
    if len(universe) == 0:
        raise ValueError(
            f"no item of {validated_dir} ({len(items)} items) is both showable and in the truth "
            f"at {truth.source}: is the truth from the same data?"
        )
    rng = np.random.default_rng(seed)
    all_users = truth.user_ids
    chosen = rng.choice(len(all_users), size=min(n_users, len(all_users)), replace=False)
    users = [_simulated_user(source, all_users[c], n) for n, c in enumerate(chosen)]
    return World(truth, universe, users, popular_items(source), settings.features.recent_items)


def _simulated_user(source: FeatureSource, user_id: str, index: int) -> SimulatedUser:
    # A user without events has no row values (NaN): no history, the default context.
    row = source.users.loc[user_id] if user_id in source.users.index else pd.Series(dtype=object)
    recent, device, usual = (row.get(c) for c in ("recent_items", "device", "usual_hour"))
    recent_items = recent.split() if isinstance(recent, str) else []
    device = device if isinstance(device, str) and device else "unknown"
    hour = int(usual) if usual is not None and not pd.isna(usual) else int(source.as_of.hour)
    return SimulatedUser(user_id, index, recent_items, device, hour)


@dataclass
class UserState:
    """A user's simulation so far under one policy."""

    touched: set[str] = field(default_factory=set)  # items with any event but an impression
    recent: list[str] = field(default_factory=list)  # positive items, newest first


def simulate(
    world: World,
    policies: Sequence[Policy],
    requests_per_user: int,
    k: int,
    seed: int,
    on_request: Callable[[str], None] | None = None,
    states: dict[tuple[str, str], UserState] | None = None,
    first_request: int = 0,
) -> pd.DataFrame:
    """Replay every user of ``world`` against every policy; one record per request.

    Args:
        world: the truth, the universe and the sampled users.
        policies: the recommenders, each with its own ``name``.
        requests_per_user: requests each user makes of each policy.
        k: items per request.
        seed: with the user's index and the request number, seeds each response.
        on_request: called with the policy's name after each request (progress).
        states: (policy, user id) -> what that user did so far under that policy, carried
            in and updated (a later round of the same users); None: every user starts afresh.
        first_request: the first request's number (a later round continues the numbering,
            so its responses draw fresh seeds).

    Returns:
        Records with ``RECORD_COLUMNS``: per request the items shown (``items``, space-joined,
        best first; ``shown`` counts them), those the truth cannot answer for (``unsimulated``,
        no reward) or the request did not allow (``not_allowed``), the degraded paths the
        policy's answer named (``fallback``, space-joined; a gateway whose feature read missed
        its deadline says ``features:defaults`` and could not know the recent items to
        exclude), the realized ``reward``
        (objective-weighted clicks and engagement), its ``expected_reward`` under the truth,
        ``clicks``, ``engagement`` and ``purchases``.
    """
    if requests_per_user < 1 or k < 1:
        raise ValueError(f"--requests-per-user and --k must be at least 1, got {requests_per_user} and {k}")
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise ValueError(f"policy names must differ, got {names}")
    rows: list[dict[str, Any]] = []
    states = {} if states is None else states
    for policy in policies:
        for user in world.users:
            state = states.setdefault((policy.name, user.user_id), UserState())
            for number in range(first_request, first_request + requests_per_user):
                rows.append(_one_request(world, policy, user, state, number, k, seed))
                if on_request is not None:
                    on_request(policy.name)
    return pd.DataFrame(rows, columns=list(RECORD_COLUMNS))


def _one_request(
    world: World, policy: Policy, user: SimulatedUser, state: UserState, number: int, k: int, seed: int
) -> dict[str, Any]:
    """Ask, respond, record, and carry what the user did into their state."""
    # The gateway's filter: the recent items (the simulation's first, then the data's, as many
    # as the online row holds) and everything the user touched since.
    recent = list(dict.fromkeys([*state.recent, *user.recent_items]))[: world.recent_limit]
    allowed = ~world.universe.mask(set(recent) | state.touched)
    request = Request(user.user_id, number, k, allowed, recent, user.device, user.hour)
    shown = policy.recommend(request)
    items = list(dict.fromkeys(str(i) for i in shown.item_ids))[:k]
    simulatable = [i for i in items if i in world.universe.position]
    not_allowed = sum(1 for i in simulatable if not allowed[world.universe.position[i]])
    rng = np.random.default_rng([seed, user.index, number])
    response = world.truth.respond(rng, user.user_id, simulatable)
    expected = world.truth.expected_reward([user.user_id], simulatable).sum() if simulatable else 0.0
    policy.observe(request, shown, response)
    _carry(state, response.events)
    return {
        "policy": policy.name,
        "user_id": user.user_id,
        "user_index": user.index,
        "request": number,
        "arm": shown.arm or "",
        "fallback": " ".join(shown.details.get("fallback", ())),
        "items": " ".join(items),
        "shown": len(items),
        "unsimulated": len(items) - len(simulatable),
        "not_allowed": not_allowed,
        "reward": float(response.reward.sum()),
        "expected_reward": float(expected),
        "clicks": int(response.click.sum()),
        "engagement": float(response.engagement.sum()),
        "purchases": int((response.events["event_type"] == "purchase").sum()),
    }


def _carry(state: UserState, events: pd.DataFrame) -> None:
    """The user's events into their state, as the gateway's memory of a user takes them."""
    event_type = events["event_type"].to_numpy()
    item_id = events["item_id"].to_numpy()
    state.touched.update(item_id[event_type != "impression"].tolist())
    positive = item_id[np.isin(event_type, POSITIVE_EVENT_TYPES)].tolist()
    # Events come in time order; the newest positive leads.
    state.recent = list(dict.fromkeys([*reversed(positive), *state.recent]))
