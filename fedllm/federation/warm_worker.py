"""A long-lived hospital worker that keeps the base model loaded across rounds and runs.

Flower's deployment runtime starts one ``flwr-clientapp`` process per message, so a ClientApp
that trained itself would rebuild its hospital site (records, tokenizer, base model, ledger)
every round: seconds for a tiny model, minutes for a billion-parameter one. ``fedllm hospital
start`` therefore starts this worker next to the SuperNode; the ClientApp forwards each
message to it over a Unix domain socket and returns its reply. The worker runs the same
ClientApp handlers in-process, so their site cache stays warm.

The socket lives in a 0700 directory of the hospital's private state dir and is itself 0600:
only the hospital's account can reach it. Messages travel as Flower's own protobuf
serialization (``flwr.common.serde``), never pickle, in length-prefixed frames below a size
cap; the worker handles one message at a time, and a client that sends garbage, too much or
too slowly gets an error and is disconnected while the worker keeps serving.

Privacy randomness is unchanged: every DP draw comes from
:func:`fedllm.privacy.randomness.fresh_stream`, seeded from OS entropy per release, so two
rounds in one worker draw independent noise; the worker seeds its global generators from OS
entropy once at start, never from the experiment config.
"""

from __future__ import annotations

import os
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedllm.storage.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, PRIVATE_UMASK

log = structlog.get_logger(__name__)

SOCKET_NAME = "worker.sock"
# A Unix socket address holds at most 107 bytes on Linux (108 with the terminating NUL).
MAX_SOCKET_PATH = 107
# One frame: an 8-byte big-endian length, then that many bytes.
FRAME_HEADER = struct.Struct("!Q")
# A LoRA adapter of an 8B model is tens of MB; a delivered adapter the same. Anything far
# larger is not a message of this federation.
MAX_FRAME_BYTES = 1 << 30
# A client has this long to send its request; the reply takes as long as the round does.
REQUEST_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5.0
OK, FAILED = b"\x00", b"\x01"

Handler = Callable[[Message, Context], Message]


class WorkerError(RuntimeError):
    """The worker cannot be reached, or refused or failed a request (one line says why)."""


def worker_socket_path(state_dir: Path) -> Path:
    """Where a hospital's worker listens: ``worker/worker.sock`` in its private state dir."""
    return Path(state_dir) / "worker" / SOCKET_NAME


