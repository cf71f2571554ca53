"""Explanations: reasons that name what drove an item, and leave-one-input-out attributions.

Reasons are checked on hand-built evidence (each rule on its own) and on a real snapshot of
a tiny retrieval version written to disk (directions, item-bias coordinate, popularity), so
that a wrong driver (similarity named where popularity lifted the item, a category the
user never touched) fails. Attributions are checked on a scorer whose effects are known.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from recsys.artifacts import EMBEDDINGS_FILE, ITEM_IDS_FILE, REQUIREMENTS, assets_extra
from recsys.ranking import ServingPolicy
from serving.gateway.catalog import ItemCatalog, ModelVersions, RetrievalAssets
from serving.gateway.explanations import (
    REASON_PICKED,
    REASON_POPULAR,
    ItemEvidence,
    RecentTaste,
    attributions,
    category_reason,
    driver_reasons,
    gather_evidence,
    leave_one_out_rows,
    median_of,
    quantile_of_sorted,
    similar_reason,
    source_attribution,
)
from serving.gateway.recommendation_flow import RecommendationFlow
from serving.gateway.snapshot import Snapshot

NAN = float("nan")


def _evidence(**fields: object) -> ItemEvidence:
    """One item's evidence: no similarity, no category, no lift, not popular, unless given."""
    base: dict[str, object] = {
        "similarity": np.zeros((1, 2)),
        "near_cut": np.full(2, 0.9),
        "categories": [frozenset({"books"})],
        "taste_lift": np.array([0.0]),
        "prior_lift": np.array([0.0]),
        "popular": np.array([False]),
    }
    base.update(fields)
    return ItemEvidence(**base)  # type: ignore[arg-type]


GAMER = RecentTaste(item_ids=["g1", "g2"], categories=[frozenset({"games"}), frozenset({"games", "toys"})])


# --- reasons, rule by rule ---------------------------------------------------------------------


def test_a_popular_item_lifted_by_its_prior_is_explained_by_popularity_even_when_similar() -> None:
    # The prior leads the median candidate by 0.3, taste by 0.1: popularity put it there,
    # though it is also near g1 (0.95, above the candidates' cut) and shares "games".
    lifted = _evidence(
        similarity=np.array([[0.95, 0.2]]),
        categories=[frozenset({"games"})],
        taste_lift=np.array([0.1]),
        prior_lift=np.array([0.3]),
        popular=np.array([True]),
    )
    assert driver_reasons(lifted, GAMER) == [REASON_POPULAR]
    # Taste leading instead: the similarity is the story.
    taste_led = _evidence(**{**lifted.__dict__, "taste_lift": np.array([0.4])})
    assert driver_reasons(taste_led, GAMER) == [similar_reason("g1")]


def test_a_prior_that_leads_for_an_item_nobody_engaged_with_is_not_called_popular() -> None:
    # A new item's prior comes from its content; with no positives it is not "popular".
    new_item = _evidence(
        categories=[frozenset({"games"})], prior_lift=np.array([0.5]), popular=np.array([False])
    )
    assert driver_reasons(new_item, GAMER) == [category_reason("games", 2, 2)]


def test_similarity_is_named_only_where_the_item_is_nearer_than_most_candidates() -> None:
    # g1 is the nearest recent item (0.9) but three quarters of the candidates are as near
    # it (cut 0.92): that similarity put nothing there. g2 is less near (0.8) yet far above
    # what candidates reach (0.6): that is the one to name.
    ev = _evidence(similarity=np.array([[0.9, 0.8]]), near_cut=np.array([0.92, 0.6]))
    assert driver_reasons(ev, GAMER) == [similar_reason("g2")]
    # Standing out is not enough below the absolute floor (0.5): nearest, but not near.
    far = _evidence(similarity=np.array([[0.4, 0.3]]), near_cut=np.array([0.1, 0.1]))
    assert driver_reasons(far, GAMER) == [REASON_PICKED]


def test_the_category_named_is_the_one_most_recent_items_share() -> None:
    # Both of the user's items are games, one is also toys: an item in toys and games is
    # explained by games (2 of 2), one in toys only by toys (1 of 2), one in books by neither.
    ev = _evidence(
        similarity=np.zeros((3, 2)),
        categories=[frozenset({"toys", "games"}), frozenset({"toys"}), frozenset({"books"})],
        taste_lift=np.zeros(3),
        prior_lift=np.zeros(3),
        popular=np.zeros(3, dtype=bool),
    )
    assert driver_reasons(ev, GAMER) == [
        "in games, like 2 of your 2 recent items",
        "in toys, like 1 of your 2 recent items",
        REASON_PICKED,
    ]


