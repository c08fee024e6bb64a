"""API keys: finding one on a request, hashing it for storage and lookup, and minting new ones."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Final
from urllib.parse import parse_qsl

__all__ = ["KeyError_", "extract_key", "generate_key", "hash_key", "key_id_of"]

_BEARER: Final = b"bearer "


class KeyError_(Exception):
    """The request carries no usable key; ``code`` is the stable error code for the response."""

    __slots__ = ("code",)

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


MISSING: Final = KeyError_("api_key_missing", "No API key: send it as 'Authorization: Bearer <key>'.")
MALFORMED: Final = KeyError_("api_key_invalid", "The API key is malformed.")
AMBIGUOUS: Final = KeyError_("api_key_ambiguous", "More than one API key was sent.")


def extract_key(
    headers: Iterable[tuple[bytes, bytes]],
    query_string: bytes,
    *,
    header_names: frozenset[bytes],
    bearer: bool,
    query_param: str | None,
    max_length: int,
) -> str:
    """Return the one API key the request carries, or raise ``KeyError_`` with the code to answer with.

    Hostile input is refused here, before anything is hashed or looked up: keys must be 1..max_length visible
    ASCII characters, and two different keys on one request are refused rather than guessed between.
    """
    found: bytes | None = None
    for name, value in headers:
        if name in header_names:
            candidate = value.strip()
        elif bearer and name == b"authorization":
            if value[:7].lower() != _BEARER:
                continue  # another scheme (Basic, ...) belongs to the app, not to us
            candidate = value[7:].strip()
        else:
            continue
        if found is not None and candidate != found:
            raise AMBIGUOUS
        found = candidate
    if query_param is not None and query_string:
        for name_s, value_s in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            if name_s == query_param:
                candidate = value_s.encode("latin-1").strip()
                if found is not None and candidate != found:
                    raise AMBIGUOUS
                found = candidate
    if not found:
        raise MISSING
    if len(found) > max_length or not _visible_ascii(found):
        raise MALFORMED
    return found.decode("ascii")


def _visible_ascii(value: bytes) -> bool:
    # bytes.isascii is C-fast; then no control characters or spaces inside the key.
    return value.isascii() and value.decode("ascii").isprintable() and b" " not in value


def hash_key(key: str, pepper: str | None = None) -> str:
    """The SHA-256 (HMAC-SHA-256 with a pepper) hex digest under which a key is stored and looked up."""
    if pepper:
        return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key_hash: str) -> str:
    """A short public identifier for a key, safe to log and show: a prefix of its hash."""
    return "key_" + key_hash[:16]


def generate_key(prefix: str = "mk_") -> str:
    """A new API key: the prefix and 32 random bytes, URL-safe base64."""
    return prefix + secrets.token_urlsafe(32)
