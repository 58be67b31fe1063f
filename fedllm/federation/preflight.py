"""Everything about a run that can be checked without private data, checked before it starts.

A mistake found inside Flower is found after hospitals have released statistics and charged
their ledgers: a misspelt solver used to cost every hospital ε 0.16 before the server tried
to use it. So ``fedllm run`` (and the ServerApp, for ``flwr run``) call this module first. It
checks the solver, the base model and the LoRA targets (on a model built on PyTorch's meta
device, so it takes milliseconds and no memory), the
simulated hospitals' data files, and whether the target ε is reachable at all with the
statistics the run will release. Nothing here writes anything, so a refused run leaves every
ledger, split key and run directory as it was.

Each failure is a :class:`PreflightError` whose message names the config key, the value and
what was expected, in one line. Heavy libraries (torch, transformers, peft) are imported only
by the checks that need them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.config.schema import ExperimentConfig, ModelConfig

if TYPE_CHECKING:
    from torch import nn


class PreflightError(ValueError):
    """A config value that would fail the run, found before anything is spent."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        super().__init__(f"{key}: got {value!r}; expected {expected}")


def preflight(config: ExperimentConfig, *, simulation: bool) -> ExperimentConfig:
    """Every check that needs no private data, cheapest first; raises :class:`PreflightError`.

    ``simulation``: the hospitals are simulated from this config, so their data files are
    checked too (a deployed hospital checks its own before it charges anything).
    Returns `config` as it will run: ``model.lora.target_modules`` filled in with the modules
    peft picks when the YAML leaves them ``null``, so the run directory records them. The
    strategy class is checked by ``fedllm.strategies.contract``, whose contract it is.
    """
    check_solver(config)
    if simulation:
        check_simulation_data(config)
    check_target_epsilon(config)
    modules = check_model(config.model)
    lora = config.model.lora.model_copy(update={"target_modules": modules})
    return config.model_copy(update={"model": config.model.model_copy(update={"lora": lora})})


def check_node_count(config: ExperimentConfig, node_config: Mapping[str, object]) -> None:
    """A simulated SuperNode's federation has one SuperNode per hospital of the experiment.

    Flower's simulation numbers its SuperNodes ``partition-id`` 0..``num-partitions``-1 (set by
    ``num-supernodes``); with a different count, hospitals would be missing or SuperNodes would
    have no hospital. Deployed SuperNodes name their hospital and are not counted.
    """
    from fedllm.federation.node_settings import HOSPITAL_INDEX, HOSPITAL_NAME

    if "num-partitions" not in node_config or {HOSPITAL_NAME, HOSPITAL_INDEX} & set(node_config):
        return
    count = int(str(node_config["num-partitions"]))
    wanted = config.federation.num_hospitals
    if count != wanted:
        raise PreflightError(
            "num-supernodes",
            count,
            f"{wanted}, one simulated SuperNode per hospital of federation.num_hospitals "
            f'(--federation-config "num-supernodes={wanted}")',
        )


def check_solver(config: ExperimentConfig) -> None:
    """The QUBO solver (named or the selection's default) runs with the configured options.

    Solving a three-hospital instance takes milliseconds and exercises exactly what the
    server will call: the name, a dimod sampler's import, and ``solver_options``.
    """
    settings = config.strategy
    if settings.solver is None and settings.selection not in ("quantum", "exact"):
        return
    import numpy as np

    from fedllm.selection.instance import CohortInstance, InstanceError
    from fedllm.selection.solvers import ALL_SOLVERS, DEFAULT_SOLVER, solve

    name = settings.solver or (DEFAULT_SOLVER if settings.selection == "quantum" else "exact")
    instance = CohortInstance(
        utility=np.array([1.0, 0.5, 0.25]), similarity=np.zeros((3, 3)), k=1, lam=0.0
    )
    try:
        solve(instance, solver=name, seed=0)
    except InstanceError:
        names = ", ".join((*ALL_SOLVERS, "dimod:<module>.<Class>"))
        raise PreflightError("strategy.solver", name, f"one of {names}") from None
    if not settings.solver_options:
        return
    try:
        solve(instance, solver=name, seed=0, **settings.solver_options)
    except (TypeError, ValueError) as error:
        raise PreflightError(
            "strategy.solver_options",
            settings.solver_options,
            f"options the {name!r} solver accepts ({one_line(error)})",
        ) from None


