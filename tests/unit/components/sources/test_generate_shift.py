"""The generator's shift option: off by default (the same data), and a change from its day on."""

from __future__ import annotations

import pandas as pd
import pytest

from components.sources.synthetic import generate
from tests.support.tiny_data import TINY_END, tiny_params

SHIFT_DAY = 4  # of 6: the last two days are shifted
CUT = pd.Timestamp(TINY_END) - pd.Timedelta(days=2)


def _primary_share(frames: dict[str, pd.DataFrame], event_types: tuple[str, ...], after: bool) -> pd.Series:
    ev = frames["events"]
    ev = ev[ev["event_type"].isin(event_types) & ((ev["ts"] >= CUT) if after else (ev["ts"] < CUT))]
    category = frames["items"].set_index("item_id")["category"].str.split("|").str[0]
    return ev["item_id"].map(category).value_counts(normalize=True)


def test_no_shift_is_the_default_data():
    base = generate(tiny_params())
    off = generate(tiny_params(shift_day=None, shift_kind="category_mix"))
    for name in ("users", "items", "events"):
        pd.testing.assert_frame_equal(base[name], off[name])


def test_a_taste_shift_keeps_the_days_before_and_changes_responses_after():
    base = generate(tiny_params())
    shifted = generate(tiny_params(shift_day=SHIFT_DAY, shift_kind="tastes"))

    def before(f: dict[str, pd.DataFrame]) -> pd.DataFrame:
        return f["events"][f["events"]["ts"] < CUT].reset_index(drop=True)

    pd.testing.assert_frame_equal(before(base), before(shifted))
    # What is shown is the same (the old tastes), what users click is not.
    imp = ("impression",)
    assert _primary_share(base, imp, True).equals(_primary_share(shifted, imp, True))

    def ctr(f: dict[str, pd.DataFrame]) -> float:
        after = f["events"][f["events"]["ts"] >= CUT]
        return (after["event_type"] == "click").sum() / (after["event_type"] == "impression").sum()

    assert ctr(shifted) < 0.6 * ctr(base)


def test_a_category_mix_shift_concentrates_what_is_shown_after_its_day():
    shifted = generate(tiny_params(shift_day=SHIFT_DAY, shift_kind="category_mix"))
    top3_after = _primary_share(shifted, ("impression",), True).nlargest(3).sum()
    top3_before = _primary_share(shifted, ("impression",), False).nlargest(3).sum()
    assert top3_after > top3_before + 0.2


@pytest.mark.parametrize(("day", "kind"), [(6, "tastes"), (-1, "tastes"), (2, "weather")])
def test_a_bad_shift_is_refused_naming_it(day, kind):
    with pytest.raises(ValueError, match="shift_"):
        generate(tiny_params(shift_day=day, shift_kind=kind))
