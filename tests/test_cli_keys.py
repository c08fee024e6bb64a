"""`metered-middleware keys`: create prints the key alone first, revoke and list work by id."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from metered_middleware import KeyRegistry

pytestmark = pytest.mark.anyio


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "METERED_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "metered_middleware.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_create_list_revoke(redis_client: aioredis.Redis, redis_url: str) -> None:
    """A created key resolves; list shows it by id without the key; revoke by id takes effect."""
    created = cli(redis_url, "keys", "create", "--customer", "cus_7", "--subscription-item", "si_7", "--json")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    key = lines[0]
    record = json.loads(lines[1])
    assert key.startswith("mk_")
    assert record["customer"] == "cus_7"
    assert record["subscription_item"] == "si_7"
    resolved = await KeyRegistry(redis_client).resolve(key)
    assert resolved is not None
    assert resolved.customer == "cus_7"

    listed = cli(redis_url, "keys", "list", "--customer", "cus_7", "--json")
    assert listed.returncode == 0, listed.stderr
    assert key not in listed.stdout
    assert [r["key_id"] for r in json.loads(listed.stdout)] == [record["key_id"]]

    rotated = cli(redis_url, "keys", "rotate", key)
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.splitlines()[0]
    assert new_key != key
    old = await KeyRegistry(redis_client).resolve(key)
    assert old is not None
    assert old.revoked
    key = new_key
    new_record = await KeyRegistry(redis_client).get(key)
    assert new_record is not None
    record["key_id"] = new_record.key_id

    revoked = cli(redis_url, "keys", "revoke", record["key_id"])
    assert revoked.returncode == 0, revoked.stderr
    after = await KeyRegistry(redis_client).resolve(key)
    assert after is not None
    assert after.revoked
    assert cli(redis_url, "keys", "revoke", "key_0000000000000000").returncode == 1


def test_bad_configuration_is_a_clear_error(redis_url: str) -> None:
    """A bad METERED_* value exits non-zero naming the variable, without a traceback."""
    env = {**os.environ, "METERED_REDIS_URL": redis_url, "METERED_SHARDS": "lots"}
    result = subprocess.run(
        [sys.executable, "-m", "metered_middleware.cli", "keys", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "METERED_SHARDS" in result.stderr
    assert "Traceback" not in result.stderr
