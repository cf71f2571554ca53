"""The truth beside the synthetic data: written and read exactly, and it explains the data.

The simulator is only as good as its claim that the truth is what the data was drawn from,
so the central tests here hold the truth's expectations against the generated events
themselves (click rate and the ranker's own labels), and against draws of ``respond``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.simulation.truth import (
    Truth,
    expected_engagement_given_click,
    find_truth,
    load_truth,
    truth_dir,
)
from components.sources.synthetic import (
    affinity_of,
    draw_truth,
    generate,
    generate_to_folder,
    generate_with_truth,
    read_truth,
    response_odds,
    write_truth,
)
from components.training.train import ranker_examples
from recsys.config import TrainingConfig
from tests.support.tiny_data import tiny_params


@pytest.fixture(scope="module")
def drawn() -> tuple[dict[str, pd.DataFrame], Truth]:
    """A data set big enough for rates to be measured, and its truth."""
    frames, synthetic = generate_with_truth(tiny_params(users=1500, items=150, days=10))
    return frames, Truth(synthetic, TrainingConfig())


def test_the_truth_costs_no_change_to_the_data_and_is_drawn_without_the_events():
    params = tiny_params()
    frames, synthetic = generate_with_truth(params)
    plain = generate(params)
    for name, frame in plain.items():
        pd.testing.assert_frame_equal(frame, frames[name])
    alone = draw_truth(params)
    np.testing.assert_array_equal(alone.taste, synthetic.taste)
    np.testing.assert_array_equal(alone.item_latent, synthetic.item_latent)
    assert list(alone.user_ids) == list(frames["users"]["user_id"])
    assert list(alone.item_ids) == list(frames["items"]["item_id"])


def test_written_beside_the_data_and_read_back_exactly(tmp_path):
    generate_to_folder(tiny_params(), tmp_path / "data")
    folder = truth_dir(tmp_path / "data")
    assert (folder / "manifest.json").is_file()
    assert find_truth(tmp_path / "data") == folder and find_truth(folder) == folder
    back = read_truth(folder)
    original = draw_truth(tiny_params())
    # float64 on disk: the affinities a reader computes are the generator's, bit for bit.
    np.testing.assert_array_equal(back.taste, original.taste)
    np.testing.assert_array_equal(back.user_latent, original.user_latent)
    np.testing.assert_array_equal(back.item_latent, original.item_latent)
    np.testing.assert_array_equal(back.item_primary, original.item_primary)
    assert back.params["seed"] == 11 and back.params["late_item_fraction"] == 0.2
    assert load_truth(tmp_path / "data").expected_reward(["u000"], ["i00", "i01"]).shape == (1, 2)


def test_unknown_ids_and_foreign_folders_are_refused_by_name(tmp_path, drawn):
    _, truth = drawn
    with pytest.raises(ValueError, match="user ids not in the truth.*nobody"):
        truth.expected_reward(["nobody"], ["i000"])
    with pytest.raises(ValueError, match="item ids not in the truth.*i_gone"):
        truth.respond(np.random.default_rng(0), "u0000", ["i000", "i_gone"])
    with pytest.raises(FileNotFoundError, match="no truth at"):
        load_truth(tmp_path)
    write_truth(draw_truth(tiny_params()), tmp_path / "truth")
    manifest = (tmp_path / "truth" / "manifest.json").read_text()
    (tmp_path / "truth" / "manifest.json").write_text(manifest.replace("synthetic-affinity-v1", "v0"))
    with pytest.raises(ValueError, match="response_model='v0'"):
        load_truth(tmp_path / "truth")


def _unique_impressions(events: pd.DataFrame) -> pd.DataFrame:
    """Impressions of an item shown once in its request: its outcomes are its own."""
    imp = events[events["event_type"] == "impression"]
    keys = ["request_id", "user_id", "item_id"]
    return imp[~imp.duplicated(keys, keep=False)]


def _pair_affinity(truth: Truth, rows: pd.DataFrame) -> np.ndarray:
    """The affinity of each (user_id, item_id) row, as the generator computed it."""
    u, i = truth.user_positions(rows["user_id"].tolist()), truth.item_positions(rows["item_id"].tolist())
    t = truth.synthetic
    return affinity_of(t.taste[u, t.item_primary[i]], t.user_latent[u], t.item_latent[i])


def test_the_truths_click_chance_is_the_datas_click_rate(drawn):
    frames, truth = drawn
    events = frames["events"]
    imp = _unique_impressions(events)
    clicks = events[events["event_type"] == "click"][["request_id", "user_id", "item_id"]].assign(clicked=1)
    imp = imp.merge(clicks.drop_duplicates(), how="left").fillna({"clicked": 0})
    p_click = response_odds(_pair_affinity(truth, imp)).click
    observed = imp["clicked"].to_numpy()
    # Bins of predicted chance: the observed rate in each is within 4 standard errors of the mean chance.
    for lo, hi in ((0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.0)):
        m = (p_click >= lo) & (p_click < hi)
        assert m.sum() > 200, (lo, hi, m.sum())
        se = np.sqrt(p_click[m].mean() * (1 - p_click[m].mean()) / m.sum())
        assert abs(observed[m].mean() - p_click[m].mean()) < 4 * se, (lo, hi)


def test_expected_reward_is_the_mean_of_the_rankers_own_labels_on_the_data(drawn):
    # The ranker's labels of each impression (clicked; largest engagement that followed),
    # weighed by its objective weights, average to what the truth expects of those impressions.
    frames, truth = drawn
    events = frames["events"].merge(frames["items"][["item_id", "category"]], on="item_id")
    examples, how = ranker_examples(events, TrainingConfig(), ["category"])
    assert how == "impressions"
    unique = _unique_impressions(events)["event_id"]
    examples = examples[examples["event_id"].isin(set(unique))]
    w = TrainingConfig().objective_weights
    label_reward = w["click"] * examples["label_click"] + w["engagement"] * examples["label_engagement"]
    expected = truth.expected_reward_of_affinity(_pair_affinity(truth, examples))
    se = label_reward.std() / np.sqrt(len(examples))
    assert len(examples) > 5000
    assert abs(label_reward.mean() - expected.mean()) < 4 * se, (label_reward.mean(), expected.mean(), se)
    # Engagement alone, where it lives (clicked impressions): a sharper test of its expectation.
    clicked = examples[examples["label_click"] == 1]
    engagement = expected_engagement_given_click(_pair_affinity(truth, clicked), truth.dwell_cap)
    se = clicked["label_engagement"].std() / np.sqrt(len(clicked))
    assert se < 0.01
    assert abs(clicked["label_engagement"].mean() - engagement.mean()) < 4 * se


def test_respond_draws_as_the_generator_does_and_averages_to_the_expectation(drawn):
    _, truth = drawn
    user, items = "u0007", ["i000", "i001", "i002", "i003", "i004"]
    a = truth.respond(np.random.default_rng(3), user, items)
    b = truth.respond(np.random.default_rng(3), user, items)
    pd.testing.assert_frame_equal(a.events, b.events)
    # Every item gets its impression first; a view follows a click; a purchase follows a cart.
    assert (a.events.groupby("position")["event_type"].first() == "impression").all()
    # Many draws of the same request: the mean reward per item approaches the expectation.
    n = 30_000
    many = truth.respond(np.random.default_rng(5), user, items * n)
    kinds = many.events.groupby("event_type")["position"].apply(set)
    assert kinds["view"] <= kinds["click"] and kinds["purchase"] <= kinds["add_to_cart"]
    reward = many.reward.reshape(n, len(items))
    assert np.allclose(many.reward, many.click + 0.5 * many.engagement)
    expected = truth.expected_reward([user], items)[0]
    se = reward.std(axis=0) / np.sqrt(n)
    assert (np.abs(reward.mean(axis=0) - expected) < 4 * se + 1e-9).all(), (reward.mean(axis=0), expected)


def test_expected_reward_grows_with_affinity_and_follows_the_weights():
    truth = Truth(draw_truth(tiny_params()), TrainingConfig())
    grid = np.linspace(-8, 6, 200)
    r = truth.expected_reward_of_affinity(grid)
    assert (np.diff(r) > 0).all()
    # Engagement alone weighs less than click + engagement, and a click is worth at most 1.
    engagement_only = Truth(draw_truth(tiny_params()), TrainingConfig(objective_weights={"engagement": 1.0}))
    e = engagement_only.expected_reward_of_affinity(grid)
    assert ((0 < e) & (e < r)).all() and r.max() < 1.5
