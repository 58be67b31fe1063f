"""Every command in README.md and docs/*.md is run by a test exactly as written.

The docs are collected here (fenced ```bash/```sh/```console blocks line by line, with `\\`
continuations and multi-line quoted `python -c "..."` snippets joined, shell comments stripped
where bash would strip them; untagged blocks that start with a command; ```python blocks). Each
command is either run below, in order, in a sandbox that looks like the repository root, or
listed in NOT_RUN_HERE with the test that runs it or its equivalent. A command that is neither
fails `test_every_documented_command_is_run_or_registered`, naming the file and line, so a new
doc command cannot land untested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from wheel_helpers import copy_checkout

from fedllm.config.schema import ModelConfig
from fedllm.models.checkpoints import publish_adapter
from fedllm.models.loading import load_lora_model

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *(f"docs/{path.name}" for path in sorted((REPO / "docs").glob("*.md")))]
SHELL_LANGUAGES = {"bash", "sh", "console", "shell"}
# An untagged block whose first line starts with one of these is a command, not a diagram.
COMMAND_STARTS = ("fedllm ", ".venv/", "python", "flwr ", "make ", "clients/", "export ", "pip ")
# What the sandbox takes from the repository (copied: a command must not change the checkout).
SANDBOX_COPIES = (
    "configs",
    "benchmarks",
    "examples",
    "clients",
    "strategies",
    "pyproject.toml",
    "setup.py",
)
PASSWORD = "docs test password"
COMMAND_TIMEOUT_S = 180
SERVER_TIMEOUT_S = 120


@dataclass(frozen=True)
class DocCommand:
    """One documented command: a shell command line (joined) or a whole python block."""

    doc: str
    line: int
    text: str
    kind: str  # "shell" or "python"
    block: int  # line of the opening fence
    expected: tuple[str, ...] = ()  # output the docs show right after the block ("prints `...`")

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _strip_shell_line(line: str, quote: str | None) -> tuple[str, str | None, bool]:
    """Cut a `# comment` where bash would (outside quotes, at the start of a word).

    Returns the kept text, the quote still open at the end of the line, and whether the line
    ends with a `\\` continuation outside quotes.
    """
    index = 0
    while index < len(line):
        char = line[index]
        if quote == "'":
            if char == "'":
                quote = None
        elif quote == '"':
            if char == "\\":
                index += 1
            elif char == '"':
                quote = None
        elif char == "\\":
            if index == len(line) - 1:
                return line[:index], None, True
            index += 1
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), None, False
        index += 1
    return (line if quote else line.rstrip()), quote, False


def _shell_commands(lines: list[tuple[int, str]], console: bool) -> list[tuple[int, str]]:
    """(first line, command) for each command of a shell block."""
    commands: list[tuple[int, str]] = []
    start, parts, quote, joining = 0, "", None, False
    for number, raw in lines:
        text = raw[2:] if console and raw.startswith("$ ") and not (parts or quote) else raw
        if joining:
            text = text.lstrip()
        kept, quote, continues = _strip_shell_line(text, quote)
        if not (parts or joining or quote) and not kept.strip():
            continue
        if not (parts or joining):
            start = number
        parts += kept
        if quote:
            parts += "\n"
        elif continues:  # bash drops `\`+newline; the whitespace around it separates words
            parts = parts.rstrip() + " " if kept[-1:].isspace() else parts
        else:
            commands.append((start, parts.strip()))
            parts = ""
        joining = continues
    assert not parts, f"unterminated command at line {start}: {parts!r}"
    return commands


def _expected_output(paragraph: str) -> tuple[str, ...]:
    """The `...` spans of a paragraph that starts "prints", up to the end of its sentence."""
    text = " ".join(paragraph.split())
    if not text.startswith("prints "):
        return ()
    sentence_end = text.find("`. ")
    sentence = text if sentence_end < 0 else text[: sentence_end + 1]
    return tuple(re.findall(r"`([^`]+)`", sentence))


def collect(doc: str) -> list[DocCommand]:
    """Every command of one document, in document order."""
    lines = (REPO / doc).read_text().splitlines()
    commands: list[DocCommand] = []
    index = 0
    while index < len(lines):
        fence = lines[index].strip()
        if not fence.startswith("```"):
            index += 1
            continue
        language = fence[3:].strip().lower()
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        body = [(number + 1, lines[number]) for number in range(index + 1, end)]
        after = end + 1
        while after < len(lines) and not lines[after].strip():
            after += 1
        paragraph_end = after
        while paragraph_end < len(lines) and lines[paragraph_end].strip():
            paragraph_end += 1
        expected = _expected_output("\n".join(lines[after:paragraph_end]))
        first = next((text.strip() for _, text in body if text.strip()), "")
        if language in SHELL_LANGUAGES or (not language and first.startswith(COMMAND_STARTS)):
            for line, text in _shell_commands(body, console=language == "console"):
                commands.append(DocCommand(doc, line, text, "shell", index + 1, expected))
        elif language == "python":
            text = "\n".join(text for _, text in body)
            commands.append(DocCommand(doc, index + 2, text, "python", index + 1, expected))
        index = end + 1
    return commands


def test_collector_joins_continuations_quotes_and_strips_comments_like_bash() -> None:
    block = [
        (1, "# a comment line"),
        (2, 'fedllm a --x "y # not a comment" \\'),
        (3, "    --z 'q' # comment"),
        (4, '.venv/bin/python -c "'),
        (5, "print('#', 1)  # kept: inside the quotes"),
        (6, '"'),
        (7, "echo a#b"),
    ]
    assert _shell_commands(block, console=False) == [
        (2, "fedllm a --x \"y # not a comment\" --z 'q'"),
        (4, ".venv/bin/python -c \"\nprint('#', 1)  # kept: inside the quotes\n\""),
        (7, "echo a#b"),
    ]
    assert _shell_commands([(1, "$ fedllm x"), (2, "output")], console=True)[0] == (1, "fedllm x")
    assert _expected_output("prints `a 1`, then `b`. So `c` is not") == ("a 1", "b")
    assert _expected_output("This prints `a`") == ()


# Commands that start a long job, need a SuperLink or the network, are a usage synopsis, or are
# already run exactly as written by another test: exact text -> the test that runs it or its
# equivalent (asserted to exist).
SYNOPSIS_TEST = "tests/test_docs_commands.py::test_usage_synopses_name_only_real_options"
FLWR_BLOCK_TEST = "tests/test_flwr_run.py::test_readme_flwr_run_block_runs_as_written"
NOT_RUN_HERE: dict[str, str] = {
    # Kubernetes (docs/deploy.md): need a cluster; the manifests, the secrets' layout and,
    # with kubectl installed, the secret commands (--dry-run=client) are checked here.
    (
        "fedllm certs init --out credentials --hospital st-mary --router-host "
        "fedllm-router.fedllm.svc --router-host router.consortium.example --node-host "
        "st-mary=fedllm-node.fedllm-st-mary.svc"
    ): ("tests/test_k8s_manifests.py::test_documented_secrets_are_exactly_what_the_pods_mount"),
    "kubectl apply -f deploy/k8s/router/namespace.yaml": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    (
        "kubectl -n fedllm create secret tls fedllm-router-tls "
        "--cert=credentials/router/server.crt --key=credentials/router/server.key"
    ): (
        "tests/test_k8s_manifests.py::test_documented_secret_commands_run_as_written_with_client_dry_run"
    ),
    (
        "kubectl -n fedllm create secret generic fedllm-router-keys "
        "--from-file=jwt_private.pem=credentials/router/jwt_private.pem "
        "--from-file=audit.key=credentials/router/audit.key"
    ): (
        "tests/test_k8s_manifests.py::test_documented_secret_commands_run_as_written_with_client_dry_run"
    ),
    (
        "kubectl -n fedllm create secret generic fedllm-router-node-client "
        "--from-file=ca.crt=credentials/ca/ca.crt "
        "--from-file=client.crt=credentials/router/client.crt "
        "--from-file=client.key=credentials/router/client.key"
    ): (
        "tests/test_k8s_manifests.py::test_documented_secret_commands_run_as_written_with_client_dry_run"
    ),
    (
        "kubectl -n fedllm create secret generic fedllm-router-database "
        "--from-file=ca.crt=postgres/ca.crt --from-file=tls.crt=postgres/fedllm_router.crt "
        "--from-file=tls.key=postgres/fedllm_router.key"
    ): (
        "tests/test_k8s_manifests.py::test_documented_secret_commands_run_as_written_with_client_dry_run"
    ),
    "kubectl apply -k deploy/k8s/router": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    "kubectl apply -f deploy/k8s/node/namespace.yaml": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    (
        "kubectl -n fedllm-st-mary create secret generic fedllm-node-tls "
        "--from-file=tls.crt=credentials/nodes/st-mary/server.crt "
        "--from-file=tls.key=credentials/nodes/st-mary/server.key "
        "--from-file=ca.crt=credentials/ca/ca.crt"
    ): (
        "tests/test_k8s_manifests.py::test_documented_secret_commands_run_as_written_with_client_dry_run"
    ),
    "kubectl apply -k deploy/k8s/node": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    "kubectl apply -k deploy/k8s/router-canary": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    "kubectl -n fedllm rollout status deployment/fedllm-router-canary --timeout=5m": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    "kubectl -n fedllm set image deployment/fedllm-router router=registry.example/fedllm:0.2.0": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    "kubectl -n fedllm rollout status deployment/fedllm-router --timeout=10m": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    "kubectl delete -k deploy/k8s/router-canary": (
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas"
    ),
    # Jaeger for viewing traces (docs/router.md, Tracing): docker is not available here; the
    # OTLP/HTTP export it receives is checked against a real loopback OTLP receiver.
    (
        "docker run --rm --name jaeger -e COLLECTOR_OTLP_ENABLED=true -p 16686:16686 "
        "-p 4318:4318 jaegertracing/all-in-one:1.76.0"
    ): "tests/test_tracing.py::test_otlp_endpoint_receives_router_and_node_spans",
    # `make` targets: their recipes are checked by test_make_targets_run_the_documented_commands;
    # the federation itself is run by the integration test, the suite by CI.
    "make run": "tests/test_docs_commands.py::test_make_targets_run_the_documented_commands",
    "make test": "tests/test_docs_commands.py::test_make_targets_run_the_documented_commands",
    # A full DP federation (minutes): the same `fedllm run` on a smaller config.
    ".venv/bin/fedllm run configs/default.yaml --set training.local_steps=20 "
    "--set run.name=longer": (
        "tests/test_integration_run.py::test_report_records_rounds_and_privacy"
    ),
    ".venv/bin/fedllm resume runs/quickstart": (
        "tests/test_integration_resume.py::test_interrupted_run_resumes_from_the_ledger"
    ),
    # Flower's CLI starts a local SuperLink on a fixed port and leaves it running: the README's
    # block is played as written, in order, by its own test.
    "source .venv/bin/activate": FLWR_BLOCK_TEST,
    "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1": FLWR_BLOCK_TEST,
    'flwr run . --stream -c "num-server-rounds=1 local-steps=5" --federation-config '
    '"num-supernodes=3"': FLWR_BLOCK_TEST,
    "flwr run . --stream -c \"config-file='configs/default.yaml' overrides='run.rounds=1; "
    "training.local_steps=3; run.name=flwr-overrides'\" --federation-config "
    '"num-supernodes=3"': FLWR_BLOCK_TEST,
    # A deployed federation (TLS SuperLink, SuperNodes, registered keys).
    "fedllm run configs/x.yaml --federation consortium --set run.rounds=5": (
        "tests/test_deployment.py::test_deployed_run_finishes_with_every_hospital_within_its_cap"
    ),
    "fedllm deliver runs/x --federation consortium": (
        "tests/test_deployment.py::"
        "test_fedllm_deliver_delivers_the_published_adapter_again_charging_nothing"
    ),
    # Usage synopses (optional arguments in brackets), not commands to paste: each option
    # is checked against the command's --help; the CLI itself is run by tests/test_selection.py
    # and above, and the benchmark (about 40 s even at small counts) by hand (docs/router.md).
    "fedllm select instance.json [--solver sqa-swap] [--seed 0] [--json]": SYNOPSIS_TEST,
    ".venv/bin/python benchmarks/router_overhead.py [--requests 2000] [--concurrency 64] "
    "[--throughput-requests 5000] [--consensus 20] [--no-tls]": SYNOPSIS_TEST,
    # The same server is started, exactly as README.md and docs/router.md write it, below.
    "fedllm serve --config configs/node.yaml": (
        "tests/test_docs_commands.py::test_doc_commands_run_as_written[docs/router.md]"
    ),
    # Run exactly as written, against a router-style audit log and key.
    "fedllm audit verify router-audit.jsonl --key-file credentials/router/audit.key": (
        "tests/test_security_cli.py::test_documented_audit_commands_run_as_written"
    ),
    "fedllm audit verify router-audit.jsonl --key-env FEDLLM_AUDIT_KEY --json": (
        "tests/test_security_cli.py::test_documented_audit_commands_run_as_written"
    ),
    "fedllm audit verify router-audit.jsonl.old --legacy": (
        "tests/test_security_cli.py::test_documented_audit_commands_run_as_written"
    ),
    "fedllm audit verify router-audit.jsonl --key-file credentials/router/audit.key --json "
    "| jq -r .head > anchored-head.txt": (
        "tests/test_security_cli.py::test_documented_audit_commands_run_as_written"
    ),
    "fedllm audit verify router-audit.jsonl --key-file credentials/router/audit.key "
    '--expected-head "$(cat anchored-head.txt)"': (
        "tests/test_security_cli.py::test_documented_audit_commands_run_as_written"
    ),
}

# kubectl needs a Kubernetes cluster: docs/deploy.md's kubectl lines are parsed and checked
# against the manifests (and run with --dry-run=client where kubectl is installed) there.
NOT_RUN_HERE_PATTERNS: list[tuple[str, str]] = [
    (
        r"^kubectl -n \S+ create secret ",
        "tests/test_k8s_manifests.py::"
        "test_documented_secret_commands_run_as_written_with_client_dry_run",
    ),
    (
        r"^kubectl (apply|delete) ",
        "tests/test_k8s_manifests.py::test_every_manifest_validates_against_the_kubernetes_schemas",
    ),
    (
        r"^kubectl -n \S+ (rollout status|set image) ",
        "tests/test_k8s_manifests.py::"
        "test_canary_differs_from_stable_only_in_name_track_image_and_replicas",
    ),
]

# Python blocks that are fragments of a larger program (they use names the surrounding text
# defines, or block forever): first line -> the test that runs the same calls.
PYTHON_FRAGMENTS: dict[str, str] = {
    'client = openai.OpenAI(base_url="https://router:8443/v1", api_key=access_token)': (
        "tests/test_serving_stack.py::test_openai_client_through_the_router_gets_a_free_answer"
    ),
    "from fedllm.serving.node.backends import ConstantBackend": (
        "tests/test_node_server.py::test_serve_node_serves_a_config_until_stopped"
    ),
}

# Documented system paths, which a test may not write: these commands run as written with each
# prefix moved under the sandbox (the directory is created first, as an operator would).
SYSTEM_PATHS = ("/etc/fedllm/", "/srv/fedllm/", "/var/lib/fedllm/", "/opt/fedllm/")

# Commands that start a server: run in the background until /v1/health answers, stopped after
# the document's last command; (health URL, a line the docs say it prints or None).
NODE_URL = "https://127.0.0.1:8081"
ROUTER_URL = "https://127.0.0.1:8443"
SERVERS: dict[str, tuple[str, str | None]] = {
    ".venv/bin/fedllm serve --config configs/node.yaml": (NODE_URL, None),
    "fedllm serve --config configs/node.yaml &": (NODE_URL, None),
    ".venv/bin/fedllm router --config configs/router.yaml": (
        ROUTER_URL,
        f"fedllm router listening on {ROUTER_URL}",
    ),
    "fedllm router --config configs/router.yaml": (
        ROUTER_URL,
        f"fedllm router listening on {ROUTER_URL}",  # "prints the listen URL"
    ),
}


def _keys_listed_not_leaked(sandbox: Path, output: str) -> None:
    """docs/credentials.md: `keys list` shows "key ids, never the keys"."""
    ring = json.loads((sandbox / "etc" / "fedllm" / "keys.json").read_text())
    assert ring["current"] in output
    assert not any(key in output for key in ring["keys"].values()), output


# What the docs say a command prints, next to it or in the sentence after its block.
DOCUMENTED_OUTPUT: dict[str, Callable[[Path, str], None]] = {
    "fedllm keys list --keys /etc/fedllm/keys.json": _keys_listed_not_leaked,
}
DOCUMENTED_TEXT: dict[str, tuple[str, ...]] = {
    # credentials.md: "prints them as a table with their modes and expiry dates"
    "fedllm certs init --out credentials --hospital h1 --hospital h2 --hospital h3 "
    "--superlink-host superlink.consortium.org --superlink-host 10.0.0.10 "
    "--router-host router.consortium.org --node-host h1=inference.h1.org "
    "--node-host h2=10.1.0.5 --days 365": ("credentials/ca/ca.key", "mode", "600", "expires"),
    # security.md: "table: role, department, failed logins, locked until"
    "fedllm users list": ("role", "department", "failed logins", "locked until", "alice"),
    "fedllm users list --json": ('"username": "alice"', '"department": "oncology"'),
    # deploy.md: the operator "announces the hash it prints (`base model sha256: ...`)"
    "fedllm model build --config configs/x.yaml --out /opt/fedllm/base-model": (
        "base model sha256: ",
    ),
}

# Commands whose effect is on the shell that runs the next ones.
CHANGES_ENVIRONMENT = ("export ", "source ", ". ")

# Commands that ask for a password ("asks twice, hidden"): what the user types.
TYPED_INPUT = f"{PASSWORD}\n{PASSWORD}\n"
# What a command the runner cannot run looks like: it must be in SERVERS or NOT_RUN_HERE.
CANNOT_RUN_UNREGISTERED = (
    r"\b(fedllm (serve|router|run|resume|deliver|superlink|hospital start)"
    r"|flwr run|make|pip install)\b"
)
PROMPTS_FOR_PASSWORD = re.compile(r"users add \S+ .*--role(?!.*--password-stdin)")


def _is_run_here(command: DocCommand) -> bool:
    if command.kind == "python":
        return command.text.splitlines()[0] not in PYTHON_FRAGMENTS
    return command.text not in NOT_RUN_HERE and _pattern_test(command.text) is None


def _pattern_test(text: str) -> str | None:
    return next((test for pattern, test in NOT_RUN_HERE_PATTERNS if re.search(pattern, text)), None)


def test_every_documented_command_is_run_or_registered() -> None:
    """Every command not registered is run by test_doc_commands_run_as_written, so only a
    command the runner cannot run (a server, a long job, the network) needs a decision: one
    that is neither in SERVERS nor in NOT_RUN_HERE fails here, naming its file and line."""
    commands = [command for doc in DOCS for command in collect(doc)]
    assert len(commands) > 40, "the collector found too few commands: is it broken?"
    texts = {command.text for command in commands}
    registered = [*NOT_RUN_HERE, *SERVERS, *DOCUMENTED_OUTPUT, *DOCUMENTED_TEXT]
    stale = [text for text in registered if text not in texts]
    assert not stale, f"registered commands no doc has any more: {stale}"
    first_lines = {c.text.splitlines()[0] for c in commands if c.kind == "python"}
    stale = [p for p, _ in NOT_RUN_HERE_PATTERNS if not any(re.search(p, t) for t in texts)]
    assert not stale, f"NOT_RUN_HERE_PATTERNS that match no documented command: {stale}"
    stale = [line for line in PYTHON_FRAGMENTS if line not in first_lines]
    assert not stale, f"PYTHON_FRAGMENTS lists blocks no doc has any more: {stale}"
    unregistered = [
        f"{c.where}: `{c.text}` starts a server, a long job or a download; run it in SERVERS "
        "or register it in NOT_RUN_HERE with the test that runs it (test file::name)"
        for c in commands
        if c.kind == "shell"
        and c.text not in SERVERS
        and _is_run_here(c)
        and re.search(CANNOT_RUN_UNREGISTERED, c.text)
    ]
    assert not unregistered, "\n".join(unregistered)
    assert all(c.doc in RUNNABLE_DOCS for c in commands if _is_run_here(c))


def test_registered_tests_exist() -> None:
    """Each registry entry names a test function that exists in a test file."""
    patterns = [test for _, test in NOT_RUN_HERE_PATTERNS]
    for target in [*NOT_RUN_HERE.values(), *PYTHON_FRAGMENTS.values(), *patterns]:
        path, name = target.split("::")
        function = name.split("[")[0]
        source = (REPO / path).read_text()
        assert re.search(rf"^def {re.escape(function)}\(", source, re.M), f"{target} not found"
        if "[" in name:
            parameter = name.split("[")[1].rstrip("]")
            assert parameter in DOCS, f"{target}: no such document"


def test_make_targets_run_the_documented_commands(tmp_path: Path) -> None:
    """`make run` and `make test` (README quick start) run `fedllm run` on the default config
    and ruff + pytest from .venv; checked with `make -n` on the real Makefile (set-up done)."""
    sandbox = _sandbox(tmp_path)
    shutil.copy(REPO / "Makefile", sandbox / "Makefile")
    outer_make_free_env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES"}
    }
    for target, recipe in [
        ("run", [".venv/bin/fedllm run configs/default.yaml"]),
        ("test", [".venv/bin/ruff check .", ".venv/bin/pytest -q"]),
    ]:
        # CI runs this suite under `make test`: a nested make would print "Entering directory".
        result = subprocess.run(
            ["make", "--no-print-directory", "-n", target],
            cwd=sandbox,
            env=outer_make_free_env,
            capture_output=True,
            text=True,
            check=True,
        )
        # Set-up steps come first when pyproject.toml is newer than the installed .venv.
        assert result.stdout.splitlines()[-len(recipe) :] == recipe, result.stdout


def test_usage_synopses_name_only_real_options(tmp_path: Path) -> None:
    """A documented synopsis `CMD [--opt value] ...`: CMD --help exits 0 and lists every option."""
    sandbox = _sandbox(tmp_path)
    synopses = [text for text, test in NOT_RUN_HERE.items() if test == SYNOPSIS_TEST]
    assert len(synopses) == 2
    for synopsis in synopses:
        command = synopsis.split(" [", 1)[0]
        result = subprocess.run(
            ["bash", "-c", f"{command} --help"],
            cwd=sandbox,
            env=_environment(sandbox),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stderr
        for option in re.findall(r"\[(--[a-z-]+)", synopsis):
            assert option in result.stdout, f"{synopsis}: {option} is not in `{command} --help`"


def _sandbox(root: Path) -> Path:
    """A directory that looks like the repository root to a documented command."""
    sandbox = copy_checkout(SANDBOX_COPIES, root / "repo")
    (sandbox / ".venv").symlink_to(REPO / ".venv")
    # The documented set-up: `make` has created and installed .venv.
    assert (sandbox / ".venv" / ".installed").exists(), ".venv is not set up: run `make setup`"
    return sandbox


def _environment(sandbox: Path) -> dict[str, str]:
    """The user's shell: the venv on PATH (docs write bare `fedllm` too), no fedllm settings
    from this machine, ledgers under the sandbox, wide undecorated output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDLLM_")}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"
    env["FEDLLM_LEDGER_DIR"] = str(sandbox / "ledgers")
    env["FEDLLM_LOG_LEVEL"] = "WARNING"
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    env["PASSWORD"] = PASSWORD  # docs/security.md pipes "$PASSWORD" for scripts
    return env


