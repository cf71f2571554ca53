"""The API key: only from the environment, never configuration, compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest
from fastapi import HTTPException

from recsys.config import ConfigError, SecurityConfig, load_settings
from serving.gateway import security
from serving.gateway.security import ApiKeyGuard

KEY = "s3cret-key-for-unit-tests"


def test_a_key_in_the_config_file_is_refused_naming_the_field(tmp_path: Path) -> None:
    conf = tmp_path / "recsys.yaml"
    conf.write_text("security:\n  api_key: plain-text-key\n")
    with pytest.raises(ConfigError) as e:
        load_settings(conf)
    assert "security.api_key='plain-text-key': Extra inputs are not permitted" in str(e.value)


def test_the_key_variable_is_read_by_the_gateway_only_and_never_part_of_settings() -> None:
    settings = load_settings(env={"RECSYS_API_KEY": KEY, "RECSYS_SECURITY__OPEN_READS": "false"})
    assert settings.security.open_reads is False
    assert KEY not in settings.model_dump_json()
    with pytest.raises(ConfigError, match="unknown environment override RECSYS_SECURITY__API_KEY"):
        load_settings(env={"RECSYS_SECURITY__API_KEY": KEY})
    with pytest.raises(ConfigError, match="security.api_key_env='bad name'"):
        load_settings(overrides={"security.api_key_env": "bad name"})


def test_guard_compares_with_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    guard = ApiKeyGuard(SecurityConfig(), {"RECSYS_API_KEY": KEY})
    guard.check("write", KEY)
    with pytest.raises(HTTPException) as e:
        guard.check("admin", KEY[:-1] + "X")
    assert e.value.status_code == 403 and KEY not in str(e.value.detail)
    # Both comparisons went through compare_digest, over bytes (its constant-time form).
    assert calls == [(KEY.encode(), KEY.encode()), ((KEY[:-1] + "X").encode(), KEY.encode())]


@pytest.mark.parametrize(
    ("config", "environ", "access", "presented", "status"),
    [
        (SecurityConfig(), {"RECSYS_API_KEY": KEY}, "write", None, 401),
        (SecurityConfig(), {"RECSYS_API_KEY": KEY}, "write", "", 401),
        (SecurityConfig(), {"RECSYS_API_KEY": KEY}, "admin", "wrong", 403),
        (SecurityConfig(), {"RECSYS_API_KEY": KEY}, "read", None, None),
        (SecurityConfig(open_reads=False), {"RECSYS_API_KEY": KEY}, "read", None, 401),
        (SecurityConfig(open_reads=False), {"RECSYS_API_KEY": KEY}, "read", KEY, None),
        (SecurityConfig(), {}, "write", KEY, 503),  # no key configured: writes fail closed
        (SecurityConfig(api_key_env="GATEWAY_KEY"), {"RECSYS_API_KEY": KEY}, "write", KEY, 503),
        (SecurityConfig(api_key_env="GATEWAY_KEY"), {"GATEWAY_KEY": KEY}, "write", KEY, None),
    ],
)
def test_guard_decisions(
    config: SecurityConfig, environ: dict[str, str], access: str, presented: str | None, status: int | None
) -> None:
    guard = ApiKeyGuard(config, environ)
    if status is None:
        guard.check(access, presented)  # type: ignore[arg-type]
        return
    with pytest.raises(HTTPException) as e:
        guard.check(access, presented)  # type: ignore[arg-type]
    assert e.value.status_code == status
    if status == 503:
        assert config.api_key_env in e.value.detail
