"""Signed webhook delivery, in a worker thread so neither the server loop nor callers block."""

from __future__ import annotations

import hashlib
import hmac
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header value that `stripe.Webhook.construct_event` accepts."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


@dataclass(slots=True)
class Delivery:
    """One attempt to deliver an event: `status` is the HTTP status, or None with `error`."""

    event_id: str
    type: str
    url: str
    status: int | None
    error: str | None = None


class WebhookSender:
    """Delivers events in order to the configured endpoint; `wait()` blocks until it caught up."""

    def __init__(self, url: str | None = None, secret: str | None = None) -> None:
        self.url, self.secret = url, secret
        self.deliveries: list[Delivery] = []
        self._queue: queue.Queue[tuple[dict[str, Any], bytes] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def configure(self, url: str | None, secret: str | None) -> None:
        self.url, self.secret = url, secret

    def enqueue(self, event: dict[str, Any], payload: bytes) -> None:
        if self.url is None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="stripe-emulator-webhooks", daemon=True
                )
                self._thread.start()
        self._queue.put((event, payload))

    def wait(self, timeout: float = 10.0) -> bool:
        """Block until every queued event was attempted; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=15)

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            while True:
                item = self._queue.get()
                try:
                    if item is None:
                        return
                    self._deliver(client, *item)
                finally:
                    self._queue.task_done()

    def _deliver(self, client: httpx.Client, event: dict[str, Any], payload: bytes) -> None:
        url, secret = self.url, self.secret
        if url is None:
            return
        headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Stripe/1.0"}
        if secret:
            headers["Stripe-Signature"] = sign(payload, secret)
        try:
            response = client.post(url, content=payload, headers=headers)
            record = Delivery(event["id"], event["type"], url, response.status_code)
        except httpx.HTTPError as exc:
            record = Delivery(event["id"], event["type"], url, None, f"{type(exc).__name__}: {exc}")
        self.deliveries.append(record)
