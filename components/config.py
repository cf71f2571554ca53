"""One typed configuration, read from one YAML file and overlaid by ``RECSYS_*`` variables.

Nothing here runs at import time: callers build a ``Settings`` with ``load_settings`` and
pass it explicitly. Environment overrides address nested fields with a double underscore,
for example ``RECSYS_VALIDATION__MAX_BAD_FRACTION=0.1``; ``RECSYS_HOME`` moves all runtime
state. The table of bindings is ``Settings.env_bindings()`` and has its own test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "RECSYS_"
DEFAULT_CONFIG_NAME = "recsys.yaml"


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerateConfig(Section):
    """Defaults of the synthetic generator (the embedded data source)."""

    users: int = Field(2000, ge=1)
    items: int = Field(500, ge=1)
    days: int = Field(30, ge=1)
    seed: int = 7
    # The generated period ends here, not "now": the same seed gives the same files forever.
    end_date: datetime = datetime(2026, 11, 1, tzinfo=UTC)
    events_per_user_day: float = Field(1.2, gt=0)
    late_user_fraction: float = Field(0.15, ge=0, le=1)
    late_item_fraction: float = Field(0.2, ge=0, le=1)


class ValidationConfig(Section):
    """Thresholds of the validation step."""

    # A table whose quarantined fraction exceeds this fails the run.
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    # Timestamps may lead the run's as-of time by this much (clock skew) before they are bad.
    future_tolerance_seconds: int = Field(300, ge=0)
    # Extra columns in a drop are a schema change: refuse (false) or drop them and warn (true).
    allow_unexpected_columns: bool = False
    rating_min: float = 0.5
    rating_max: float = 5.0
    max_dwell_seconds: float = 6 * 3600.0


class FeaturesConfig(Section):
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection_string: str = "127.0.0.1:6379"
    windows_days: list[int] = [1, 7, 30]
    recent_items: int = Field(20, ge=1)
    project: str = "recsys"


class SourceConfig(Section):
    """Where the pipeline's ingest step reads from."""

    # synthetic: the seeded generator (embedded default); movielens: a MovieLens folder;
    # parquet: a data folder of users/, items/, events/ written by another system.
    kind: Literal["synthetic", "movielens", "parquet"] = "synthetic"
    path: Path | None = None


class Settings(BaseModel):
    """The whole configuration. ``home`` holds every byte of runtime state."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    home: Path = Field(Path("var"), validate_default=True)
    source: SourceConfig = SourceConfig()
    generate: GenerateConfig = GenerateConfig()
    validation: ValidationConfig = ValidationConfig()
    features: FeaturesConfig = FeaturesConfig()

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        return Path(v).expanduser().resolve()

    # Folders under home. Properties, not fields: they follow `home` when it moves.
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def validated_dir(self) -> Path:
        return self.data_dir / "validated"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def run_dir(self, run_key: str) -> Path:
        """The versioned folder of one pipeline run (one data interval)."""
        return self.runs_dir / run_key

    @property
    def feast_dir(self) -> Path:
        return self.home / "feast"

    @classmethod
    def env_bindings(cls) -> dict[str, str]:
        """Every environment variable that overrides a leaf field, mapped to its dotted path."""
        bindings: dict[str, str] = {}

        def walk(model: type[BaseModel], prefix: list[str]) -> None:
            for name, info in model.model_fields.items():
                ann = info.annotation
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    walk(ann, [*prefix, name])
                else:
                    path = [*prefix, name]
                    bindings[ENV_PREFIX + "__".join(p.upper() for p in path)] = ".".join(path)

        walk(cls, [])
        return bindings


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: parent {p!r} is not a section")
    node[leaf] = value


def load_settings(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the YAML file at ``path`` (if any), overlay ``env`` then ``overrides``, validate.

    Args:
        path: a YAML file; None means no file (the built-in defaults).
        env: the environment to read ``RECSYS_*`` overrides from; None reads none. The CLI
            passes ``os.environ``; tests pass a dict.
        overrides: dotted paths to values, applied last (``{"generate.users": 10}``).

    Returns:
        The validated settings.

    Raises:
        ConfigError: naming the file, the field and the value that do not fit.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        tree = loaded
    bindings = Settings.env_bindings()
    for var, value in (env or {}).items():
        if var in bindings:
            # YAML parsing turns "0.1" into a float and "[1, 7]" into a list.
            _set_path(tree, bindings[var], yaml.safe_load(value) if value != "" else None)
        elif var.startswith(ENV_PREFIX) and var not in _NON_FIELD_VARS:
            raise ConfigError(f"unknown environment override {var}; known: {sorted(bindings)}")
    for dotted, value in (overrides or {}).items():
        _set_path(tree, dotted, value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}={err.get('input')!r}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid configuration{where}: {problems}") from None


# Variables with the prefix that are not field overrides.
_NON_FIELD_VARS = {"RECSYS_CONFIG"}


def default_config_path(env: Mapping[str, str], cwd: Path | None = None) -> Path | None:
    """``RECSYS_CONFIG`` if set, else ``conf/recsys.yaml`` under ``cwd`` if it exists."""
    if env.get("RECSYS_CONFIG"):
        return Path(env["RECSYS_CONFIG"])
    candidate = (cwd or Path.cwd()) / "conf" / DEFAULT_CONFIG_NAME
    return candidate if candidate.is_file() else None


def settings_from_environment(config: Path | None = None) -> Settings:
    """What the CLI does: the given or default config file, overlaid by the process env."""
    env = dict(os.environ)
    return load_settings(config or default_config_path(env), env=env)
