"""How the ServerApp's messages travel: arrays packed, replies collected as soon as they are in.

Packing: every message leaves with its ArrayRecords packed into one array each, and every
reply is unpacked before the strategy sees it (:mod:`fedllm.federation.array_packing`, whose
ClientApp mod does the same at the hospitals). A reply that does not unpack becomes that
hospital's error reply, never the run's crash.

Polling: Flower 1.42's deployment Grid (``flwr.superlink.grid.http_grid``) asks the SuperLink for
replies every 3 s in ``send_and_receive``. A round sends three messages one after the other
(status query, train, evaluate), so a round whose hospitals answer in a fraction of a second
(a warm worker on a small model) still took about 9 s at the researcher, nearly all of it
waiting (docs/benchmarks.md). :class:`TransportGrid` wraps whichever Grid Flower hands the
ServerApp and asks again after ``first_wait_s``, doubling the wait up to ``max_wait_s``: a
reply that arrives after t seconds is collected within about min(t, ``max_wait_s``) more,
while a long round costs the SuperLink one request per ``max_wait_s``. Everything else is the
wrapped Grid's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message, RecordDict
from flwr.app.message import make_message
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedllm.federation.array_packing import PackingError, pack_messages, unpack_message

UNPACKABLE_REPLY = 7001
"""``Error.code`` of a reply whose packed arrays did not unpack."""


class TransportGrid(Grid):
    """``grid`` sending packed arrays and polling for replies with a doubling wait."""

    def __init__(self, grid: Grid, *, first_wait_s: float = 0.02, max_wait_s: float = 0.25) -> None:
        self.grid = grid
        self.first_wait_s = first_wait_s
        self.max_wait_s = max_wait_s

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(pack_messages(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [_unpacked_reply(reply) for reply in self.grid.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then collect their replies until all are in or ``timeout`` ends.

        As Flower's: replies that miss the timeout are not returned, and ``timeout=None``
        waits for every reply.
        """
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = self.first_wait_s
        replies: list[Message] = []
        while waiting:
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            time.sleep(wait)
            wait = min(2 * wait, self.max_wait_s)
        return replies


def _unpacked_reply(reply: Message) -> Message:
    try:
        return unpack_message(reply)
    except PackingError as error:
        return make_message(metadata=reply.metadata, error=Error(UNPACKABLE_REPLY, str(error)))
