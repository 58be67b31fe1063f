"""Allocating ``<output_dir>/<name>/`` without ever overwriting an earlier run."""

from __future__ import annotations

from pathlib import Path


def allocate_run_dir(output_dir: str | Path, name: str) -> Path:
    """Create and return ``name``, or ``name-2``, ``name-3``... if earlier runs hold those.

    ``mkdir(exist_ok=False)`` makes the claim atomic, so two runs started at once never share
    a directory.
    """
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    attempt = 1
    while True:
        candidate = root / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            attempt += 1
            continue
        return candidate
