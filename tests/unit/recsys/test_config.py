from pathlib import Path

import pytest

from recsys.config import ConfigError, Settings, default_config_path, load_settings
from tests.support.paths import REPO


def test_defaults_without_file_or_env():
    s = load_settings()
    assert s.validation.max_bad_fraction == 0.05
    assert s.home == (Path.cwd() / "var").resolve()


def test_repo_config_file_loads_and_matches_schema():
    s = load_settings(REPO / "conf" / "recsys.yaml")
    assert s.generate.users == 2000
    assert s.features.online_store == "sqlite"


def test_env_overrides_nested_fields_and_parses_yaml_scalars(tmp_path):
    s = load_settings(
        REPO / "conf" / "recsys.yaml",
        env={
            "RECSYS_HOME": str(tmp_path / "state"),
            "RECSYS_VALIDATION__MAX_BAD_FRACTION": "0.2",
            "RECSYS_FEATURES__WINDOWS_DAYS": "[2, 14]",
            "RECSYS_GENERATE__USERS": "12",
            "PATH": "/usr/bin",  # unrelated variables are ignored
        },
    )
    assert s.validation.max_bad_fraction == 0.2
    assert s.features.windows_days == [2, 14]
    assert s.generate.users == 12
    # RECSYS_HOME moves every runtime folder with it.
    assert s.raw_dir == tmp_path / "state" / "data" / "raw"
    assert s.feast_dir.is_relative_to(tmp_path / "state")


def test_env_binding_table_covers_every_leaf_field():
    bindings = Settings.env_bindings()
    assert bindings["RECSYS_HOME"] == "home"
    assert bindings["RECSYS_VALIDATION__MAX_BAD_FRACTION"] == "validation.max_bad_fraction"
    assert bindings["RECSYS_FEATURES__ONLINE_STORE"] == "features.online_store"
    sections = [n for n, f in Settings.model_fields.items() if n != "home"]
    leaves = sum(len(Settings.model_fields[n].annotation.model_fields) for n in sections)
    assert len(bindings) == leaves + 1  # + home
    assert bindings["RECSYS_SOURCE__KIND"] == "source.kind"


def test_bad_value_names_field_and_value():
    with pytest.raises(ConfigError, match=r"validation\.max_bad_fraction='2'.*less than or equal"):
        load_settings(env={"RECSYS_VALIDATION__MAX_BAD_FRACTION": "'2'"})
    with pytest.raises(ConfigError, match=r"features\.online_store='dynamo'"):
        load_settings(overrides={"features.online_store": "dynamo"})


def test_unknown_env_override_and_unknown_yaml_key_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="RECSYS_VALIDATON__MAX_BAD_FRACTION"):
        load_settings(env={"RECSYS_VALIDATON__MAX_BAD_FRACTION": "0.1"})
    bad = tmp_path / "c.yaml"
    bad.write_text("validation:\n  max_bad_fractoin: 0.1\n")
    with pytest.raises(ConfigError, match=r"max_bad_fractoin"):
        load_settings(bad)


def test_default_config_path_prefers_env(tmp_path):
    assert default_config_path({"RECSYS_CONFIG": "/x.yaml"}) == Path("/x.yaml")
    assert default_config_path({}, cwd=tmp_path) is None
    assert default_config_path({}, cwd=REPO) == REPO / "conf" / "recsys.yaml"


def test_training_data_skips_the_views_the_models_will_not_read() -> None:
    from components.pipeline import unread_feature_views

    assert unread_feature_views(load_settings()) == []
    lean = load_settings(
        overrides={"training.history": "leave_one_out", "training.ranker_window_features": False}
    )
    assert unread_feature_views(lean) == ["user_recent_items", "user_engagement", "item_popularity"]