def _relocate(text: str, sandbox: Path) -> str:
    for prefix in SYSTEM_PATHS:
        if prefix in text:
            moved = sandbox / prefix.strip("/")
            moved.mkdir(parents=True, exist_ok=True)
            text = text.replace(prefix, f"{moved}/")
    return text


def _instance(sandbox: Path) -> None:
    """instance.json in the format docs/selection.md documents (6 hospitals, K = 3)."""
    similarity = [
        [0.0 if i == j else round(0.1 * ((i * j) % 5), 2) for j in range(6)] for i in range(6)
    ]
    instance = {"k": 3, "lambda": 0.5, "utility": [5, 3, 4, 1, 2, 6], "similarity": similarity}
    (sandbox / "instance.json").write_text(json.dumps(instance))


def _published_adapter(sandbox: Path) -> None:
    """What the quick start's `make run` leaves for the node: a DP adapter of configs/node.yaml's
    base model in runs/published-adapter, with its DP record."""
    model_config = ModelConfig.model_validate({"name": "tiny"})
    model = load_lora_model(model_config, torch.device("cpu"), seed=3)
    publish_adapter(
        model,
        sandbox / "runs" / "published-adapter",
        run_id="docs",
        privacy={
            "enabled": True,
            "delta": 1e-5,
            "accountant": "pld",
            "unit": "patient",
            "neighbouring": "replace-one",
            "hospitals": {
                "st-mary": {"epsilon": 8.0, "epsilon_cap": 10.0, "epsilon_confirmed": True}
            },
        },
        model_config=model_config,
        keyring=None,  # the docs' commands run without FEDLLM_ENCRYPTION_* set
    )


