"""The public surface: one import, everything listed in __all__, a version from the package metadata."""

from __future__ import annotations

from importlib.metadata import version

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
