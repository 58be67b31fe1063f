"""fedllm.

The Flower layers are ``fedllm.strategies`` (server side) and ``fedllm.clients`` (client
side). A wheel installs them inside this package; in a checkout, and in the app bundle Flower
builds from one, they are the directories ``strategies/`` and ``clients/`` beside it, so the
directory holding both joins this package's search path. One import name then serves every
layout, and installing fedllm adds no top-level name but ``fedllm`` (setup.py).
"""

from pathlib import Path

_CHECKOUT = Path(__file__).parent.parent
if not Path(__file__).with_name("strategies").is_dir() and (_CHECKOUT / "strategies").is_dir():
    __path__.append(str(_CHECKOUT))