def _plaintext_adapter(sandbox: Path) -> None:
    """docs/credentials.md encrypts a run's adapter file."""
    path = sandbox / "runs" / "site-a" / "checkpoint" / "adapter.pt"
    path.parent.mkdir(parents=True)
    torch.save({"lora_A": torch.ones(2, 2)}, path)


def _experiment(sandbox: Path) -> None:
    """docs/deploy.md's researcher experiment, configs/x.yaml: the default one."""
    shutil.copy(sandbox / "configs" / "default.yaml", sandbox / "configs" / "x.yaml")


def _built_base_model(sandbox: Path) -> None:
    """docs/serving.md verifies the base model the operator built (docs/deploy.md) and copied."""
    out = sandbox / "opt" / "fedllm" / "base-model"
    if not out.exists():
        subprocess.run(
            [
                ".venv/bin/fedllm",
                "model",
                "build",
                "--config",
                "configs/default.yaml",
                "--out",
                out,
            ],
            cwd=sandbox,
            env=_environment(sandbox),
            capture_output=True,
            check=True,
            timeout=COMMAND_TIMEOUT_S,
        )


def _adapter_store(sandbox: Path) -> None:
    """docs/credentials.md rotates the hospital's adapter directory too: it exists."""
    (sandbox / "srv" / "fedllm" / "adapters").mkdir(parents=True, exist_ok=True)


