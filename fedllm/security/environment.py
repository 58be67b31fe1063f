"""Where encryption keys enter a process: its environment, read once by its entry point.

Ledgers and checkpoint code never read the environment; they take a key ring source as an
argument. Each entry point (the CLI commands, `fedllm serve` among them, the ServerApp, and
the ClientApp, whose handlers the warm worker also runs) calls `keyring_from_environment` once
and passes the result down, so a test or an embedding program hands keys in instead of setting
variables. The import-linter contract ``keys-enter-at-the-edge`` (pyproject.toml) lets only
fedllm.cli, strategies and clients import this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from fedllm.security.encryption import EncryptionError, KeyFile, KeyRing, KeyRingSource

ENV_VAR = "FEDLLM_ENCRYPTION_KEYS"
FILE_ENV_VAR = "FEDLLM_ENCRYPTION_KEY_FILE"


def keyring_from_environment(environ: Mapping[str, str] | None = None) -> KeyRingSource | None:
    """The process's key ring source: ``$FEDLLM_ENCRYPTION_KEYS``, else the key file named by
    ``$FEDLLM_ENCRYPTION_KEY_FILE``, else ``None`` (encryption at rest off).

    The key file is returned as a `KeyFile`, re-read when it is replaced, so a long-running
    process picks up `fedllm keys rotate` without a restart. It is read once here as well: a
    missing or malformed key file stops the process at start, before anything is written.
    """
    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR)
    if text:
        return KeyRing.from_text(text, source=f"${ENV_VAR}")
    path = env.get(FILE_ENV_VAR)
    if path:
        source = KeyFile(Path(path), label=f"${FILE_ENV_VAR}")
        source()
        return source
    return None


def keyring_from_variable(var: str = ENV_VAR, environ: Mapping[str, str] | None = None) -> KeyRing:
    """The key ring held by the environment variable ``var`` (for containers and secret
    managers); `fedllm keys` falls back to it when ``--keys`` is not given."""
    text = (os.environ if environ is None else environ).get(var)
    if not text:
        raise EncryptionError(f"environment variable {var} is not set")
    return KeyRing.from_text(text, source=f"${var}")