def test_without_a_prior_coordinate_a_popular_item_with_no_affinity_is_explained_by_popularity() -> None:
    no_prior = {"prior_lift": np.array([NAN]), "taste_lift": np.array([NAN]), "popular": np.array([True])}
    assert driver_reasons(_evidence(**no_prior), GAMER) == [REASON_POPULAR]
    # The same popular item in the user's category: the affinity is the story.
    liked = _evidence(**no_prior, categories=[frozenset({"games"})])
    assert driver_reasons(liked, GAMER) == [category_reason("games", 2, 2)]


def test_a_user_without_recent_items_gets_popularity_or_the_model() -> None:
    nobody = RecentTaste(item_ids=[], categories=[])
    ev = _evidence(
        similarity=np.zeros((2, 0)),
        near_cut=np.zeros(0),
        categories=[frozenset({"games"})] * 2,
        taste_lift=np.array([0.0, 0.0]),
        prior_lift=np.array([0.2, -0.1]),
        popular=np.array([True, True]),
    )
    assert driver_reasons(ev, nobody) == [REASON_POPULAR, REASON_PICKED]


# --- reasons from a real snapshot ------------------------------------------------------------

# A retrieval version as training exports it with item_bias: unit directions plus the prior
# as the last coordinate. Two taste directions: "games" along x, "books" along y.
ITEMS = {
    # item: (direction, prior, category, positives)
    "g1": ((1.0, 0.0), 0.0, "games", 3.0),
    "g2": ((0.99, 0.141), 0.0, "games", 2.0),
    "g3": ((0.96, 0.28), 0.0, "games", 1.0),
    "g_new": ((0.98, -0.2), 0.0, "games", 0.0),
    "hit": ((0.0, 1.0), 1.5, "books", 90.0),  # popular, nothing like games
    "b1": ((0.1, 0.995), 0.0, "books", 1.0),
    "b2": ((0.2, 0.98), 0.0, "books", 2.0),
    "b3": ((0.28, 0.96), 0.0, "books|games", 1.0),
}


def _snapshot(root: Path, with_prior: bool = True) -> tuple[Snapshot, RetrievalAssets]:
    ids = list(ITEMS)
    rows = [[*d, p] if with_prior else [*d, 0.0] for d, p, _, _ in ITEMS.values()]
    version = root / "retrieval" / "1"
    extra = assets_extra(version)
    extra.mkdir(parents=True)
    emb = np.asarray(rows, dtype=np.float32)
    emb[:, :2] /= np.linalg.norm(emb[:, :2], axis=1, keepdims=True)
    if not with_prior:
        emb = emb[:, :2] * np.array(
            [[3.0], [1.0], [2.0], [1.0], [2.5], [1.0], [1.5], [1.0]], dtype=np.float32
        )
    np.save(extra / EMBEDDINGS_FILE, emb)
    (extra / ITEM_IDS_FILE).write_text(json.dumps(ids))
    (extra / REQUIREMENTS).write_text(json.dumps({"inputs": {}}))
    assets = RetrievalAssets(version)
    positives = np.array([v[3] for v in ITEMS.values()], dtype=np.float32)
    cats = [v[2] for v in ITEMS.values()]
    catalog = ItemCatalog(
        item_ids=np.asarray(ids, dtype=object),
        position={i: n for n, i in enumerate(ids)},
        columns={"category": np.asarray(cats, dtype=object)},
        in_stock=np.ones(len(ids), dtype=bool),
        category_sets=[frozenset(c.split("|")) for c in cats],
        positives=positives,
        new=positives == 0,
        global_popular=np.argsort(-positives, kind="stable"),
        segment_popular={},
        source_mtime=0.0,
    )
    n = np.arange(len(ids))
    versions = ModelVersions({"retrieval": {"stable": 1}}, {1: assets}, {})
    snap = Snapshot(versions, catalog, {1: n}, {1: n}, np.ones(len(ids), dtype=bool))
    return snap, assets


def _reasons_for(
    snap: Snapshot, assets: RetrievalAssets, recent: list[str], query: tuple[float, float]
) -> dict[str, str]:
    """Reasons for every unseen item, the candidates scored as the retriever scores them."""
    pos = snap.catalog.position
    recent_pos = np.array([pos[i] for i in recent])
    pool = np.array([p for i, p in pos.items() if i not in recent])
    q = np.array([*query, 1.0] if assets.embeddings.shape[1] == 3 else list(query), dtype=np.float32)
    scores = assets.embeddings[pool] @ q  # taste (cosine of query and item) + prior
    said = driver_reasons(*gather_evidence(snap, assets, pool, recent_pos, pool, scores))
    return {str(snap.catalog.item_ids[p]): r for p, r in zip(pool, said, strict=True)}


