"""The public surface: one import, everything listed in __all__, a version from the package metadata."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

import metered_middleware


def test_every_public_name_imports() -> None:
    """Each name in __all__ is importable from the package and documented."""
    for name in metered_middleware.__all__:
        obj = getattr(metered_middleware, name)
        if callable(obj) and name != "__version__":
            assert obj.__doc__, f"{name} has no docstring"


def test_version_comes_from_metadata() -> None:
    """__version__ is the installed distribution's version."""
    assert metered_middleware.__version__ == version("metered-middleware")


def test_py_typed_ships() -> None:
    """The package is marked as typed for type checkers."""
    from importlib.resources import files

    assert files("metered_middleware").joinpath("py.typed").is_file()
    assert files("metered_middleware").joinpath("lua/count.lua").is_file()


def test_metrics_surface_imports() -> None:
    """The metrics module (metrics extra) exposes its public names."""
    from metered_middleware import metrics

    for name in metrics.__all__:
        assert getattr(metrics, name).__doc__


def test_the_request_path_does_not_load_the_delivery_side() -> None:
    """A server whose flusher runs elsewhere never imports the Stripe SDK or the HTTP clients.

    They would add 18k objects to its 40k, and every full collection walks the whole heap (the p99 tail).
    Run in a fresh interpreter, since this test process has imported everything already.
    """
    probe = (
        "import sys\n"
        "from starlette.applications import Starlette\n"
        "from metered_middleware import MeteringMiddleware\n"
        "MeteringMiddleware(Starlette(), environ={}, redis_url='redis://127.0.0.1:1')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'stripe', 'httpx', 'aiohttp', 'trio'}))\n"
        "from metered_middleware import Flusher, flusher_lifespan, reconcile\n"
        "from metered_middleware._flusher import Flusher as F\n"
        "print(Flusher is F, 'stripe' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "True True"]


def test_lazy_names_are_listed() -> None:
    """Names imported on first use still show in dir(), and an unknown name is an AttributeError."""
    assert {"Flusher", "reconcile", "Sink"} <= set(dir(metered_middleware))
    with pytest.raises(AttributeError, match="no_such_name"):
        metered_middleware.no_such_name  # noqa: B018
