"""Failover: a master stops, its replica takes over. What the meter keeps and what it can lose.

docs/operations.md promises: counts Redis acknowledged and replicated survive; counts made while the slot has
no master wait in process and land once the replica is promoted; counts the old master acknowledged in its
last replication lag before dying are lost (Redis replicates asynchronously) and are never double counted.
"""

from __future__ import annotations

import gc
import os
import signal
import warnings
from collections.abc import Iterator

import anyio
import pytest
import redis.asyncio as aioredis

from metered_middleware import BillingTarget
from metered_middleware._counter import Counter
from metered_middleware._errors import StorageError
from metered_middleware._layout import Layout
from metered_middleware._redis import REDIS_FAILURES, connect
from metered_middleware._store import CountStore
from metered_middleware.testing.cluster import LocalCluster
from tests.helpers import pending_totals

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


@pytest.fixture
def replicated() -> Iterator[LocalCluster]:
    """Three masters, the first with a replica."""
    with LocalCluster(3, replicas=1) as running:
        yield running


async def test_master_failover_keeps_replicated_counts_and_loses_only_the_unreplicated(
    replicated: LocalCluster,
) -> None:
    """Stopping a master: replicated counts and counts made during the outage survive; only units the dead
    master acknowledged but never replicated are lost, exactly those and never doubled."""
    layout = Layout("mm", 16)
    master = replicated.replicated_masters()[0]
    replica = replicated.replica_of(master)
    shard = next(s for s in range(16) if replicated.master_of(layout.pending(s)) == master)
    target = next(
        t
        for i in range(1000)
        if layout.shard_of(
            (t := BillingTarget(customer=f"cus_{i}", period_start=1, period_end=2**31)).target_id
        )
        == shard
    )
    replica_pid = replicated.pid(replica)
    client = connect(replicated.url)
    counter = Counter(CountStore(client, layout), layout, window=0)
    direct = aioredis.Redis(host="127.0.0.1", port=master)
    try:
        counter.add(target, 100)
        await counter.flush()
        assert await direct.execute_command("WAIT", 1, 2000) == 1  # type: ignore[no-untyped-call]  # replicated: kept through the failover

        os.kill(replica_pid, signal.SIGSTOP)  # the replica falls behind...
        # ...and its link drops, so nothing written from now on is even in flight to it.
        await direct.execute_command("CLIENT", "KILL", "TYPE", "replica")  # type: ignore[no-untyped-call]
        counter.add(target, 7)
        await counter.flush()  # ...while the master acknowledges 7 more units
        replicated.servers[master].kill()  # and dies before replicating them
        os.kill(replica_pid, signal.SIGCONT)

        counter.add(target, 5)  # counted while the slot has no master: kept in process, retried
        try:
            await counter.flush()
        except StorageError:  # refused while the slot has no master: kept, not dropped
            assert counter.stats.buffered_units == 5
        automatic = await anyio.to_thread.run_sync(replicated.wait_promoted, replica)
        if not automatic:  # shown with the output of a failing run: why the election did not happen
            print(f"the cluster did not fail over by itself; forced\n{replicated.log_tails()}")
        await counter.aclose(timeout=30)
        assert [n.port for n in replicated.nodes() if n.role == "master" and n.port == replica] == [replica]
        assert counter.stats.written_units == 112  # the counter saw every write acknowledged...
        assert counter.stats.buffered_units == 0
        assert await pending_totals(client, layout) == {target.target_id: 105}  # ...the 7 are gone
    finally:
        await direct.aclose()
        await client.aclose()


async def test_a_client_closed_after_a_master_died_leaves_no_connection_open() -> None:
    """A process that shuts down during an outage closes its sockets: redis-py 8.1's cluster client skipped
    closing once a connection error had flagged it for re-initialization (see ``_redis._ClusterClient``)."""
    with LocalCluster(3) as cluster:
        client = connect(cluster.url)
        try:
            keys = [f"k{i}" for i in range(30)]
            for key in keys:  # a connection to every master
                await client.set(key, 1)
            dead = cluster.master_of(keys[0])
            cluster.servers[dead].kill()
            with pytest.raises(REDIS_FAILURES):
                await client.get(keys[0])
        finally:
            await client.aclose()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
