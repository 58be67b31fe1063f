"""The run id hospitals record in their ledgers: unique across researchers and servers.

A run directory's name (``quickstart``, ``x``) is chosen by its researcher and repeats across
researchers, servers and time; a hospital's ledger holds the runs of all of them, so its
history and its once-per-run releases (the noised data profile) must not confuse two runs of
the same name. The server draws a random suffix once per run (OS entropy), keeps it in the run
directory so a resumed run is still the same run to every hospital, and sends the result as
``run-id`` with every message.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fedllm.storage.files import create_exclusive

RUN_ID_FILE = "run-id"
SUFFIX_BYTES = 6


def ledger_run_id(run_dir: Path) -> str:
    """``<run dir name>-<12 hex digits>``, drawn on the run's first start, read back after."""
    path = Path(run_dir) / RUN_ID_FILE
    create_exclusive(path, f"{Path(run_dir).name}-{secrets.token_hex(SUFFIX_BYTES)}\n")
    return path.read_text(encoding="utf-8").strip()
