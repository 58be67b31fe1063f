"""The Flower ClientApp run at each hospital: answers status queries, trains and evaluates.

It adapts Flower messages to :class:`fedllm.federation.hospital.HospitalSite`. The experiment
comes in every message, as the JSON the ServerApp resolved (``experiment``,
:mod:`fedllm.federation.experiment`): a hospital reads no experiment file. A site (data, model,
ledger) is built once per process and reused across rounds. Which hospital this node is
comes from the node config (:mod:`fedllm.federation.node_settings`): ``hospital-name`` or
``hospital-index`` when the operator set one, else Flower's simulation ``partition-id``;
``data-path`` names a deployed hospital's own records file; ``ledger-url`` and ``epsilon-cap``
let a hospital keep its accountant where it chooses and impose its own cap; ``split-key-file``
holds its secret train/eval split key; ``evaluation: off`` refuses evaluation; ``adapter-dir``
is where its inference server hot-reloads the federation's adapter, which the last message of a
run (``query.deliver``) installs there after checking it (:mod:`fedllm.federation.delivery`).
Every message carries the server's base-model hash (``base-model-sha256``); a hospital whose
own base model hashes differently answers with a one-line error before it charges anything
(before its ledger is even opened, when that is the first message). Every reply is checked
against the release inventory (:mod:`fedllm.privacy.inventory`) before it leaves: an undeclared
key is never sent.

Under ``fedllm hospital start`` (``runtime.warm_worker``, on by default) these handlers run in
the hospital's long-lived worker (:mod:`fedllm.federation.warm_worker`), the SuperNode's
executor, which claims each message from the SuperNode and keeps the site cache below warm
across rounds and runs; with the worker off, Flower starts a process per message and each
builds its site afresh. The modules that load models are imported inside the handlers, so
importing this app costs an import of Flower and not of PyTorch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedllm.federation.array_packing import packed_arrays_mod
from fedllm.federation.node_settings import (
    ADAPTER_DIR,
    adapter_dir,
    hospital_index,
    node_settings,
)
from fedllm.privacy.inventory import check_reply
from fedllm.security.environment import keyring_from_environment
from fedllm.telemetry.logging import configure_logging

if TYPE_CHECKING:
    from fedllm.config import ExperimentConfig
    from fedllm.federation.hospital import HospitalSite

log = structlog.get_logger(__name__)

# Error.code of a reply whose handler failed at the hospital (the reason says why, in one line)
HOSPITAL_FAILED = 1
# fedllm.federation.delivery.DELIVER_ACTION, named here because that module loads PyTorch
DELIVER_ACTION = "deliver"


def _experiment(message: Message) -> ExperimentConfig:
    """The run's experiment as the ServerApp's message carries it: no file is read."""
    from fedllm.federation.experiment import experiment_from_message

    return experiment_from_message(message.content["config"])


def _hospital_label(message: Message, context: Context) -> str:
    """This node's hospital name when the experiment says it, else its Flower node id."""
    try:
        config = _experiment(message)
        return config.federation.profiles()[hospital_index(config, context.node_config)].name
    except Exception:  # the label of a failure must never fail itself
        return f"node {context.node_id}"


