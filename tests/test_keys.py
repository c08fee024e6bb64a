"""Finding the API key on a request, refusing hostile input, and hashing it."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from metered_middleware import generate_key, hash_key
from metered_middleware._keys import KeyError_, extract_key

H = frozenset({b"x-api-key"})


def find(headers: list[tuple[bytes, bytes]], query: bytes = b"", param: str | None = None) -> str:
    return extract_key(headers, query, header_names=H, bearer=True, query_param=param, max_length=256)


def code_of(headers: list[tuple[bytes, bytes]], query: bytes = b"", param: str | None = None) -> str:
    with pytest.raises(KeyError_) as info:
        find(headers, query, param)
    return info.value.code


def test_bearer_token_header_and_query() -> None:
    """The key is read from a Bearer token, the X-API-Key header, or the configured query parameter."""
    assert find([(b"authorization", b"Bearer mk_abc")]) == "mk_abc"
    assert find([(b"authorization", b"bearer   mk_abc  ")]) == "mk_abc"
    assert find([(b"x-api-key", b"mk_abc")]) == "mk_abc"
    assert find([], b"q=1&api_key=mk_abc", "api_key") == "mk_abc"


def test_query_parameter_ignored_unless_configured() -> None:
    """Without configuration a key in the query string is not accepted."""
    assert code_of([], b"api_key=mk_abc") == "api_key_missing"


def test_other_authorization_schemes_belong_to_the_app() -> None:
    """Basic auth is not mistaken for an API key."""
    assert code_of([(b"authorization", b"Basic dXNlcjpwYXNz")]) == "api_key_missing"


def test_same_key_twice_is_fine_different_keys_are_refused() -> None:
    """Repeated headers with one key pass; two different keys are ambiguous."""
    assert find([(b"x-api-key", b"k1"), (b"authorization", b"Bearer k1")]) == "k1"
    assert code_of([(b"x-api-key", b"k1"), (b"x-api-key", b"k2")]) == "api_key_ambiguous"
    assert code_of([(b"x-api-key", b"k1")], b"api_key=k2", "api_key") == "api_key_ambiguous"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"", "api_key_missing"),
        (b"   ", "api_key_missing"),
        (b"k" * 10_000, "api_key_invalid"),
        ("kéy".encode(), "api_key_invalid"),
        (b"key\x00nul", "api_key_invalid"),
        (b"key\x1bescape", "api_key_invalid"),
        (b"two words", "api_key_invalid"),
        (b"\xff\xfe", "api_key_invalid"),
    ],
)
def test_hostile_keys_get_a_code(value: bytes, code: str) -> None:
    """Empty, huge, non-ASCII and control-character keys are refused with a stable code."""
    assert code_of([(b"x-api-key", value)]) == code


def test_hash_is_sha256_or_hmac_with_pepper() -> None:
    """Keys are stored as SHA-256, or HMAC-SHA-256 when a pepper is set."""
    assert hash_key("mk_x") == hashlib.sha256(b"mk_x").hexdigest()
    assert hash_key("mk_x", "pep") == hmac.new(b"pep", b"mk_x", hashlib.sha256).hexdigest()
    assert hash_key("mk_x", "pep") != hash_key("mk_x")


def test_generated_keys_carry_32_random_bytes() -> None:
    """New keys have the prefix and at least 32 bytes of randomness, and never repeat."""
    keys = {generate_key("tk_") for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("tk_")
        assert len(key) - 3 >= 43  # 32 bytes in URL-safe base64
        assert find([(b"x-api-key", key.encode())]) == key