def test_a_one_category_history_is_named_and_the_popular_stranger_is_popular(tmp_path: Path) -> None:
    snap, assets = _snapshot(tmp_path)
    # A user whose recent items are all games; the query points the games way.
    reasons = _reasons_for(snap, assets, ["g1", "g2"], query=(0.97, 0.24))
    # The popular book has no affinity with games: its prior (1.5 above the median 0) is
    # what scores it, and its positives are the candidates' highest.
    assert reasons["hit"] == REASON_POPULAR
    # Every games item is explained by the games history: a recent item or the category.
    for item in ("g3", "g_new"):
        assert reasons[item] in {similar_reason("g1"), similar_reason("g2"), category_reason("games", 2, 2)}
    assert reasons["g_new"] != REASON_POPULAR  # no positives: never "popular"
    # Books are neither near the history nor in its category.
    assert reasons["b1"] == REASON_PICKED and reasons["b3"] == category_reason("games", 2, 2)


def test_without_a_prior_the_catalog_popularity_explains_an_unrelated_hit(tmp_path: Path) -> None:
    snap, assets = _snapshot(tmp_path, with_prior=False)
    assert assets.unit.shape[1] == assets.embeddings.shape[1]  # no prior coordinate recognised
    reasons = _reasons_for(snap, assets, ["g1", "g2"], query=(0.97, 0.24))
    assert reasons["hit"] == REASON_POPULAR
    assert reasons["g3"] in {similar_reason("g1"), similar_reason("g2"), category_reason("games", 2, 2)}


def test_evidence_cuts_and_lifts_are_numpys_on_the_candidates(tmp_path: Path) -> None:
    # The evidence is computed the quick way (sorted rows, only the cuts some item can use,
    # a vectorised position look-up); here it is checked against the plain computation.
    snap, assets = _snapshot(tmp_path)
    pos = snap.catalog.position
    recent_pos = np.array([pos["g1"], pos["b1"]])
    pool = np.array([p for i, p in pos.items() if i not in ("g1", "b1")])
    scores = assets.embeddings[pool] @ np.array([0.97, 0.24, 1.0], dtype=np.float32)
    shown = np.array([pool[2], pool[0], pos["g1"]])  # the last one is not a candidate
    items, _ = gather_evidence(snap, assets, shown, recent_pos, pool, scores)

    recent_unit = snap.unit_rows(assets, recent_pos)
    similarity = snap.unit_rows(assets, shown) @ recent_unit.T
    plain_cut = np.quantile(snap.unit_rows(assets, pool) @ recent_unit.T, 0.75, axis=0)
    needed = (similarity >= 0.5).any(axis=0)
    assert needed.any()
    np.testing.assert_array_equal(items.near_cut[needed], plain_cut[needed])
    assert np.isinf(items.near_cut[~needed]).all()  # no item is near enough: no cut needed
    # Lifts read each shown candidate's own row; the non-candidate has none.
    taste = scores.astype(np.float64) - assets.embeddings[pool, -1]
    expected = [taste[2] - np.median(taste), taste[0] - np.median(taste)]
    np.testing.assert_allclose(items.taste_lift[:2], expected)
    assert np.isnan(items.taste_lift[2]) and np.isnan(items.prior_lift[2])


def test_the_category_taste_share_reorders_candidates_and_names_the_shared_category(tmp_path: Path) -> None:
    snap, assets = _snapshot(tmp_path)
    catalog = snap.catalog
    recent_pos = catalog.positions(["g1", "g2", "b1"])  # two games, one book
    pool = catalog.positions(["hit", "g3", "b2", "g_new", "b3"])
    scores = np.array([5.0, 1.0, 2.0, 0.0, 0.5])  # retrieval prefers the hit, then b2
    unchanged = RecommendationFlow._with_taste(catalog, assets, recent_pos, pool, scores, {})
    assert unchanged[0] is pool  # a version pushed without a policy
    assets.serving_policy = ServingPolicy(retrieval_weight=None, taste_weight=0.5, rank_depth=10)
    reasons: dict[int, str] = {}
    pos, blended = RecommendationFlow._with_taste(catalog, assets, recent_pos, pool, scores, reasons)
    order = [str(catalog.item_ids[p]) for p in pos]
    # Half the score is the taste: games (2 of 3 recent items) count twice what books do,
    # so the games items and b3 (books|games) pass b2; the hit's lead holds.
    assert order == ["hit", "g3", "b3", "g_new", "b2"] and np.all(np.diff(blended) <= 0)
    # Where the taste part outweighs the rest, the reason names the shared category.
    assert reasons[catalog.position["g_new"]] == category_reason("games", 2, 3)
    assert reasons[catalog.position["b3"]] == category_reason("games", 2, 3)
    assert catalog.position["hit"] not in reasons  # its own score part outweighs the taste's


