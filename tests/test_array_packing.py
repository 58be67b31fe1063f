"""Arrays travel packed: one safetensors array per ArrayRecord, unpacked exactly on arrival.

The server side (``TransportGrid``) and the hospital side (the ClientApp's mod) are checked
here on Flower's own message types; the whole path through a real SuperLink and SuperNode is
exercised by tests/test_warm_worker.py, tests/test_flwr_run.py and tests/test_deployment.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedllm.federation.array_packing import (
    PACKED_NAME,
    PACKED_STYPE,
    PackingError,
    pack_messages,
    packed_arrays_mod,
    packed_content,
    unpacked_content,
)
from fedllm.strategies.transport_grid import UNPACKABLE_REPLY, TransportGrid


@pytest.fixture(autouse=True)
def _server_task(monkeypatch):
    """Flower stamps an instruction with the sending task's identity, as a ServerApp has."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def _adapter() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "layers.1.lora_B.weight": torch.randn(8, 4, generator=generator),
        "layers.0.lora_A.weight": torch.randn(4, 8, generator=generator, dtype=torch.float64),
        "layers.0.lora_B.weight": torch.zeros(8, 4),
        "steps": torch.arange(5),
    }


def _content() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(_adapter()),
            "metrics": MetricRecord({"loss": 1.5}),
            "config": ConfigRecord({"hospital": "north"}),
        }
    )


def test_a_packed_record_is_one_array_and_unpacks_to_the_same_tensors_in_order():
    content = _content()
    packed = packed_content(content)
    assert list(packed["arrays"].keys()) == [PACKED_NAME]
    assert packed["arrays"][PACKED_NAME].stype == PACKED_STYPE
    assert packed["metrics"] is content["metrics"]
    assert packed["config"] is content["config"]
    unpacked = unpacked_content(packed)["arrays"].to_torch_state_dict()
    original = _adapter()
    assert list(unpacked) == list(original)  # the sender's order, not the header's
    for name, tensor in original.items():
        assert unpacked[name].dtype == tensor.dtype
        assert torch.equal(unpacked[name], tensor)
    # the sender's record is untouched: a strategy may send it to other hospitals
    assert list(content["arrays"].keys()) == list(original)


def test_single_array_records_and_unpacked_content_pass_through():
    single = RecordDict({"arrays": ArrayRecord({"w": torch.ones(2)})})
    assert list(packed_content(single)["arrays"].keys()) == ["w"]
    plain = _content()
    assert list(unpacked_content(plain)["arrays"].keys()) == list(_adapter())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_packed_array_is_a_packing_error(damage):
    packed = packed_content(_content())
    array = packed["arrays"][PACKED_NAME]
    array.data = array.data[: len(array.data) // 2] if damage == "truncate" else b"\x00" * 64
    with pytest.raises(PackingError, match="does not unpack"):
        unpacked_content(packed)


def test_the_client_mod_unpacks_for_the_handler_and_packs_the_reply():
    seen: list[list[str]] = []
    app = ClientApp(mods=[packed_arrays_mod])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        seen.append(list(message.content["arrays"].keys()))
        return Message(RecordDict({"arrays": message.content["arrays"]}), reply_to=message)

    message = Message(packed_content(_content()), dst_node_id=1, message_type="train")
    reply = app(message, Context(1, 1, {}, RecordDict(), {}))
    assert seen == [list(_adapter())]
    assert list(reply.content["arrays"].keys()) == [PACKED_NAME]
    assert list(unpacked_content(reply.content)["arrays"].keys()) == list(_adapter())


class _SlowHospitals(Grid):
    """A stand-in for Flower's transport: each reply becomes available after some pulls."""

    def __init__(self, pulls_until_ready: list[int], damaged: bool = False) -> None:
        self.pulls_until_ready = pulls_until_ready
        self.damaged = damaged
        self.pushed: list[Message] = []
        self.pulls = 0

    def set_run(self, run):  # pragma: no cover - not used by the ServerApp's wrapper here
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError  # pragma: no cover

    def get_node_ids(self) -> Iterable[int]:
        return range(len(self.pulls_until_ready))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = list(messages)
        return [f"m{index}" for index in range(len(self.pushed))]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        replies = []
        for message_id in sorted(message_ids):
            index = int(message_id[1:])
            if self.pulls >= self.pulls_until_ready[index]:
                content = packed_content(_content())
                if self.damaged:
                    content["arrays"][PACKED_NAME].data = b"broken"
                reply = Message(content, reply_to=self.pushed[index])
                reply.metadata.__dict__["_reply_to_message_id"] = message_id
                replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise AssertionError("the wrapper polls with its own loop")


def _instructions(count: int) -> list[Message]:
    return [Message(_content(), dst_node_id=node, message_type="train") for node in range(count)]


def test_the_grid_packs_what_it_sends_and_collects_every_late_reply_unpacked():
    hospitals = _SlowHospitals([1, 4, 7])
    grid = TransportGrid(hospitals, first_wait_s=0.001, max_wait_s=0.004)
    replies = list(grid.send_and_receive(_instructions(3), timeout=None))
    assert all(list(m.content["arrays"].keys()) == [PACKED_NAME] for m in hospitals.pushed)
    assert len(replies) == 3
    assert hospitals.pulls == 7
    assert all(list(r.content["arrays"].keys()) == list(_adapter()) for r in replies)


def test_the_grid_stops_at_the_timeout_with_the_replies_it_has():
    hospitals = _SlowHospitals([1, 10**9])
    replies = list(
        TransportGrid(hospitals, first_wait_s=0.01).send_and_receive(_instructions(2), timeout=0.05)
    )
    assert len(replies) == 1


def test_a_reply_that_does_not_unpack_is_that_hospitals_error_not_a_crash():
    hospitals = _SlowHospitals([1], damaged=True)
    (reply,) = TransportGrid(hospitals).send_and_receive(_instructions(1), timeout=5)
    assert reply.has_error()
    assert reply.error.code == UNPACKABLE_REPLY
    assert "does not unpack" in reply.error.reason


def test_a_record_shared_by_several_messages_is_packed_once():
    shared = ArrayRecord(_adapter())
    messages = [
        Message(RecordDict({"arrays": shared}), dst_node_id=node, message_type="train")
        for node in range(3)
    ]
    packed = pack_messages(messages)
    assert all(a is b for a, b in zip(packed, messages, strict=True))  # the same objects
    first = packed[0].content["arrays"]
    assert list(first.keys()) == [PACKED_NAME]
    assert all(m.content["arrays"] is first for m in packed[1:])
    assert list(shared.keys()) == list(_adapter())
