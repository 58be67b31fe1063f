"""The hospital's executor: one long-lived process that runs every ClientApp task of its SuperNode.

In process isolation (``flower-supernode --isolation process``) Flower's SuperNode starts no
executor of its own: it queues each message it receives as a task on its Runtime API (HTTP on
127.0.0.1) and waits for an outside executor to claim it. Flower's own executor would start a
``flwr-clientapp`` process per task (a Python start, Flower's and PyTorch's imports, the FAB
installed, the hospital's site and base model built again): seconds a round for a tiny model,
minutes for a large one. This worker is that outside executor instead. It polls
``AcquireTask`` (every 50 ms within 30 s of its last task, backing off to once a second when
idle) and runs each task in its own process with Flower's functions (``pull_task_input``,
``push_message``, ``push_task_output``, ``HeartbeatSender``), so the ClientApp's site cache
stays warm across rounds and runs.

It runs the fedllm ClientApp installed beside it (``fedllm.clients.client_app``), not code from the
run's FAB: a hospital runs the code its IT installed, and the experiment travels in each
message. Every reply is checked against the release inventory (:mod:`fedllm.privacy.inventory`)
here, before it is pushed, whatever the handler did; a handler that raises becomes a one-line
error reply and the worker goes on serving.

When the SuperNode has a SuperExec secret (``--superexec-auth-secret-file``), only a process
holding it (the hospital's account: the file is 0600) can claim tasks. The worker reports what
it is doing to a status file (``worker/status.json`` in the state dir) that ``fedllm hospital
health`` reads.

Privacy randomness is unchanged: every DP draw comes from
:func:`fedllm.privacy.randomness.fresh_stream`, seeded from OS entropy per release, so two
rounds in one worker draw independent noise; the worker seeds its global generators from OS
entropy once at start, never from the experiment config.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog
from flwr.app import Context, Error, Message
from flwr.common.constant import SubStatus
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from fedllm.federation.worker_state import (
    STATUS_INTERVAL_S,
    WorkerError,
    WorkerState,
    worker_dir,
    worker_status_path,
)
from fedllm.privacy.inventory import check_reply
from fedllm.storage.files import PRIVATE_DIR_MODE

log = structlog.get_logger(__name__)

Handler = Callable[[Message, Context], Message]

# Error.code of a reply whose handler raised or whose reply the inventory refused
WORKER_FAILED = 1
POLL_INTERVAL_S = 0.05
IDLE_POLL_INTERVAL_S = 1.0
# how long after a task the worker keeps polling at POLL_INTERVAL_S
BUSY_WINDOW_S = 30.0
# Flower's SuperExec protects exactly this method with the shared secret
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"
# how often, and how long, a task asks again for a message object still in transit
OBJECT_POLL_S = 0.02
OBJECT_WAIT_S = 10.0


class TaskClient(RuntimeHttpClient):
    """Flower's Runtime API client for one task, asking again for objects still in transit.

    Flower's SuperNode queues a task before it has pulled the message's objects (the adapter)
    from the SuperLink. An object asked for too early is "not available", and Flower's puller
    then waits a second before it asks again, doubling the wait each time
    (``PULL_INITIAL_BACKOFF``). A ``flwr-clientapp`` process rarely noticed, as it takes longer
    to start; the worker claims a task within milliseconds. So this client asks the local
    Runtime API again every 20 ms, for up to 10 s, before it reports an object unavailable to
    Flower's puller: the message is in hand as soon as the SuperNode has it.
    """

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802 (Flower's name)
        deadline = time.monotonic() + OBJECT_WAIT_S
        while True:
            response = super().PullObject(request)
            waiting = response.object_found and not response.object_available
            if not waiting or time.monotonic() >= deadline:
                return response
            time.sleep(OBJECT_POLL_S)


def reply_kind(message: Message) -> str:
    """The release inventory's name for the reply to ``message`` (``query.deliver``: deliver)."""
    category, _, action = message.metadata.message_type.partition(".")
    return action or category


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``: what a failed task's reply says."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"


def checked_reply(handler: Handler, message: Message, context: Context) -> Message:
    """The handler's reply once the release inventory allows every key it carries.

    A handler that raises, or a reply with an undeclared key, becomes a one-line error reply:
    nothing undeclared ever leaves, and the worker keeps serving.
    """
    try:
        reply = handler(message, context)
        if reply.has_content():
            records = {name: list(record.keys()) for name, record in reply.content.items()}
            check_reply(reply_kind(message), records)
        return reply
    except Exception as error:
        log.error("warm_worker.task_failed", reason=one_line(error), exc_info=True)
        return Message(Error(code=WORKER_FAILED, reason=one_line(error)), reply_to=message)


