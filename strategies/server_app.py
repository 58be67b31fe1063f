"""The Flower ServerApp: loads the experiment, runs the strategy, writes report, plots, checkpoint.

It is started by ``fedllm run`` (which passes ``run-dir``) or directly by
``flwr run . -c "config-file='configs/x.yaml'"`` (which lets it allocate
``<output_dir>/<name>/`` itself).
"""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedllm.config import ExperimentConfig, dump_config
from fedllm.federation.experiment import experiment_from_run_config
from fedllm.models.adapters import adapter_state, load_adapter_state
from fedllm.models.loading import load_lora_model
from fedllm.report.plots import plot_run
from fedllm.report.run_dir import allocate_run_dir
from fedllm.report.run_report import RunReport
from fedllm.telemetry.logging import configure_logging
from strategies.budget_fedavg import BudgetAwareFedAvg

log = structlog.get_logger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured number of rounds and record everything under the run directory."""
    configure_logging()
    config = experiment_from_run_config(context.run_config)
    given = str(context.run_config.get("run-dir", ""))
    run_dir = Path(given) if given else allocate_run_dir(config.run.output_dir, config.run.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():
        dump_config(config, run_dir / "config.yaml")
    report = RunReport(run_dir, config)
    report.write()
    try:
        run_federation(grid, context, config, run_dir, report)
    except BaseException as error:
        report.finish("failed", error=f"{type(error).__name__}: {error}")
        raise
    plot_run(report.data, run_dir)


def run_federation(
    grid: Grid, context: Context, config: ExperimentConfig, run_dir: Path, report: RunReport
) -> None:
    """Initial evaluation, the federated rounds, then checkpoint and final report."""
    model = load_lora_model(config.model, torch.device("cpu"), config.run.seed)
    strategy = BudgetAwareFedAvg(
        cohort_size=config.federation.cohort_size,
        report=report,
        run_context={"run-dir": str(run_dir), "run-id": str(context.run_id)},
        seed=config.run.seed,
    )
    initial = ArrayRecord(adapter_state(model))
    strategy.query_status(grid)
    initial_replies = grid.send_and_receive(
        strategy.configure_evaluate(0, initial, ConfigRecord(), grid)
    )
    report.data["initial"] = strategy.summarise_evaluation(initial_replies)
    report.write()
    result = strategy.start(grid, initial, num_rounds=config.run.rounds)
    load_adapter_state(model, result.arrays.to_torch_state_dict())
    checkpoint = run_dir / "checkpoint"
    model.save_pretrained(checkpoint)
    rows = report.data["rounds"]
    final = (
        {key: rows[-1][key] for key in ("eval_loss", "perplexity", "perplexity_per_hospital")}
        if rows
        else None
    )
    report.finish(
        "completed",
        final=final,
        checkpoint=str(checkpoint.relative_to(run_dir)),
        timing={
            "rounds_s": round(sum(row["duration_s"] for row in rows), 3),
            "hospital_train_s": round(sum(sum(row["train_seconds"].values()) for row in rows), 3),
        },
    )
    log.info("run.completed", run_dir=str(run_dir), final=final)
