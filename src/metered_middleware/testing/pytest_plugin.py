"""pytest plugin: fixtures for the local Stripe emulator (registered through the pytest11 entry point).

- `stripe_emulator_server`: one `StripeEmulator` for the whole session, started on first use.
- `stripe_emulator`: that emulator, reset before each test, with rate limiting **off**
  (`rate_limit=None`) so tests run fast; set `stripe_emulator.rate_limit = 25.0` in a test to get
  Stripe's test-mode limit. Faults, latency, the emulated clock and all objects are wiped too.
- `stripe_client`: a `stripe.StripeClient` pointed at it (sync and async methods both work,
  `max_network_retries=0`), closed after the test. Clients a test makes with
  `stripe_emulator.client()` stay usable across resets and are closed when the session ends.

Nothing starts unless a test asks for one of these fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import stripe

    from metered_middleware.testing.emulator import StripeEmulator


@pytest.fixture(scope="session")
def stripe_emulator_server() -> Iterator[StripeEmulator]:
    """The session's emulator server; prefer `stripe_emulator`, which also resets it."""
    # Imported here so that loading the plugin costs nothing and needs no server dependencies.
    from metered_middleware.testing.emulator import StripeEmulator

    emulator = StripeEmulator(rate_limit=None).start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def stripe_emulator(stripe_emulator_server: StripeEmulator) -> Iterator[StripeEmulator]:
    """A freshly reset emulator: no objects, no faults, rate limit off, no webhook endpoint."""
    emulator = stripe_emulator_server
    emulator.reset()
    emulator.rate_limit = None
    emulator.set_webhook(None, None)
    try:
        yield emulator
    finally:
        emulator.reset()


@pytest.fixture
def stripe_client(stripe_emulator: StripeEmulator) -> Iterator[stripe.StripeClient]:
    """A `StripeClient` talking to `stripe_emulator`, closed after the test."""
    from metered_middleware.testing.emulator import EmulatorHTTPXClient

    http_client = EmulatorHTTPXClient()
    try:
        yield stripe_emulator.client(http_client=http_client)
    finally:
        http_client.close()
