"""Each ArrayRecord of a message travels as one safetensors array, not one object per tensor.

Flower 1.42 moves a message between ServerApp, SuperLink and SuperNode as a tree of objects,
one HTTP request per object in each direction: a LoRA adapter of 28 tensors was more than 30
requests to send and as many to receive, each a few milliseconds of the SuperLink's Python and
SQLite, so the transfer grew with the number of adapted modules (docs/benchmarks.md). Packed,
an adapter is one array whatever its number of tensors (Flower still splits an array above
5 MB into chunks, so the count grows only with the adapter's bytes).

The server side packs in :class:`fedllm.strategies.transport_grid.TransportGrid`, the client
side in :func:`packed_arrays_mod` (a ClientApp mod); both unpack what they receive, so every
strategy, handler, inventory check and ledger sees the tensors under their own names. The
format is safetensors: a header of names, dtypes and shapes then the raw bytes, made to be
parsed from untrusted senders. The record's original order travels in its metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

PACKED_STYPE = "safetensors"
"""The ``stype`` of a packed array: its data is a safetensors file of the record's tensors."""
PACKED_NAME = "packed"
_ORDER = "order"


class PackingError(ValueError):
    """A packed array that does not unpack (corrupt, or not what this module writes)."""


def _pack(record: ArrayRecord) -> ArrayRecord:
    tensors = {name: np.ascontiguousarray(array.numpy()) for name, array in record.items()}
    blob = save_safetensors(tensors, metadata={_ORDER: json.dumps(list(tensors))})
    return ArrayRecord({PACKED_NAME: Array("uint8", (len(blob),), PACKED_STYPE, blob)})


def _unpack(record: ArrayRecord) -> ArrayRecord:
    blob = record[PACKED_NAME].data
    try:
        tensors = load_safetensors(blob)
        order = json.loads(_metadata(blob)[_ORDER])
        return ArrayRecord({name: Array(tensors[name]) for name in order})
    except Exception as error:  # a broken blob is the sender's fault, said in one line
        raise PackingError(f"a packed array record does not unpack: {error}") from None


def _metadata(blob: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (the header is JSON after an 8-byte length)."""
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + length])["__metadata__"]


def _is_packed(record: object) -> bool:
    return (
        isinstance(record, ArrayRecord)
        and list(record.keys()) == [PACKED_NAME]
        and record[PACKED_NAME].stype == PACKED_STYPE
    )


def packed_content(
    content: RecordDict, already_packed: dict[int, ArrayRecord] | None = None
) -> RecordDict:
    """``content`` with every ArrayRecord of two or more arrays packed; the input is untouched.

    ``already_packed`` maps ``id(record)`` to its packed form for records that several
    messages share (one adapter sent to every hospital), so each is serialised once; the
    caller keeps those records alive while the map is in use.
    """
    cache = {} if already_packed is None else already_packed
    packed = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and len(record) > 1:
            if id(record) not in cache:
                cache[id(record)] = _pack(record)
            record = cache[id(record)]
        packed[name] = record
    return RecordDict(packed)


def unpacked_content(content: RecordDict) -> RecordDict:
    """``content`` with every packed ArrayRecord back to its tensors, names and order."""
    return RecordDict(
        {
            name: _unpack(record) if _is_packed(record) else record
            for name, record in content.items()
        }
    )


def pack_messages(messages: Iterable[Message]) -> list[Message]:
    """The same message objects, each carrying packed content if it has content; a record
    shared by several of them is packed once."""
    already_packed: dict[int, ArrayRecord] = {}
    messages = list(messages)
    for message in messages:
        if message.has_content():
            message.content = packed_content(message.content, already_packed)
    return messages


def unpack_message(message: Message) -> Message:
    """``message`` (the same object) carrying unpacked content, if it has content."""
    if message.has_content():
        message.content = unpacked_content(message.content)
    return message


def packed_arrays_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: the handlers see unpacked arrays; the reply leaves packed."""
    (reply,) = pack_messages([call_next(unpack_message(message), context)])
    return reply