def reply_on_failure(handler: Callable[[Message, Context], Message]):
    """Turn any failure of ``handler`` into an error reply whose reason is one line.

    The server collects these reasons, so a researcher sees ``hospital X: DataError: ...``
    instead of a traceback buried in a log; the traceback stays in the hospital's own log.
    """

    @functools.wraps(handler)
    def guarded(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            hospital = _hospital_label(message, context)
            reason = f"hospital {hospital}: {type(error).__name__}: {first_line}"
            log.error("hospital.failed", reason=reason, exc_info=True)
            return Message(Error(code=HOSPITAL_FAILED, reason=reason), reply_to=message)

    return guarded


# arrays travel packed (fedllm.federation.array_packing); every handler sees them unpacked
app = ClientApp(mods=[packed_arrays_mod])

_SITES: dict[tuple[str, int, str], HospitalSite] = {}


def hospital_site(context: Context, message: Message) -> HospitalSite:
    """The cached site for this node and run, built on first use, on the server's base model."""
    from fedllm.federation.hospital import HospitalSite

    run_dir = _run_dir(message)
    server_base = str(message.content["config"].get("base-model-sha256", ""))
    from fedllm.federation.preflight import check_node_count

    config = _experiment(message)
    check_node_count(config, context.node_config)
    settings = node_settings(config, context.node_config, run_dir)
    key = (config.model_dump_json(), settings.index, run_dir)
    if key in _SITES:
        _SITES[key].require_base_model(server_base)
    else:
        configure_logging()
        _SITES[key] = HospitalSite(
            config,
            settings.index,
            settings.ledger_url,
            epsilon_cap=settings.epsilon_cap,
            local_data=settings.local_data,
            split_key=settings.split_key,
            evaluation_allowed=settings.evaluation_allowed,
            base_model_sha256=server_base,
            # the hospital's key ring enters here (this process's environment), nowhere below
            keyring=keyring_from_environment(),
        )
        log.info("hospital.site_built", hospital=_SITES[key].name, sites=len(_SITES))
    return _SITES[key]


def _reply(message: Message, kind: str, records: dict[str, Any]) -> Message:
    """The reply, once every key it carries is in the release inventory."""
    check_reply(kind, {name: list(record.keys()) for name, record in records.items()})
    return Message(RecordDict(records), reply_to=message)


def _run_dir(message: Message) -> str:
    return str(message.content["config"]["run-dir"])


@app.query()
@reply_on_failure
def status(message: Message, context: Context) -> Message:
    """Report identity and privacy budget so the server selects only hospitals that can afford.

    When asked, also release the noised data profile (once per run; charged to the ledger).
    """
    config = message.content["config"]
    site = hospital_site(context, message)
    profile = None
    from fedllm.privacy.events import event_to_dict

    if int(config.get("release-profile", 0)):
        profile = site.release_profile(str(config["run-id"]))
    status = site.status()
    if profile is not None:
        status["profile"] = profile
        status["profile-events"] = json.dumps(
            [event_to_dict(event) for event in site.plan.one_off_events()] if site.plan else []
        )
    return _reply(message, "query", {"status": ConfigRecord(status)})


@app.train()
@reply_on_failure
def train(message: Message, context: Context) -> Message:
    """One round of local DP-SGD on the global adapter."""
    site = hospital_site(context, message)
    config = message.content["config"]
    outcome = site.train_round(
        message.content["arrays"].to_torch_state_dict(),
        int(config["server-round"]),
        str(config["run-id"]),
    )
    return _reply(
        message,
        "train",
        {
            "arrays": ArrayRecord(outcome.adapter),
            "metrics": MetricRecord(outcome.metrics),
            "privacy": ConfigRecord({"events": json.dumps(outcome.events)}),
        },
    )


@app.evaluate()
@reply_on_failure
def evaluate(message: Message, context: Context) -> Message:
    """Held-out loss of the global adapter, released as the experiment and hospital allow."""
    site = hospital_site(context, message)
    config = message.content["config"]
    released = site.evaluate(
        message.content["arrays"].to_torch_state_dict(),
        int(config["server-round"]),
        str(config["run-id"]),
    )
    metrics: dict[str, float | int] = {
        "hospital-index": site.index,
        "evaluated": int(released is not None),
    }
    events: list[dict[str, Any]] = []
    if released is not None:
        result, events = released
        metrics |= {"eval-loss-sum": result.loss_sum, "eval-count": result.count}
    if site.ledger is not None:
        metrics |= {"epsilon": site.ledger.spent_epsilon(), "epsilon-cap": site.ledger.cap}
    return _reply(
        message,
        "evaluate",
        {
            "metrics": MetricRecord(metrics),
            "privacy": ConfigRecord({"events": json.dumps(events)}),
        },
    )


@app.query(DELIVER_ACTION)
@reply_on_failure
def deliver(message: Message, context: Context) -> Message:
    """Install the run's published DP adapter where this hospital's inference server reloads it.

    The hospital checks the adapter against its own base model (not the server's word for it),
    so no site, data or ledger is needed: nothing is charged and nothing about patients leaves.
    """
    from fedllm.federation.delivery import ACK_RECORD, ADAPTER_RECORD, install_delivery
    from fedllm.federation.hospital import BaseModelMismatchError
    from fedllm.models.loading import base_model

    config = _experiment(message)
    own = base_model(config.model)
    server_base = str(message.content["config"].get("base-model-sha256", ""))
    if server_base != own.sha256:
        raise BaseModelMismatchError(
            f"the server's base model is {server_base[:12] or 'not stated'}, this hospital's "
            f"({own.name!r}) is {own.sha256[:12]}"
        )
    label = config.federation.profiles()[hospital_index(config, context.node_config)].name
    if ADAPTER_DIR not in context.node_config:
        # a training-only hospital (or a simulated one): no inference server to deliver to
        digest = ""
    else:
        digest = install_delivery(
            message.content[ADAPTER_RECORD],
            adapter_dir(context.node_config),
            own.sha256,
            keyring=keyring_from_environment(),
        )
    return _reply(
        message,
        "deliver",
        {ACK_RECORD: ConfigRecord({"hospital": label, "adapter-sha256": digest})},
    )
