"""The packages of fedllm's wheel: one top-level name, ``fedllm``.

The repository keeps the Flower layers beside the library (``strategies/``, ``clients/``); the
wheel installs them inside it as ``fedllm.strategies`` and ``fedllm.clients``, so installing
fedllm adds no generic top-level name to site-packages (``fedllm/__init__.py`` gives a checkout
the same names). ``examples/`` is not installed: opacus already installs an ``examples``
package. Everything else about the distribution is in pyproject.toml.
"""

from setuptools import find_packages, setup

LAYERS = {"fedllm.strategies": "strategies", "fedllm.clients": "clients"}

setup(
    packages=[*find_packages(include=["fedllm", "fedllm.*"]), *LAYERS],
    package_dir=LAYERS,
)
