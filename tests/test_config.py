"""Settings come from the environment, validated once, with errors that name the variable."""

from __future__ import annotations

import pytest

from metered_middleware import ConfigurationError, RouteWeight, Settings


def test_defaults_need_no_environment() -> None:
    """With nothing set, the documented defaults apply."""
    s = Settings.from_env({})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.namespace == "mm"
    assert s.key_headers == ("x-api-key",)
    assert s.key_bearer is True
    assert s.key_query_param is None
    assert s.count_statuses == frozenset(range(200, 400))
    assert s.fail_mode == "open"
    assert s.coalesce_window == 0.05
    assert "/healthz" in s.exclude_paths
    assert "/docs" in s.exclude_paths


def test_every_variable_is_read() -> None:
    """Each METERED_* variable lands in its field."""
    s = Settings.from_env(
        {
            "METERED_REDIS_URL": "redis://r:1/2",
            "REDIS_URL": "redis://ignored:1/0",
            "METERED_NAMESPACE": "bill",
            "METERED_SHARDS": "16",
            "METERED_KEY_HEADERS": "X-Key, X-Other-Key",
            "METERED_KEY_BEARER": "no",
            "METERED_KEY_QUERY_PARAM": "api_key",
            "METERED_MAX_KEY_LENGTH": "64",
            "METERED_EXCLUDE_PATHS": "/status,/internal/*",
            "METERED_COUNT_STATUSES": "2xx,404,500-502",
            "METERED_ROUTE_WEIGHTS": "GET /v1/fonts/*/subset=5; /v1/bulk/*=0",
            "METERED_FAIL_MODE": "closed",
            "METERED_CACHE_TTL": "30",
            "METERED_NEGATIVE_CACHE_TTL": "500ms",
            "METERED_COALESCE_WINDOW": "0",
            "METERED_BUFFER_MAX_TARGETS": "10",
            "METERED_RETRY_AFTER": "9",
            "METERED_KEY_PEPPER": "pepper",
            "METERED_KEY_PREFIX": "tk_",
        }
    )
    assert s.redis_url == "redis://r:1/2"
    assert (s.namespace, s.shards) == ("bill", 16)
    assert s.key_headers == ("x-key", "x-other-key")
    assert s.key_bearer is False
    assert s.key_query_param == "api_key"
    assert s.max_key_length == 64
    assert s.exclude_paths == ("/status", "/internal/*")
    assert s.count_statuses == frozenset(range(200, 300)) | {404, 500, 501, 502}
    assert s.route_weights == (
        RouteWeight("GET", "/v1/fonts/*/subset", 5),
        RouteWeight("*", "/v1/bulk/*", 0),
    )
    assert s.fail_mode == "closed"
    assert (s.cache_ttl, s.negative_cache_ttl, s.coalesce_window) == (30.0, 0.5, 0.0)
    assert (s.buffer_max_targets, s.retry_after) == (10, 9)
    assert (s.key_pepper, s.key_prefix) == ("pepper", "tk_")


def test_redis_url_falls_back_to_redis_url() -> None:
    """REDIS_URL is used when METERED_REDIS_URL is not set."""
    assert Settings.from_env({"REDIS_URL": "redis://other:6380/1"}).redis_url == "redis://other:6380/1"


def test_keyword_overrides_win_over_environment() -> None:
    """Keywords given in code beat the environment."""
    s = Settings.from_env({"METERED_SHARDS": "8"}, shards=2)
    assert s.shards == 2


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("METERED_SHARDS", "zero"),
        ("METERED_SHARDS", "0"),
        ("METERED_SHARDS", "5000"),
        ("METERED_NAMESPACE", "has space"),
        ("METERED_REDIS_URL", "http://localhost"),
        ("METERED_KEY_HEADERS", "X Key"),
        ("METERED_KEY_BEARER", "maybe"),
        ("METERED_COUNT_STATUSES", "2xx,7xx"),
        ("METERED_COUNT_STATUSES", "ok"),
        ("METERED_COUNT_STATUSES", "299-200"),
        ("METERED_ROUTE_WEIGHTS", "GET /x"),
        ("METERED_ROUTE_WEIGHTS", "FETCH /x=2"),
        ("METERED_ROUTE_WEIGHTS", "GET x=2"),
        ("METERED_ROUTE_WEIGHTS", "GET /x=-1"),
        ("METERED_ROUTE_WEIGHTS", "GET /x=many"),
        ("METERED_FAIL_MODE", "sometimes"),
        ("METERED_CACHE_TTL", "-1"),
        ("METERED_CACHE_TTL", "soon"),
        ("METERED_NEGATIVE_CACHE_TTL", "nan"),
        ("METERED_COALESCE_WINDOW", "2"),
        ("METERED_BUFFER_MAX_TARGETS", "0"),
        ("METERED_MAX_KEY_LENGTH", "4"),
        ("METERED_KEY_PREFIX", "bad-prefix!"),
        ("METERED_RESOLVER", "ldap"),
    ],
)
def test_bad_value_names_variable_value_and_what_is_allowed(var: str, value: str) -> None:
    """A bad value raises ConfigurationError naming the variable and the value."""
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: value})
    assert info.value.name == var
    assert var in str(info.value)
    assert repr(value) in str(info.value) or value in str(info.value)
    assert info.value.allowed


def test_static_resolver_requires_its_keys() -> None:
    """Choosing the static resolver without METERED_STATIC_KEYS is refused."""
    with pytest.raises(ConfigurationError, match="METERED_STATIC_KEYS"):
        Settings.from_env({"METERED_RESOLVER": "static"})


def test_keywords_are_validated_like_the_environment() -> None:
    """Bad keyword values fail the same way."""
    with pytest.raises(ConfigurationError, match="METERED_FAIL_MODE"):
        Settings(fail_mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="METERED_KEY_HEADERS"):
        Settings(key_headers=(), key_bearer=False)


def test_keyword_overrides_cover_every_field() -> None:
    """The typed keyword overrides name exactly the Settings fields, so every setting can be given in code."""
    import dataclasses

    from metered_middleware._config import SettingsOverrides

    assert set(SettingsOverrides.__annotations__) == {f.name for f in dataclasses.fields(Settings)}
