"""Admin actions need a key of their own: with ``security.admin_key_env`` set (production), an
event producer's key cannot reload or promote models, the admin key cannot post events, a
missing admin key closes admin actions (503 naming the variable) and the two variables may not
hold the same key. With it null (the embedded demo), the API key still opens admin actions."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from recsys.config import SecurityConfig, load_settings
from serving.gateway.security import ApiKeyGuard

EVENTS_KEY = "producer-key-for-unit-tests"
ADMIN_KEY = "admin-key-for-unit-tests"
SEPARATE = SecurityConfig(admin_key_env="RECSYS_ADMIN_KEY")
BOTH = {"RECSYS_API_KEY": EVENTS_KEY, "RECSYS_ADMIN_KEY": ADMIN_KEY}


def _status(guard: ApiKeyGuard, access: str, presented: str | None) -> int | None:
    try:
        guard.check(access, presented)  # type: ignore[arg-type]
    except HTTPException as e:
        assert EVENTS_KEY not in str(e.detail) and ADMIN_KEY not in str(e.detail)
        return e.status_code
    return None


def test_admin_actions_take_only_the_admin_key_and_events_only_the_api_key() -> None:
    guard = ApiKeyGuard(SEPARATE, BOTH)
    assert _status(guard, "admin", ADMIN_KEY) is None
    assert _status(guard, "admin", EVENTS_KEY) == 403  # a producer cannot move models
    assert _status(guard, "admin", None) == 401
    assert _status(guard, "write", EVENTS_KEY) is None
    assert _status(guard, "write", ADMIN_KEY) == 403


def test_without_the_admin_key_admin_actions_are_closed_naming_the_variable() -> None:
    guard = ApiKeyGuard(SEPARATE, {"RECSYS_API_KEY": EVENTS_KEY})
    with pytest.raises(HTTPException) as e:
        guard.check("admin", EVENTS_KEY)
    assert e.value.status_code == 503 and "RECSYS_ADMIN_KEY" in str(e.value.detail)
    assert _status(guard, "write", EVENTS_KEY) is None  # events still flow


def test_the_admin_key_may_not_be_the_api_key() -> None:
    with pytest.raises(ValueError, match="RECSYS_ADMIN_KEY holds the same key as RECSYS_API_KEY"):
        ApiKeyGuard(SEPARATE, {"RECSYS_API_KEY": EVENTS_KEY, "RECSYS_ADMIN_KEY": EVENTS_KEY})


def test_without_admin_key_env_the_api_key_opens_admin_actions_as_before() -> None:
    guard = ApiKeyGuard(SecurityConfig(), BOTH)
    assert _status(guard, "admin", EVENTS_KEY) is None and _status(guard, "admin", ADMIN_KEY) == 403


def test_the_admin_key_variable_is_configuration_the_key_never_is() -> None:
    settings = load_settings(env={**BOTH, "RECSYS_SECURITY__ADMIN_KEY_ENV": "RECSYS_ADMIN_KEY"})
    assert settings.security.admin_key_env == "RECSYS_ADMIN_KEY"
    assert ADMIN_KEY not in settings.model_dump_json()


def test_keys_may_come_from_secret_files(tmp_path) -> None:
    (tmp_path / "api").write_text(EVENTS_KEY + "\n")
    (tmp_path / "admin").write_text(ADMIN_KEY + "\n")
    env = {"RECSYS_API_KEY_FILE": str(tmp_path / "api"), "RECSYS_ADMIN_KEY_FILE": str(tmp_path / "admin")}
    guard = ApiKeyGuard(SEPARATE, env)
    assert _status(guard, "write", EVENTS_KEY) is None and _status(guard, "admin", ADMIN_KEY) is None
