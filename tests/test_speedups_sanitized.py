"""The compiled request path, run under AddressSanitizer and UndefinedBehaviorSanitizer.

A mistake in ``_speedups.c`` (a read past a buffer, an object used after it was freed, an overflowing
shift) need not fail any test: it can corrupt a count silently or crash a busy server much later. Here the
extension is built again with both sanitizers, and the tests that drive it (the key table and its window,
the fast path, the counter, the resolver cache and the middleware) run in a child process that loads that
build. Any report fails the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import metered_middleware
from metered_middleware._fastpath import NATIVE

PACKAGE = Path(metered_middleware.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
# The suites that run the compiled code: each of its types and functions, and the middleware over them.
DRIVERS = [
    "test_keytable.py",
    "test_fastpath.py",
    "test_counter.py",
    "test_resolver.py",
    "test_middleware.py",
]

pytestmark = [
    pytest.mark.skipif(not NATIVE, reason="the compiled request path is not built here"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sanitizers are preloaded (Linux)"),
]


def compiler() -> list[str]:
    """The C compiler that built the extension (setuptools takes Python's own), as a command."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        pytest.fail(f"the extension is built but its compiler {cc[0]!r} is not on PATH")
    return cc


def runtime(cc: list[str], name: str) -> str:
    """The sanitizer runtime's shared library, which the child preloads (Python itself is not built
    with the sanitizers, so their runtime must be the first library loaded)."""
    path = subprocess.run([*cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path):
        pytest.fail(f"{cc[0]} has no {name}: it cannot build the sanitized extension this test needs")
    return path


def build(tmp_path: Path) -> tuple[Path, str]:
    """A copy of the package with the extension rebuilt under both sanitizers; its path and LD_PRELOAD."""
    root = tmp_path / "src"
    target = root / "metered_middleware"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    cc = compiler()
    command = [
        *cc,
        "-shared",
        "-fPIC",
        "-g",
        "-O1",
        "-fwrapv",  # as Python's own flags: signed overflow that wraps is defined, not reported
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        f"-I{sysconfig.get_paths()['include']}",
        str(target / "_speedups.c"),
        "-o",
        str(target / f"_speedups{suffix}"),
    ]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return root, ":".join(runtime(cc, name) for name in ("libasan.so", "libubsan.so"))


def test_the_compiled_path_passes_its_tests_under_the_sanitizers(tmp_path: Path) -> None:
    root, preload = build(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(TESTS.parent)]),
        "LD_PRELOAD": preload,
        # Python keeps its own objects alive until exit: leak reports would be about the interpreter.
        "ASAN_OPTIONS": "detect_leaks=0:exitcode=97",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98",
    }
    env.pop("METERED_PURE_PYTHON", None)
    # The child loads the sanitized build, not the one in the source tree, and the runtime with it.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from metered_middleware import _fastpath, _speedups;"
            "maps = open('/proc/self/maps').read();"
            "print(_fastpath.NATIVE, _speedups.__file__, 'libasan' in maps, 'libubsan' in maps)",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    native, loaded, asan, ubsan = probe.stdout.split()
    assert (native, asan, ubsan) == ("True", "True", "True")
    assert Path(loaded).is_relative_to(root)

    run = subprocess.run(
        # --capture=sys: a report is written to the child's file descriptor 2 as it dies, which pytest's
        # default capture would keep in a file that nobody prints.
        [sys.executable, "-m", "pytest", "-q", "--capture=sys", "-p", "no:cacheprovider"]
        + [str(TESTS / name) for name in DRIVERS],
        env=env,
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
        timeout=600,
    )
    output = run.stdout + run.stderr
    report = max(output.find("ERROR: AddressSanitizer"), output.find("runtime error:"))
    assert report < 0, output[max(report - 2_000, 0) : report + 20_000]
    assert run.returncode == 0, output[-20_000:]
    assert " passed" in run.stdout, run.stdout[-2_000:]
    assert " skipped" not in run.stdout, run.stdout[-2_000:]
