"""Flower's SuperNode with the waits of its message loop sized for a warm hospital.

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) serves one message at a
time and waits in three places with fixed times chosen for a ClientApp process started per
message, whose own start costs seconds:

* after a poll of the SuperLink found no message, 3 s before the next poll;
* between checks for the ClientApp's reply, 0.5 s;
* while pulling a message's objects (the adapter's arrays) that the SuperLink does not hold
  yet, 1 s, then 2, 4 ... s: the ServerApp registers a message with the SuperLink before it
  uploads the message's arrays, so a SuperNode that polls in between waits a whole second.

With the hospital's warm worker a round's training takes well under a second on a small
model, and these waits became most of a round at the hospital (docs/benchmarks.md). This
entry point runs Flower's own ``flower-supernode`` (same arguments, same behaviour) with the
waits replaced by :class:`SupernodeWaits`. Only the two module-level names of
``start_client_internal`` that hold them are swapped: its ``time`` (used there for nothing but
those sleeps) and its ``pull_objects`` (Flower's puller, with a shorter initial backoff and
cap). ``tests/test_supernode_process.py`` checks that Flower's module still uses exactly those
names and sleeps, so a Flower upgrade that changes them fails loudly instead of silently
running with Flower's waits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from types import ModuleType

FLOWER_IDLE_POLL_S = 3.0
"""What Flower 1.42's SuperNode sleeps after a poll that found no message."""
FLOWER_REPLY_POLL_S = 0.5
"""What it sleeps between checks for the ClientApp's reply (and for a reply's objects)."""


@dataclass(frozen=True)
class SupernodeWaits:
    """The SuperNode's waits, in seconds.

    ``idle_poll_s`` is how long a message can sit at the SuperLink before the hospital sees
    it, at the price of one SuperLink request per node per wait while the federation is idle
    (0.5 s: two requests a second per hospital). ``reply_poll_s`` is a check of the
    SuperNode's own in-memory state, which costs nothing across the network.
    ``object_backoff_s`` is the first retry of an array the SuperLink does not hold yet,
    doubling up to ``object_backoff_cap_s``.
    """

    idle_poll_s: float = 0.5
    reply_poll_s: float = 0.02
    object_backoff_s: float = 0.02
    object_backoff_cap_s: float = 1.0


class _SizedSleeps:
    """Stands in for the ``time`` module inside Flower's SuperNode loop.

    The loop calls ``time.sleep`` with Flower's two fixed waits; each is replaced by its
    sized counterpart. Any other wait (a later Flower adding one) is kept as Flower wrote it.
    """

    def __init__(self, waits: SupernodeWaits) -> None:
        self._sized = {
            FLOWER_IDLE_POLL_S: waits.idle_poll_s,
            FLOWER_REPLY_POLL_S: waits.reply_poll_s,
        }

    def sleep(self, seconds: float) -> None:
        time.sleep(self._sized.get(seconds, seconds))


def size_supernode_waits(loop_module: ModuleType, waits: SupernodeWaits) -> None:
    """Replace the waits of Flower's SuperNode loop (``start_client_internal``) in place."""
    from flwr.supercore.inflatable import inflatable_utils

    loop_module.time = _SizedSleeps(waits)
    loop_module.pull_objects = partial(
        inflatable_utils.pull_objects,
        initial_backoff=waits.object_backoff_s,
        backoff_cap=waits.object_backoff_cap_s,
    )


def main() -> None:
    """``flower-supernode`` with :class:`SupernodeWaits`' defaults; arguments as Flower's.

    Its log lines carry their time (Flower's own format, with timestamps on), so that hospital
    IT can read from ``supernode.log`` when each message arrived and when its reply left.
    """
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    update_console_handler(timestamps=True)
    size_supernode_waits(start_client_internal, SupernodeWaits())
    flower_supernode()


if __name__ == "__main__":
    main()
