"""Builds the optional compiled request path; everything else is in pyproject.toml.

``optional=True``: where no C compiler (or no Python headers) is at hand, the build says so and the
package installs without it, running ``metered_middleware._fastpath``'s pure-Python twin instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "metered_middleware._speedups",
            ["src/metered_middleware/_speedups.c"],
            optional=True,
        )
    ]
)
