"""Leave-one-out histories (training.history = leave_one_out) and the MovieLens profile."""

from __future__ import annotations

import pandas as pd

from components.training.train import leave_one_out_history, with_profile_history
from recsys.config import load_settings, profile_path


def _frame() -> pd.DataFrame:
    ts = pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05"], utc=True)
    return pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u2", "u1"],
            "item_id": ["a", "b", "c", "a", "x"],
            "event_type": ["rating", "rating", "rating", "rating", "impression"],
            "ts": ts,
            "recent_items": ["", "a", "b a", "", "c b a"],
        }
    )


def test_each_row_gets_the_users_other_positives_newest_first() -> None:
    out = leave_one_out_history(_frame(), max_history=10)
    # The row's own item is left out; the impression of "x" is no positive, so never history.
    assert out["recent_items"].tolist() == ["c b", "c a", "b a", "", "c b a"]


def test_leave_one_out_histories_carry_their_items_times_and_ages_from_the_whole_profile() -> None:
    out = leave_one_out_history(_frame(), max_history=10)
    day = 86_400
    jan = {d: int(pd.Timestamp(f"2026-01-0{d}", tz="UTC").timestamp()) for d in range(1, 6)}
    assert out["recent_item_times"].tolist() == [
        f"{jan[3]} {jan[2]}",
        f"{jan[3]} {jan[1]}",
        f"{jan[2]} {jan[1]}",
        "",
        f"{jan[3]} {jan[2]} {jan[1]}",
    ]
    # Ages from the user's newest positive (Jan 3), or the row's time if later (the
    # impression on Jan 5): as a query after the whole profile measures them.
    assert out["recent_item_ages"].tolist() == [
        f"0 {day}",
        f"0 {2 * day}",
        f"{day} {2 * day}",
        "",
        f"{2 * day} {3 * day} {4 * day}",
    ]


def test_profile_queries_carry_the_whole_profile_aged_at_the_query() -> None:
    queries = pd.DataFrame({"user_id": ["u1", "u9"], "ts": pd.to_datetime(["2026-01-10"] * 2, utc=True)})
    out = with_profile_history(queries, _frame(), max_history=2)
    day = 86_400
    assert out["recent_items"].tolist() == ["c b", ""]
    assert out["recent_item_ages"].tolist() == [f"{7 * day} {8 * day}", ""]
    jan = {d: int(pd.Timestamp(f"2026-01-0{d}", tz="UTC").timestamp()) for d in (2, 3)}
    assert out["recent_item_times"].tolist() == [f"{jan[3]} {jan[2]}", ""]


def test_history_is_capped_after_removing_the_rows_own_item() -> None:
    out = leave_one_out_history(_frame(), max_history=2)
    assert out["recent_items"].tolist() == ["c b", "c a", "b a", "", "c b"]


def test_the_movielens_profile_sets_leave_one_out_and_gates_the_served_system() -> None:
    settings = load_settings(profile_path("movielens"))
    assert settings.training.history == "leave_one_out"
    # The item-to-item source reads more of the profile than the query tower does.
    assert settings.features.recent_items >= settings.training.max_history
    # The serving policy is chosen on a validation part the evaluated models did not learn from.
    assert settings.training.validation_fraction > 0 and settings.training.refit_on_holdout
    assert settings.evaluation.gate_model == "served"
    # The default stays point-in-time: no future interaction leaks into a feature.
    assert load_settings(None).training.history == "point_in_time"


def test_random_split_holds_out_a_seeded_fraction_of_each_user() -> None:
    from components.evaluation.evaluate import split_holdout
    from recsys.config import EvaluationConfig

    ts = pd.date_range("2026-01-01", periods=40, freq="h", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": ["u1"] * 20 + ["u2"] * 19 + ["u3"],
            "item_id": [f"i{n}" for n in range(40)],
            "event_type": "rating",
            "ts": ts,
        }
    )
    config = EvaluationConfig(split="random", holdout_fraction=0.25, split_seed=3)
    train, holdout = split_holdout(events, config)
    assert len(train) + len(holdout) == 40 and not set(train["item_id"]) & set(holdout["item_id"])
    assert holdout["user_id"].value_counts().to_dict() == {"u1": 5, "u2": 4}  # u3's one row stays
    again, _ = split_holdout(events, config)
    assert again.equals(train)  # seeded: the same split every run
    other, _ = split_holdout(events, EvaluationConfig(split="random", holdout_fraction=0.25, split_seed=4))
    assert not other["item_id"].equals(train["item_id"])
    # Not random: the last whole days are held out.
    t_train, t_holdout = split_holdout(events, EvaluationConfig(holdout_days=1))
    assert t_holdout["ts"].min() >= t_train["ts"].max()