def _send_frame(connection: socket.socket, payload: bytes) -> None:
    connection.sendall(FRAME_HEADER.pack(len(payload)) + payload)


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = connection.recv(min(remaining, 1 << 20))
        if not chunk:
            raise WorkerError(f"connection closed with {remaining} of {size} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _receive_frame(connection: socket.socket, limit: int = MAX_FRAME_BYTES) -> bytes:
    (size,) = FRAME_HEADER.unpack(_receive_exactly(connection, FRAME_HEADER.size))
    if size > limit:
        raise WorkerError(f"a frame of {size} bytes is over the {limit}-byte limit")
    return _receive_exactly(connection, size)


def encode_request(message: Message, context: Context) -> tuple[bytes, bytes]:
    """A message and its context as Flower's protobuf bytes."""
    return (
        message_to_proto(message).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def decode_request(message_bytes: bytes, context_bytes: bytes) -> tuple[Message, Context]:
    """The inverse of :func:`encode_request`; a `WorkerError` for bytes that are not one."""
    try:
        message = message_from_proto(ProtoMessage.FromString(message_bytes))
        context = context_from_proto(ProtoContext.FromString(context_bytes))
    except Exception as error:
        raise WorkerError(f"not a Flower message and context: {type(error).__name__}") from None
    return message, context


def forward(path: Path, message: Message, context: Context) -> tuple[Message, Context]:
    """Send one message to the worker at ``path``; its reply and the context it returned.

    Raises `WorkerError` when the worker cannot be reached or refuses the request.
    """
    message_bytes, context_bytes = encode_request(message, context)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(CONNECT_TIMEOUT_S)
        try:
            connection.connect(str(path))
        except OSError as error:
            raise WorkerError(
                f"the hospital worker at {path} is not reachable: {error.strerror or error}"
            ) from None
        connection.settimeout(None)  # training takes as long as it takes
        try:
            _send_frame(connection, message_bytes)
            _send_frame(connection, context_bytes)
            status = _receive_exactly(connection, 1)
            first = _receive_frame(connection)
            if status != OK:
                raise WorkerError(f"the hospital worker refused the message: {first.decode()}")
            second = _receive_frame(connection)
        except OSError as error:
            raise WorkerError(f"the hospital worker at {path} failed: {error}") from None
    return decode_request(first, second)


class _Connection(socketserver.BaseRequestHandler):
    """One request: read message and context, run the handler under the lock, reply."""

    server: WorkerServer

    def handle(self) -> None:
        connection: socket.socket = self.request
        connection.settimeout(REQUEST_TIMEOUT_S)
        try:
            if not connection.recv(1, socket.MSG_PEEK):
                return  # connected and closed: a probe that the worker listens
            message, context = decode_request(
                _receive_frame(connection, self.server.max_frame_bytes),
                _receive_frame(connection, self.server.max_frame_bytes),
            )
        except (WorkerError, OSError) as error:
            log.warning("warm_worker.refused", reason=str(error))
            self._answer_failure(connection, str(error))
            return
        connection.settimeout(None)
        try:
            reply, context = self.server.run(message, context)
            reply_bytes, context_bytes = encode_request(reply, context)
        except Exception as error:  # the app's own failures are error replies already
            log.error("warm_worker.failed", exc_info=True)
            first_line = (str(error).strip().splitlines() or [""])[0]
            self._answer_failure(connection, f"{type(error).__name__}: {first_line}")
            return
        try:
            connection.sendall(OK)
            _send_frame(connection, reply_bytes)
            _send_frame(connection, context_bytes)
        except OSError as error:
            log.warning("warm_worker.reply_lost", reason=str(error))

    @staticmethod
    def _answer_failure(connection: socket.socket, reason: str) -> None:
        try:
            connection.sendall(FAILED)
            _send_frame(connection, reason.encode())
        except OSError:
            pass  # a client gone before its refusal arrived


class WorkerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Unix-socket server that runs ``handler`` on one message at a time.

    Connections are read concurrently (a slow client cannot hold the others up for more than
    its own request timeout) but handled one at a time: one model, one ledger, one round.
    """

    daemon_threads = True

    def __init__(
        self, path: Path, handler: Handler, max_frame_bytes: int = MAX_FRAME_BYTES
    ) -> None:
        self.handler = handler
        self.max_frame_bytes = max_frame_bytes
        self.lock = threading.Lock()
        self.handled = 0
        bind_private_socket_path(path)
        previous = os.umask(PRIVATE_UMASK)
        try:
            super().__init__(str(path), _Connection)
        finally:
            os.umask(previous)
        os.chmod(path, PRIVATE_FILE_MODE)

    def run(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the handler on one message, under the lock; its reply and the context."""
        with self.lock:
            started = time.perf_counter()
            reply = self.handler(message, context)
            self.handled += 1
            log.info(
                "warm_worker.handled",
                message_type=message.metadata.message_type,
                handled=self.handled,
                seconds=round(time.perf_counter() - started, 3),
            )
        return reply, context


def bind_private_socket_path(path: Path) -> None:
    """Make ``path``'s directory 0700 and clear a stale socket a dead worker left there.

    Refuses (`WorkerError`) a path too long for a Unix socket, a path that is not a socket,
    and a socket another worker is still listening on.
    """
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise WorkerError(
            f"the worker socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter runtime.state_dir"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    os.chmod(path.parent, PRIVATE_DIR_MODE)
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise WorkerError(f"{path} exists and is not a socket; remove it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a worker that died left it
            return
    raise WorkerError(f"another hospital worker is already listening on {path}")


def seed_from_os_entropy() -> None:
    """Seed the process-wide generators from OS entropy, once, never from the config."""
    import torch

    torch.seed()


def serve(path: Path, handler: Handler, ready: Callable[[], None] | None = None) -> None:
    """Serve ``handler`` on ``path`` until interrupted; the socket file is removed on exit."""
    seed_from_os_entropy()
    with WorkerServer(path, handler) as server:
        log.info("warm_worker.listening", socket=str(path), pid=os.getpid())
        if ready is not None:
            ready()
        try:
            server.serve_forever()
        finally:
            path.unlink(missing_ok=True)


def wait_until_listening(path: Path, timeout_s: float, alive: Callable[[], bool]) -> bool:
    """Whether a worker accepts connections on ``path`` within ``timeout_s`` (while alive)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return True
            except OSError:
                time.sleep(0.2)
    return False
