"""Structured logs: one JSON object a line with the audit fields, and never an API key."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from metered_middleware import ConfigurationError
from metered_middleware._logging import configure_logging, key_reference


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = configure_logging(environ={"METERED_LOG_FORMAT": "json"}, stream=buffer)
    yield buffer
    logging.getLogger("metered_middleware").removeHandler(handler)


def test_json_lines_carry_extra_audit_fields(stream: io.StringIO) -> None:
    """A delivery decision logged with ``extra=`` comes out as one JSON object with those fields."""
    logging.getLogger("metered_middleware.flusher").warning(
        "dead-lettered %s", "cus_1|si_1|", extra={"shard": 2, "seq": 17, "reason": "refused"}
    )
    record = json.loads(stream.getvalue())
    assert record["message"] == "dead-lettered cus_1|si_1|"
    assert (record["shard"], record["seq"], record["reason"], record["level"]) == (
        2,
        17,
        "refused",
        "warning",
    )
    assert record["logger"] == "metered_middleware.flusher"


def test_api_keys_are_replaced_by_a_hash_reference(stream: io.StringIO) -> None:
    """A key that slips into a message or an extra is written as ``key~<hash prefix>``, never in clear."""
    key = "mk_" + "A1b2" * 8
    logging.getLogger("metered_middleware").error("bad key %s", key, extra={"header": key})
    line = stream.getvalue()
    assert key not in line
    record = json.loads(line)
    assert record["message"] == f"bad key {key_reference(key)}"
    assert record["header"] == key_reference(key)


def test_unknown_log_format_is_refused() -> None:
    """METERED_LOG_FORMAT other than text or json names the variable and what is allowed."""
    with pytest.raises(ConfigurationError, match="METERED_LOG_FORMAT"):
        configure_logging(environ={"METERED_LOG_FORMAT": "xml"})