def check_simulation_data(config: ExperimentConfig) -> None:
    """The shared data file loads with the named columns, and every hospital gets records."""
    data = config.data
    if data.source == "synthetic":
        return
    from fedllm.data import DataError
    from fedllm.federation.hospital_data import _file_partitions

    names = [profile.name for profile in config.federation.profiles()]
    try:
        # the very partitioning every simulated hospital will compute (cached per process)
        parts = _file_partitions(data.model_dump_json(), tuple(names), config.run.seed)
    except DataError as error:
        message = one_line(error)
        raise PreflightError(
            _data_key(config, message),
            _data_value(config, message),
            (f"a {data.source} source that loads ({message})"),
        ) from None
    sizes = dict(zip(names, map(len, parts), strict=True))
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:
        raise PreflightError(
            "data.path",
            data.path,
            f"records for every hospital, but the {data.partition} partition over "
            f"{len(sizes)} hospitals of its {sum(sizes.values())} records leaves "
            f"{', '.join(empty)} with none (use more records, fewer hospitals or "
            "data.partition: iid)",
        )


def _data_key(config: ExperimentConfig, message: str) -> str:
    """The ``data.*`` key a loader's message is about: a named column, else the path."""
    for key in ("text_field", "specialty_field", "patient_field", "hospital_field"):
        column = getattr(config.data, key)
        if column and f"{column!r}" in message and ("column" in message or "field" in message):
            return f"data.{key}"
    return "data.path"


def _data_value(config: ExperimentConfig, message: str) -> object:
    return getattr(config.data, _data_key(config, message).removeprefix("data."))


def check_target_epsilon(config: ExperimentConfig) -> None:
    """``privacy.target_epsilon`` is above what the run's fixed releases alone cost.

    The noised selection statistics and evaluations are charged whatever σ DP-SGD uses, so a
    target at or below their cost cannot be met by any σ: every hospital would fail.
    """
    from fedllm.privacy.plan import UnreachableTargetError, unreachable_target

    reason = unreachable_target(config)
    if reason is not None:
        raise UnreachableTargetError(f"privacy.target_epsilon: {reason}")


def check_model(model: ModelConfig) -> list[str]:
    """The base model resolves locally and ``lora.target_modules`` match its layers.

    The embedded tiny model is checked from its config (it is built, before Flower starts,
    only if the check passes); a directory or Hugging Face id must already be on disk or in
    the local Hugging Face cache: nothing is downloaded here. The model is built on the meta
    device, so even a large one costs milliseconds. Returns the adapted modules' names.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(_model_config(model))
    adapted = attach_lora(base, model)
    return sorted(adapted.peft_config["default"].target_modules)


def _model_config(model: ModelConfig) -> Any:
    """The transformers config of the base model, without downloading or building it."""
    from transformers import AutoConfig, AutoTokenizer, GPT2Config

    from fedllm.models.loading import TINY_MODEL_NAME
    from fedllm.models.tiny import TINY_MAX_POSITIONS, TINY_VOCAB_SIZE

    if model.name == TINY_MODEL_NAME:
        # the shape fedllm.models.tiny builds: module names depend on nothing else
        return GPT2Config(
            vocab_size=TINY_VOCAB_SIZE,
            n_positions=TINY_MAX_POSITIONS,
            n_embd=model.tiny.hidden_size,
            n_layer=model.tiny.layers,
            n_head=model.tiny.heads,
            bos_token_id=None,
            eos_token_id=None,
        )
    try:
        config = AutoConfig.from_pretrained(model.name, local_files_only=True)
        AutoTokenizer.from_pretrained(model.name, local_files_only=True)
    except (OSError, ValueError) as error:
        where = (
            "a model directory with config.json and a tokenizer"
            if Path(model.name).expanduser().exists()
            else "'tiny', a local model directory, or a Hugging Face id already in the local "
            "Hugging Face cache (download it first; runs never download)"
        )
        raise PreflightError("model.name", model.name, f"{where} ({one_line(error)})") from None
    return config


def attach_lora(base: nn.Module, model: ModelConfig) -> nn.Module:
    """``with_lora`` with a refused ``target_modules`` turned into a one-line error.

    peft refuses targets that match no module, or that match modules it cannot adapt; the
    error lists the model's adaptable layers so that the right names are one look away.
    """
    from fedllm.models.loading import with_lora

    try:
        return with_lora(base, model)
    except ValueError as error:  # peft: nothing matched, or an unsupported layer matched
        import torch
        from transformers.pytorch_utils import Conv1D

        layers = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in base.named_modules()
                if isinstance(module, torch.nn.Linear | Conv1D)
            }
        )
        reason = one_line(error)
        raise PreflightError(
            "model.lora.target_modules",
            model.lora.target_modules,
            f"names of linear layers of model {model.name!r}, one of {layers} ({reason})",
        ) from None


def one_line(error: BaseException) -> str:
    """The first line of an error's message (library messages may span many)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
