"""The hospital's SuperNode is Flower's, with the waits of its message loop sized.

What is swapped are two module-level names of Flower's ``start_client_internal``; these
tests read Flower's source so that an upgrade that renames them, or adds a wait of another
length, fails here instead of silently running with Flower's waits. A real SuperNode started
this way serves every deployed test (tests/test_warm_worker.py, tests/test_deployment.py).
"""

from __future__ import annotations

import ast
import inspect
import time

from flwr.supercore.inflatable import inflatable_utils
from flwr.supernode import start_client_internal

from fedllm.federation.deployment import supernode_command
from fedllm.federation.supernode_process import (
    FLOWER_IDLE_POLL_S,
    FLOWER_REPLY_POLL_S,
    SupernodeWaits,
    size_supernode_waits,
)


def _flower_loop() -> ast.Module:
    return ast.parse(inspect.getsource(start_client_internal))


def test_flower_loop_waits_only_with_the_two_sleeps_it_replaces():
    loop = _flower_loop()
    uses_of_time = [
        node
        for node in ast.walk(loop)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "time"
    ]
    assert {node.attr for node in uses_of_time} == {"sleep"}
    waits = {
        call.args[0].value
        for call in ast.walk(loop)
        if isinstance(call, ast.Call) and call.func in uses_of_time
    }
    assert waits == {FLOWER_IDLE_POLL_S, FLOWER_REPLY_POLL_S}


def test_flower_loop_pulls_objects_through_the_module_level_name():
    calls = [
        call
        for call in ast.walk(_flower_loop())
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "pull_objects"
    ]
    assert calls
    assert all(not {"initial_backoff", "backoff_cap"} & {k.arg for k in c.keywords} for c in calls)
    parameters = inspect.signature(inflatable_utils.pull_objects).parameters
    assert {"initial_backoff", "backoff_cap"} <= set(parameters)


def test_sizing_replaces_flowers_waits_and_keeps_any_other(monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    monkeypatch.setattr(start_client_internal, "pull_objects", start_client_internal.pull_objects)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    waits = SupernodeWaits(idle_poll_s=0.25, reply_poll_s=0.01, object_backoff_s=0.03)
    size_supernode_waits(start_client_internal, waits)
    for flower_wait in (FLOWER_IDLE_POLL_S, FLOWER_REPLY_POLL_S, 7.0):
        start_client_internal.time.sleep(flower_wait)
    assert slept == [0.25, 0.01, 7.0]
    assert start_client_internal.pull_objects.func is inflatable_utils.pull_objects
    assert start_client_internal.pull_objects.keywords == {
        "initial_backoff": 0.03,
        "backoff_cap": waits.object_backoff_cap_s,
    }


def test_deployed_supernodes_start_through_the_sized_entry_point(tmp_path):
    command = supernode_command(
        superlink="127.0.0.1:9092",
        root_certificates=None,
        auth_private_key=None,
        node_config_file=tmp_path / "node.toml",
        clientapp_port=9200,
        insecure=True,
    )
    assert command[1:3] == ["-m", "fedllm.federation.supernode_process"]