# --- attribution -------------------------------------------------------------------------------

INPUTS = {
    "user_id": "string",
    "recent_items": "string",
    "hour": "int64",
    "item_id": "string",
    "item_ctr_7d": "float32",
}


def _pair_rows() -> dict[str, np.ndarray]:
    def strings(*values: object) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out

    return {
        "user_id": strings("u1", "u1"),
        "recent_items": strings("a b", "a b"),
        "hour": np.array([9, 9], dtype=np.int64),
        "item_id": strings(b"i1", b"i2"),  # the catalog's wire cache holds bytes
        "item_ctr_7d": np.array([0.5, 0.0], dtype=np.float32),
    }


def _known_scorer(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """A ranker whose every effect is known: +0.4 for any history, -0.02 per hour, +1.0 x ctr,
    +0.1 for item i1, and 0 for the user id."""
    history = np.array([v != "" for v in batch["recent_items"]], dtype=np.float64)
    item = np.array([v == b"i1" for v in batch["item_id"]], dtype=np.float64)
    return 0.4 * history - 0.02 * batch["hour"] + 1.0 * batch["item_ctr_7d"] + 0.1 * item


def test_leave_one_out_rows_blank_one_input_per_block() -> None:
    batch, names, at_default = leave_one_out_rows(_pair_rows(), INPUTS)
    assert names == list(INPUTS) and all(len(c) == 2 * (1 + len(INPUTS)) for c in batch.values())
    for g, name in enumerate(names):
        block = slice(2 * (g + 1), 2 * (g + 2))
        # The input is at its default in its own block ("" / b"" / 0), as served elsewhere.
        assert all(v in ("", b"", 0) for v in batch[name][block]), name
        assert list(batch[name][:2]) == list(_pair_rows()[name])
        others = [n for n in names if n != name]
        assert all(list(batch[o][block]) == list(_pair_rows()[o]) for o in others)
    assert batch["item_id"][8] == b""  # bytes stay bytes: the wire cache's fast path
    # Item i2's ctr is already 0: nothing to take away.
    assert at_default.tolist() == [
        [False, False],
        [False, False],
        [False, False],
        [False, False],
        [False, True],
    ]


def test_attributions_are_signed_effects_largest_first() -> None:
    batch, names, at_default = leave_one_out_rows(_pair_rows(), INPUTS)
    out = attributions(_known_scorer(batch), names, at_default, top=3)
    # Item i1: ctr 0.5 adds 0.5, history adds 0.4, hour 9 takes 0.18, item id adds 0.1,
    # user id nothing: the top three by size, with their signs.
    assert out[0] == [
        {"kind": "input", "name": "item_ctr_7d", "effect": pytest.approx(0.5)},
        {"kind": "input", "name": "recent_items", "effect": pytest.approx(0.4)},
        {"kind": "input", "name": "hour", "effect": pytest.approx(-0.18)},
    ]
    # Item i2: its ctr is already 0 (left out); the item id adds nothing; ties by name.
    full = attributions(_known_scorer(batch), names, at_default, top=10)[1]
    assert [a["name"] for a in full] == ["recent_items", "hour", "item_id", "user_id"]
    assert full[1]["effect"] == pytest.approx(-0.18)


def test_an_item_the_ranker_did_not_score_names_its_source() -> None:
    assert source_attribution("exploration") == [{"kind": "source", "name": "exploration", "effect": None}]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_quantiles_and_medians_are_numpys_to_the_bit(dtype: type) -> None:
    # Read off sorted rows with NumPy's own interpolation: a last-bit difference could move an
    # item across the similarity cut, so the values must be NumPy's exactly, in its dtype.
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, lanes = int(rng.integers(1, 1200)), int(rng.integers(1, 5))
        rows = np.sort((rng.standard_normal((lanes, n)) * 100).astype(dtype), axis=1)
        for q in (0.75, 0.5, 0.9, 0.33):
            want, got = np.quantile(rows, q, axis=1), quantile_of_sorted(rows, q)
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype
            one = quantile_of_sorted(rows[0], q)
            assert one == np.quantile(rows[0], q) and type(one) is type(np.quantile(rows[0], q))
        values = rows[0].astype(np.float64)
        rng.shuffle(values)
        assert median_of(values) == np.median(values)
    assert np.isnan(median_of(np.array([1.0, np.nan, 3.0])))
