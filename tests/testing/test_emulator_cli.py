"""`metered-middleware emulator`: argument parsing and a real run until interrupted."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

import pytest
import stripe

from metered_middleware._cli_emulator import DEFAULT_PORT, add_parser, handler
from metered_middleware.testing.emulator import EmulatorHTTPXClient

_RUNNER = """
import argparse, sys
from metered_middleware._cli_emulator import add_parser
parser = argparse.ArgumentParser()
add_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["emulator", *argv])


def test_defaults() -> None:
    """By default it binds 127.0.0.1 on stripe-mock's port, with test mode's 25/s limit."""
    args = _parse()
    assert (args.host, args.port, args.rate_limit) == ("127.0.0.1", DEFAULT_PORT, 25.0)
    assert args.func is handler


def test_rate_limit_off_and_secret() -> None:
    """`--rate-limit off` disables limiting; webhook options are kept."""
    args = _parse("--rate-limit", "off", "--webhook-url", "http://x/y", "--webhook-secret", "whsec_abc")
    assert args.rate_limit is None
    assert (args.webhook_url, args.webhook_secret) == ("http://x/y", "whsec_abc")


@pytest.mark.parametrize("argv", [["--rate-limit", "-3"], ["--webhook-secret", "nope"]])
def test_bad_arguments_exit(argv: list[str]) -> None:
    """Nonsense rate limits and secrets that are not `whsec_...` are usage errors."""
    with pytest.raises(SystemExit):
        _parse(*argv)


def test_runs_until_interrupted_and_prints_url() -> None:
    """The command prints its base URL, serves the SDK, and exits 0 on Ctrl-C."""
    process = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, "emulator", "--port", "0", "--rate-limit", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        http_client = EmulatorHTTPXClient()
        client = stripe.StripeClient(
            "sk_test_cli", base_addresses={"api": url, "meter_events": url}, http_client=http_client
        )
        try:
            assert client.v1.customers.create({"email": "cli@example.com"}).id.startswith("cus_")
        except stripe.APIConnectionError:
            pytest.fail("the emulator did not answer")
        finally:
            http_client.close()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