class TaskExecutor:
    """Claims the SuperNode's ClientApp tasks and runs each in this process."""

    def __init__(
        self,
        runtime_api: str,
        handler: Handler,
        *,
        secret: bytes | None = None,
        status_path: Path | None = None,
    ) -> None:
        self.runtime_api = runtime_api
        self.handler = handler
        self.status_path = status_path
        self.state = WorkerState()
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods={ACQUIRE_TASK_METHOD}
                )
            )
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api,
            insecure=True,  # loopback only: the SuperNode binds its Runtime API to 127.0.0.1
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def acquire(self) -> tuple[str, float] | None:
        """Claim the oldest pending ClientApp task: its token and when the SuperNode queued it
        (seconds since the epoch), or None when there is none."""
        self.state.enter("polling")
        response = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        )
        self.state.enter("idle")
        if response.HasField("task") and response.token:
            return response.token, _timestamp(response.task.pending_at)
        return None

    def execute(self, token: str, queued_at: float) -> None:
        """What ``flwr-clientapp`` does with a task, minus the process, imports and FAB.

        Logs where the task's time went: waiting to be claimed, pulling the message, the
        handler, pushing the reply and result, and in all from the SuperNode queueing the
        message to the result pushed (``total_seconds``): the hospital's share of a round,
        which ``benchmarks/round_overhead.py`` reads.
        """
        self.state.enter("running a task")
        claimed = time.time()
        marks = {"claimed": time.perf_counter()}
        client = TaskClient.from_server_address(
            server_address=self.runtime_api,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context: Context | None = None
        status, details, kind = SubStatus.FAILED, "the task failed before its message arrived", ""
        try:
            message, context, _run, _fab = pull_task_input(client)
            kind = message.metadata.message_type
            marks["pulled"] = time.perf_counter()
            reply = checked_reply(self.handler, message, context)
            marks["handled"] = time.perf_counter()
            push_message(client, reply, context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as error:  # Flower's exchange failed: the task expires on its side
            details = one_line(error)
            log.error("warm_worker.exchange_failed", reason=details, exc_info=True)
        finally:
            try:
                push_task_output(client, context, status, details)
            finally:
                heartbeat.stop()
                client.close()
        marks["pushed"] = time.perf_counter()
        self.state.tasks += 1
        self.state.enter("idle")

        def span(start: str, end: str) -> float:
            """Seconds between two marks; a step that never happened took none."""
            return round(marks.get(end, marks["pushed"]) - marks.get(start, marks["pushed"]), 3)

        log.info(
            "warm_worker.handled",
            message_type=kind,
            status=status,
            handled=self.state.tasks,
            pid=os.getpid(),
            queued_seconds=round(claimed - queued_at, 3),
            pull_seconds=span("claimed", "pulled"),
            handler_seconds=span("pulled", "handled"),
            push_seconds=span("handled", "pushed"),
            seconds=span("claimed", "pushed"),
            total_seconds=round(time.time() - queued_at, 3),
        )

    def serve(self, stop: threading.Event) -> None:
        """Poll and run tasks until ``stop`` is set.

        A round's messages come seconds apart, so for ``BUSY_WINDOW_S`` after a task the
        worker polls every 50 ms; then it backs off, doubling up to once a second while idle.
        """
        reporter = threading.Thread(target=self._report, args=(stop,), daemon=True)
        reporter.start()
        interval, last_task = POLL_INTERVAL_S, time.monotonic()
        log.info("warm_worker.serving", runtime_api=self.runtime_api, pid=os.getpid())
        try:
            while not stop.is_set():
                task = self.acquire()
                if task is not None:
                    self.execute(*task)
                    interval, last_task = POLL_INTERVAL_S, time.monotonic()
                    continue
                stop.wait(interval)
                if time.monotonic() - last_task > BUSY_WINDOW_S:
                    interval = min(interval * 2, IDLE_POLL_INTERVAL_S)
        finally:
            self.client.close()
            self.state.enter("stopped")
            self._write_status()

    def _report(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._write_status()
            stop.wait(STATUS_INTERVAL_S)

    def _write_status(self) -> None:
        if self.status_path is not None:
            self.state.write(self.status_path)


def _timestamp(iso: str) -> float:
    """Seconds since the epoch of Flower's ISO 8601 task times (UTC); now for an empty one."""
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return time.time()
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def seed_from_os_entropy() -> None:
    """Seed the process-wide generators from OS entropy, once, never from the config."""
    import torch

    torch.seed()


def serve(
    runtime_api: str,
    handler: Handler,
    *,
    state_dir: Path,
    secret_file: Path | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run ``handler`` on every ClientApp task of the SuperNode at ``runtime_api`` until stopped."""
    seed_from_os_entropy()
    secret = None
    if secret_file is not None:
        try:
            secret = secret_file.read_bytes()
        except OSError as error:
            raise WorkerError(f"cannot read the SuperExec secret {secret_file}: {error}") from None
    directory = worker_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    executor = TaskExecutor(
        runtime_api, handler, secret=secret, status_path=worker_status_path(state_dir)
    )
    executor.serve(stop or threading.Event())
