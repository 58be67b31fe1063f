"""The Flower ServerApp: gets the experiment, runs the strategy, writes report, plots, checkpoint.

It is started by ``fedllm run`` (which passes the validated experiment as ``experiment`` and
``run-dir``) or directly by ``flwr run . -c "config-file='configs/x.yaml'"`` (which makes it
read and check the YAML itself and allocate ``<output_dir>/<name>/``). Either way every message
to a hospital carries the experiment as JSON (:mod:`fedllm.federation.experiment`). It is the
only writer of ``report.json``, through the :class:`RunRecorder`. A run whose server stopped
part-way resumes from the last round its ledger recorded when it is started again on the same
run directory. A run config with ``deliver-request`` (``fedllm deliver``) trains nothing: it
delivers a finished run's published adapter to every connected hospital again.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import structlog
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, UserConfig
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel

from fedllm.config import ExperimentConfig, dump_config, load_config
from fedllm.federation.delivery import (
    DELIVER_REQUEST,
    deliver_adapter,
    published_adapter,
    record_delivery,
)
from fedllm.federation.experiment import (
    EXPERIMENT,
    experiment_from_run_config,
    experiment_json,
    given_experiment,
)
from fedllm.federation.node_registry import registry_from_environment
from fedllm.federation.preflight import preflight
from fedllm.federation.run_identity import ledger_run_id
from fedllm.models.adapters import adapter_state, load_adapter_state
from fedllm.models.checkpoints import (
    PublicationRefusedError,
    adapter_directory_writer,
    load_round_checkpoint,
    publish_adapter,
    save_adapter_directory,
)
from fedllm.models.dp_record import DPRecordError
from fedllm.models.loading import base_model, load_lora_model
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.outcome import run_outcome
from fedllm.report.plots import plot_run
from fedllm.report.progress import STARTED_EVENT
from fedllm.report.run_dir import allocate_run_dir
from fedllm.report.run_report import RunReport
from fedllm.security.encryption import EncryptionError, KeyRingSource
from fedllm.security.environment import keyring_from_environment
from fedllm.strategies.contract import check_strategy_class
from fedllm.strategies.privacy_aware import PrivacyAwareStrategy
from fedllm.strategies.recorder import RunRecorder
from fedllm.strategies.server_dp import HospitalLevelDpStrategy
from fedllm.strategies.transport_grid import TransportGrid
from fedllm.telemetry.logging import configure_logging
from fedllm.telemetry.tracing import DISABLED, Tracing

log = structlog.get_logger(__name__)

app = ServerApp()
# The app bundle this ServerApp runs from: relative experiment paths resolve here first.
APP_DIRECTORY = Path(__file__).resolve().parents[1]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the configured rounds and record everything under the run directory;
    or, asked for ``deliver-request``, only deliver a finished run's adapter again."""
    configure_logging()
    grid = TransportGrid(grid)
    request = str(context.run_config.get(DELIVER_REQUEST, ""))
    if request:
        deliver_again(grid, context.run_config, request)
        return
    try:
        # `fedllm run` validated and checked it (with data) and recorded it as config.yaml
        config = given_experiment(context.run_config)
        if config is None:
            config = experiment_from_run_config(context.run_config, APP_DIRECTORY)
            # before any hospital is asked anything
            config = preflight(config, simulation=False)
            if config.strategy.strategy_class:
                check_strategy_class(config.strategy.strategy_class, APP_DIRECTORY)
        # the one place the server's key ring enters (ledger rows and checkpoints at rest);
        # a missing or malformed key file refuses the run before anything is written
        keyring = keyring_from_environment()
    except (ValueError, EncryptionError) as error:
        log.error("run.refused", reason=str(error))
        raise
    given = str(context.run_config.get("run-dir", ""))
    run_dir = Path(given) if given else allocate_run_dir(config.run.output_dir, config.run.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    # under `flwr run` this is the only way to learn where the run is written
    log.info(STARTED_EVENT, run_dir=str(run_dir.resolve()))
    if not given and config.evaluation.baselines:
        log.warning(
            "run.baselines_skipped",
            baselines=list(config.evaluation.baselines),
            detail="evaluation.baselines run in `fedllm run`'s own process, not under flwr run; "
            "run `fedllm run` for them, or `fedllm run --no-baselines` to match this run",
        )
    if not (run_dir / "config.yaml").exists():
        # fedllm run has written it where it runs; a deployed SuperLink's host keeps a copy
        dump_config(config, run_dir / "config.yaml")
    ledger = ServerLedger(
        config.strategy.ledger_url or f"sqlite:///{run_dir / 'server.db'}", keyring=keyring
    )
    run_id = run_dir.name
    ledger.start_run(run_id, config.model_dump_json())
    state = ledger.resume_state(run_id)
    completed = state.last_completed_round if state else 0
    report = (
        RunReport.resume(run_dir, config, completed) if completed else RunReport(run_dir, config)
    )
    report.write()
    # one trace per round, to the collector of the experiment's `tracing:` section (if any)
    tracing = Tracing.from_config(config.tracing, "fedllm-server", "fedllm.federation")
    try:
        run_federation(grid, config, run_dir, report, ledger, completed, tracing, keyring=keyring)
    except BaseException as error:
        report.finish("failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        tracing.shutdown()
    plot_run(report.data, run_dir)


def run_context(config: ExperimentConfig, run_dir: Path) -> dict[str, str]:
    """What every message of the run carries besides its own content."""
    return {
        "run-dir": str(run_dir),
        # unique across researchers: what hospitals record in their ledgers
        "run-id": ledger_run_id(run_dir),
        # a hospital on another base model refuses
        "base-model-sha256": base_model(config.model).sha256,
        # the experiment itself: hospitals build their site from it, never from a file
        EXPERIMENT: experiment_json(config),
    }


def deliver_again(grid: Grid, run_config: UserConfig, request: str) -> None:
    """Deliver a finished run's published adapter to every connected hospital once more.

    Nothing is trained or charged and the run's report and ledgers are left as they are: the
    hospitals' acknowledgements go to ``deliveries/<request>.json`` in its run directory.
    """
    given = str(run_config.get("run-dir", ""))
    run_dir = Path(given)
    try:
        if not given:
            raise ValueError(f"{DELIVER_REQUEST}: the run-dir of the run to deliver is not given")
        # the run's own experiment: what `fedllm deliver` passes, else its recorded config.yaml
        config = given_experiment(run_config) or load_config(run_dir / "config.yaml")
        # the server's key ring: the published adapter may be encrypted at rest
        keyring = keyring_from_environment()
        published = published_adapter(run_dir, keyring=keyring)
    except (ValueError, EncryptionError) as error:
        log.error("adapter.not_delivered", reason=str(error))
        raise
    outcome = deliver_adapter(
        grid,
        published,
        run_context(config, run_dir),
        config.strategy.round_timeout_s,
        keyring=keyring,
    )
    record_delivery(run_dir, request, outcome)


def load_strategy_class(spec: str | None) -> type[PrivacyAwareStrategy]:
    """``package.module:Class`` (a PrivacyAwareStrategy subclass), or the default."""
    if spec is None:
        return PrivacyAwareStrategy
    module_name, _, class_name = spec.partition(":")
    strategy_class = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(strategy_class, type) and issubclass(strategy_class, PrivacyAwareStrategy)):
        raise TypeError(f"strategy.strategy_class {spec!r} is not a PrivacyAwareStrategy subclass")
    return strategy_class


def run_federation(
    grid: Grid,
    config: ExperimentConfig,
    run_dir: Path,
    report: RunReport,
    ledger: ServerLedger,
    completed: int,
    tracing: Tracing = DISABLED,
    *,
    keyring: KeyRingSource | None,
) -> None:
    """Initial evaluation (fresh runs), the remaining rounds, then checkpoint and final report.

    ``keyring`` encrypts the round checkpoints, the final and published adapters at rest (and
    decrypts what a resumed run reads back).
    """
    model = load_lora_model(config.model, torch.device("cpu"), config.run.seed)
    strategy_class = load_strategy_class(config.strategy.strategy_class)
    # the strategy decides, the recorder writes: report rows, the ledger's round records and
    # round checkpoints. peft writes from a model: the writer overwrites `model`'s adapter
    # with each round's, and the final adapter is loaded into it again before `checkpoint/`
    recorder = RunRecorder(
        report,
        ledger,
        run_dir.name,
        run_dir,
        checkpoint_writer=adapter_directory_writer(model, keyring=keyring),
        tracing=tracing,
    )
    strategy = strategy_class.from_config(
        config,
        recorder=recorder,
        run_context=run_context(config, run_dir),
        round_offset=completed,
        # a deployed SuperLink's hospital name <-> registered key bindings (None: simulation)
        node_registry=registry_from_environment(),
    )
    if completed:
        last = Path(ledger.checkpoint(run_dir.name))
        load_adapter_state(model, load_round_checkpoint(last, keyring=keyring))
        log.info("run.resumed", run_dir=str(run_dir), after_round=completed)
    arrays = ArrayRecord(adapter_state(model))
    strategy.query_status(grid)
    if strategy.problems:
        # The first message a hospital gets builds its site: data, model, LoRA, privacy plan.
        # One that failed there has charged nothing, and neither has any other: stop here.
        report.finish(
            "failed",
            error=f"{len(strategy.problems)} hospital(s) failed their checks before round "
            f"{completed + 1}; no hospital was charged for it",
            causes=sorted(strategy.problems.values()),
        )
        log.error("run.stopped_before_training", causes=report.data["causes"])
        return
    if not completed:
        replies = grid.send_and_receive(
            strategy.configure_evaluate(0, arrays, ConfigRecord(), grid),
            timeout=config.strategy.round_timeout_s,
        )
        report.data["initial"] = strategy.summarise_evaluation(replies)
        report.write()
    remaining = config.run.rounds - completed
    if remaining > 0:
        # server-side DP (strategy.server_dp) wraps the strategy; the rest talks to it directly
        rounds = HospitalLevelDpStrategy.around(strategy, config)
        result = rounds.start(
            grid, arrays, num_rounds=remaining, timeout=config.strategy.round_timeout_s
        )
        if len(result.arrays):
            arrays = result.arrays
    load_adapter_state(model, arrays.to_torch_state_dict())
    checkpoint = run_dir / "checkpoint"
    save_adapter_directory(model, checkpoint, keyring=keyring)
    rows = report.data["rounds"]
    outcome = run_outcome(rows, strategy.problems.values(), remaining)
    # a run that trained nothing has nothing to publish: its adapter is the initial one
    published = (
        None
        if outcome.status == "failed"
        else publish_final_adapter(model, config, run_dir, report, keyring=keyring)
    )
    # the federation brings the published adapter to every hospital's inference server
    delivery = (
        None
        if published is None
        else deliver_adapter(
            grid,
            published,
            strategy.run_context,
            config.strategy.round_timeout_s,
            keyring=keyring,
        ).summary()
    )
    final = (
        {key: rows[-1][key] for key in ("eval_loss", "perplexity", "perplexity_per_hospital")}
        if rows
        else None
    )
    report.finish(
        outcome.status,
        **({"error": outcome.summary} if outcome.summary else {}),
        causes=outcome.causes,
        final=final,
        checkpoint=str(checkpoint.relative_to(run_dir)),
        published_adapter=None if published is None else str(published),
        adapter_delivery=delivery,
        timing={
            "rounds_s": round(sum(row["duration_s"] for row in rows), 3),
        },
    )
    log.info("run.finished", status=outcome.status, run_dir=str(run_dir), final=final)


def publish_final_adapter(
    model: PeftModel,
    config: ExperimentConfig,
    run_dir: Path,
    report: RunReport,
    *,
    keyring: KeyRingSource | None,
) -> Path | None:
    """Publish the final adapter to ``run.publish_adapter_dir`` if this run may; its path or None.

    Servers answer from the published adapter as 0 ε post-processing: only a DP run may
    publish, and it publishes its guarantee (dp-record.json, from the report's privacy section)
    alongside the weights. A refusal is a log line, never a failed run: the run's own
    ``checkpoint/`` is already written.
    """
    if not config.run.publish_adapter_dir:
        return None
    target = run_dir.parent / config.run.publish_adapter_dir
    try:
        record = publish_adapter(
            model,
            target,
            run_id=run_dir.name,
            privacy=report.data["privacy"],
            model_config=config.model,
            keyring=keyring,
        )
    except PublicationRefusedError as refusal:  # a non-DP run (e.g. federated_no_dp)
        log.warning("adapter.not_published", path=str(target), reason=str(refusal))
        return None
    except DPRecordError as error:  # the report cannot vouch for the adapter: keep it back
        log.error("adapter.not_published", path=str(target), reason=str(error))
        return None
    if record.neighbouring is None:
        log.warning(
            "adapter.dp_record_incomplete",
            path=str(target),
            detail="the report states no neighbouring relation; recorded as null",
        )
    log.info("adapter.published", path=str(target), dp_record=record.summary())
    return target
