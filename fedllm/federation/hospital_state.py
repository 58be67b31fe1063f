"""Where a simulated hospital keeps what must outlive one run: its ledger and its split key.

A privacy budget belongs to a dataset, not to a run: running ten experiments on the same
records spends ten times. So a simulated hospital whose records come from a file or a hub
dataset keeps its ledger and its split key under ``privacy.ledger_dir`` in a directory named
by the dataset's *content* identity, and every later run on the same records finds and
composes them. Synthetic data is generated afresh from ``run.seed`` by the run itself (it is
public to whoever has the config), so its hospitals start fresh ledgers in the run directory.

Simulated hospitals split one shared dataset between them; a different partitioning (seed,
α, number or names of hospitals) would move patients from one hospital's ledger to another's
and let a patient's budget restart. The partitioning is therefore recorded next to the ledgers
on first use, and a run that partitions the same dataset differently is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedllm.config.schema import ExperimentConfig
from fedllm.storage.files import create_exclusive

LEDGER_DIR_ENV = "FEDLLM_LEDGER_DIR"
SPLIT_KEY_BYTES = 32
PARTITION_FILE = "partition.json"


class LedgerLocationError(ValueError):
    """A run would compose a dataset's budget wrongly (e.g. a changed partitioning)."""


def default_ledger_root() -> Path:
    """``$FEDLLM_LEDGER_DIR``, else the per-user data directory."""
    configured = os.environ.get(LEDGER_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "fedllm" / "ledgers"


@dataclass(frozen=True)
class HospitalState:
    """A hospital's state directory and how long it lives (``run`` or ``dataset``)."""

    directory: Path
    scope: Literal["run", "dataset"]
    dataset_id: str | None = None

    @property
    def ledger_url(self) -> str:
        """The SQLite ledger inside the state directory."""
        return f"sqlite:///{self.directory / 'ledger.db'}"


def load_or_create_key(path: Path) -> bytes:
    """The secret key at ``path``, created (0600, from OS entropy) on first use."""
    if not path.exists():
        create_exclusive(path, secrets.token_hex(SPLIT_KEY_BYTES) + "\n")
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    text = path.read_text(encoding="ascii").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError as error:
        raise LedgerLocationError(f"{path}: not a hex key ({error})") from error
    if len(key) < 16:
        raise LedgerLocationError(f"{path}: a split key must hold at least 128 bits")
    return key


def synthetic_split_key(config: ExperimentConfig, index: int) -> bytes:
    """The split key of a synthetic hospital: derived from the public seed that made its data."""
    return hashlib.sha256(f"fedllm-synthetic-split/{config.run.seed}/{index}".encode()).digest()


def partition_identity(config: ExperimentConfig) -> dict[str, object]:
    """What decides which patients each simulated hospital of a shared dataset holds."""
    data = config.data
    return {
        "hospitals": [profile.name for profile in config.federation.profiles()],
        "partition": data.partition,
        "dirichlet_alpha": data.dirichlet_alpha if data.partition == "dirichlet" else None,
        "seed": config.run.seed,
    }


def check_partition(dataset_dir: Path, config: ExperimentConfig) -> None:
    """Record the partitioning on first use; refuse a run that partitions differently."""
    wanted = partition_identity(config)
    path = dataset_dir / PARTITION_FILE
    if create_exclusive(path, json.dumps(wanted, indent=2)):
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if recorded != wanted:
        changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
        raise LedgerLocationError(
            f"the ledgers of this dataset ({dataset_dir}) were charged with the records "
            f"partitioned by {recorded}; this config changes {', '.join(changed)}, which "
            "would move patients between hospital ledgers and restart their budgets. Keep "
            "the partitioning, or set privacy.ledger_dir to a new location only for data "
            "whose earlier releases you account for elsewhere"
        )


def simulation_state(
    config: ExperimentConfig, index: int, run_dir: str | Path, dataset_id: str | None
) -> HospitalState:
    """The state directory of simulated hospital ``index``.

    ``dataset_id`` is the content identity of the shared records (None for synthetic data).
    """
    name = config.federation.profiles()[index].name
    if dataset_id is None:
        return HospitalState(Path(run_dir) / "hospitals" / name, "run")
    root = Path(config.privacy.ledger_dir).expanduser() if config.privacy.ledger_dir else None
    dataset_dir = (root or default_ledger_root()) / dataset_id
    if config.privacy.enabled:
        check_partition(dataset_dir, config)
    return HospitalState(dataset_dir / name, "dataset", dataset_id)