# Documented preconditions, set up right before the command (its exact text, or for a python
# block one of its lines).
PRECONDITIONS: dict[str, Callable[[Path], None]] = {
    ".venv/bin/fedllm select instance.json --solver sqa-swap --json": _instance,
    "fedllm model build --config configs/x.yaml --out /opt/fedllm/base-model": _experiment,
    "fedllm model verify /opt/fedllm/base-model": _built_base_model,
    "fedllm keys rotate --keys /etc/fedllm/keys.json runs/ /srv/fedllm/adapters/": _adapter_store,
    "from fedllm.selection import load_instance, solve": _instance,
    ".venv/bin/fedllm serve --config configs/node.yaml": _published_adapter,
    "fedllm serve --config configs/node.yaml &": _published_adapter,
    "fedllm keys encrypt runs/site-a/checkpoint/adapter.pt --keys /etc/fedllm/keys.json": (
        _plaintext_adapter
    ),
}


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def _server(text: str, sandbox: Path, env: dict[str, str]) -> Iterator[Path]:
    """A documented server command in its own process group, until /v1/health answers."""
    url, printed = SERVERS[text]
    port = int(url.rsplit(":", 1)[1])
    assert _port_free(port), f"port {port} is taken: `{text}` binds it as documented"
    log = sandbox / f"server-{port}.log"
    process = subprocess.Popen(
        ["bash", "-c", text],
        cwd=sandbox,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        credentials = sandbox / "credentials"
        verify = _client_context(credentials)
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while True:
            if not text.endswith("&"):
                assert process.poll() is None, f"`{text}` exited:\n{log.read_text()[-3000:]}"
            try:
                reply = httpx.get(f"{url}/v1/health", verify=verify, timeout=3)
                if reply.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"`{text}` never healthy:\n{log.read_text()}"
            time.sleep(0.5)
        if printed is not None:
            assert printed in log.read_text(), log.read_text()
        yield log
    finally:
        _stop_group(process, port)


def _client_context(credentials: Path) -> ssl.SSLContext:
    """Trust the consortium CA and present the router's client certificate (nodes want mTLS)."""
    context = ssl.create_default_context(cafile=str(credentials / "ca" / "ca.crt"))
    router = credentials / "router"
    context.load_cert_chain(str(router / "client.crt"), str(router / "client.key"))
    return context


def _stop_group(process: subprocess.Popen, port: int) -> None:
    """SIGTERM the whole process group (a `&` server outlives its shell), then SIGKILL."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while not _port_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=15)
    assert _port_free(port), f"port {port} still bound after its server was stopped"


def _token(sandbox: Path) -> str:
    """An access token from POST /v1/auth/token, as README.md's python snippet says."""
    reply = httpx.post(
        f"{ROUTER_URL}/v1/auth/token",
        json={"username": "dr-grey", "password": PASSWORD},
        verify=ssl.create_default_context(cafile=str(sandbox / "credentials" / "ca" / "ca.crt")),
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["access_token"]


def _run(command: DocCommand, sandbox: Path, env: dict[str, str]) -> str:
    """Run one command exactly as written (system paths moved, documented input typed)."""
    if command.kind == "python":
        preamble = f"token = {_token(sandbox)!r}\n" if "api_key=token" in command.text else ""
        args = [str(sandbox / ".venv" / "bin" / "python"), "-c", preamble + command.text]
        typed = None
    else:
        args = ["bash", "-o", "pipefail", "-c", _relocate(command.text, sandbox)]
        typed = TYPED_INPUT if PROMPTS_FOR_PASSWORD.search(command.text) else None
        if command.text.startswith(CHANGES_ENVIRONMENT):
            args[-1] += "\nenv -0"
    result = subprocess.run(
        args,
        cwd=sandbox,
        env=env,
        input=typed,
        stdin=None if typed is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        start_new_session=True,  # no terminal: a hidden prompt reads what is typed on stdin
    )
    assert result.returncode == 0, (
        f"{command.where}: `{command.text}` exited {result.returncode}\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    if command.text.startswith(CHANGES_ENVIRONMENT):
        env.clear()
        env.update(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
        return ""
    return result.stdout


RUNNABLE_DOCS = [doc for doc in DOCS if any(_is_run_here(c) for c in collect(doc))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("doc", RUNNABLE_DOCS)
def test_doc_commands_run_as_written(doc: str, tmp_path: Path) -> None:
    """The document's commands in order, in one sandbox: exit 0 and the output the docs show;
    servers are started and answer /v1/health, and stay up for the commands after them."""
    sandbox = _sandbox(tmp_path)
    env = _environment(sandbox)
    outputs: dict[int, str] = {}
    commands = [command for command in collect(doc) if _is_run_here(command)]
    with ExitStack() as servers:
        for command in commands:
            keys = [command.text] if command.kind == "shell" else command.text.splitlines()
            for key in keys:
                if key in PRECONDITIONS:
                    PRECONDITIONS[key](sandbox)
            if command.text in SERVERS:
                servers.enter_context(_server(command.text, sandbox, env))
                continue
            output = _run(command, sandbox, env)
            for shown in DOCUMENTED_TEXT.get(command.text, ()):
                assert shown in output, f"{command.where}: no {shown!r} in its output:\n{output}"
            if command.text in DOCUMENTED_OUTPUT:
                DOCUMENTED_OUTPUT[command.text](sandbox, output)
            outputs[command.block] = outputs.get(command.block, "") + output
    for command in commands:
        for shown in command.expected:
            assert shown in outputs.get(command.block, ""), (
                f"{command.where}: the docs say it prints {shown!r}; it printed:\n"
                f"{outputs.get(command.block, '')}"
            )
