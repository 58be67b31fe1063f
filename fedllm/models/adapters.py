"""Moving LoRA adapter weights in and out of a model as a named, CPU-resident state dict.

Only the adapter travels between server and hospitals: it is what DP-SGD trains, and a
few hundred kilobytes instead of the whole model per round.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

AdapterState = OrderedDict[str, torch.Tensor]


def adapter_state(model: PeftModel) -> AdapterState:
    """The adapter's weights, detached copies on the CPU, keyed by parameter name."""
    state = get_peft_model_state_dict(model)
    return OrderedDict((name, tensor.detach().cpu().clone()) for name, tensor in state.items())


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter's weights; names must match the model's adapter."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"adapter state lacks {len(missing)} tensors, e.g. {missing[0]}")
    reference = next(iter(expected.values()))
    moved = {
        name: state[name].to(device=reference.device, dtype=expected[name].dtype)
        for name in expected
    }
    set_peft_model_state_dict(model, moved)
