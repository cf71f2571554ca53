"""Every command of the `recsys` CLI answers --help."""

import pytest
import typer.main
from typer.testing import CliRunner

from entrypoints.cli import app

runner = CliRunner()


def _commands(group: typer.core.TyperGroup, prefix: list[str]) -> list[list[str]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, typer.core.TyperGroup):
            out += _commands(cmd, [*prefix, name])
        else:
            out.append([*prefix, name])
    return out


ALL = _commands(typer.main.get_command(app), [])


def test_expected_commands_exist():
    names = {" ".join(c) for c in ALL}
    assert {"data generate", "data import-movielens", "validate", "demo", "config"} <= names


@pytest.mark.parametrize("command", ALL, ids=lambda c: " ".join(c) or "recsys")
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bad_config_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RECSYS_VALIDATION__MAX_BAD_FRACTION", "7")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 2
    assert "validation.max_bad_fraction=7" in result.output


def test_events_export_names_a_bad_day(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    result = runner.invoke(app, ["events", "export", "--through", "2026-11-31"])
    assert result.exit_code == 2
    assert "--through: '2026-11-31' is not a day (YYYY-MM-DD)" in " ".join(result.output.split())
    # No log yet: nothing to export, and none is created.
    result = runner.invoke(app, ["events", "export"])
    assert result.exit_code == 0 and "nothing to export" in result.output
    assert not (tmp_path / "gateway" / "events.db").exists()
