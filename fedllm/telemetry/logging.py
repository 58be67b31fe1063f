"""Structured logging for library code: JSON lines to stderr, or readable lines on a terminal."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import structlog


def quiet_third_party_output() -> None:
    """Silence download-style progress bars and deprecation chatter from ML libraries.

    fedllm reports its own progress; the libraries' bars and FutureWarnings only bury it.
    """
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Both libraries read these variables when imported. Only copies imported before this call
    # need telling directly: importing transformers here would cost every command 0.5 s.
    if "transformers" in sys.modules or "huggingface_hub" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


def configure_logging(level: str | None = None, json_output: bool | None = None) -> None:
    """Set structlog up once per process; ``FEDLLM_LOG_LEVEL`` / ``FEDLLM_LOG_JSON`` override."""
    quiet_third_party_output()
    level_name = (level or os.environ.get("FEDLLM_LOG_LEVEL", "INFO")).upper()
    if json_output is None:
        json_output = os.environ.get("FEDLLM_LOG_JSON", "0") == "1" or not sys.stderr.isatty()
    renderer = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
