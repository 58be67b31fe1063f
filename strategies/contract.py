"""Whether a configured strategy class fits the plumbing, checked before anything is spent.

``fedllm run`` and the ServerApp call this right after ``fedllm.federation.preflight`` (the
contract is the strategies' own, so it lives with them): a class that cannot be imported, does
not subclass :class:`PrivacyAwareStrategy`, or overrides a hook with the wrong signature is one
:class:`PreflightError` naming ``strategy.strategy_class``, before any hospital is asked
anything.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedllm.federation.preflight import PreflightError, one_line

# Hooks a strategy subclass may override, with the arguments the plumbing passes them.
STRATEGY_HOOKS = ("is_eligible", "utility", "redundancy", "solve_cohort", "aggregation_weights")


def check_strategy_class(spec: str, app_root: Path) -> None:
    """``package.module:Class`` imports (as the ServerApp imports it) and fits the plumbing.

    The class must subclass ``PrivacyAwareStrategy``; its ``from_config`` and constructor must
    take what the ServerApp passes, and each overridden hook must accept the arguments the
    plumbing gives.
    """
    key = "strategy.strategy_class"
    module_name, _, class_name = spec.partition(":")
    try:
        with _importable_from(app_root):
            module = importlib.import_module(module_name)
    except Exception as error:  # a user's module may fail on import in any way
        raise PreflightError(
            key,
            spec,
            f"an importable module {module_name!r} ({type(error).__name__}: {one_line(error)})",
        ) from None
    # imported here, not at the top: `fedllm run --help` must not load torch and Flower
    from fedllm.strategies.privacy_aware import PrivacyAwareStrategy
    from fedllm.strategies.settings import strategy_keywords

    strategy_class = getattr(module, class_name, None)
    if strategy_class is None:
        raise PreflightError(key, spec, f"a class {class_name!r} in module {module_name!r}")
    if not (isinstance(strategy_class, type) and issubclass(strategy_class, PrivacyAwareStrategy)):
        raise PreflightError(
            key, spec, "a subclass of fedllm.strategies.privacy_aware:PrivacyAwareStrategy"
        )
    # the ServerApp calls `from_config`, which calls the constructor with every keyword the
    # built-in one takes: an override of either must still accept them
    builder = inspect.signature(strategy_class.from_config)
    if not _accepts(builder, ("config",), ("recorder", "run_context", "round_offset")):
        raise PreflightError(
            key,
            spec,
            f"a classmethod from_config(config, *, recorder, run_context, round_offset), "
            f"got from_config{builder}",
        )
    constructor = inspect.signature(strategy_class)
    keywords = strategy_keywords()
    if not _accepts(constructor, (), keywords):
        raise PreflightError(
            key,
            spec,
            f"a constructor accepting the keywords ({', '.join(keywords)}), "
            f"got {class_name}{constructor}",
        )
    for hook in STRATEGY_HOOKS:
        override = getattr(strategy_class, hook)
        if override is getattr(PrivacyAwareStrategy, hook):
            continue
        base = inspect.signature(getattr(PrivacyAwareStrategy, hook))
        positional = tuple(base.parameters)[1:]
        signature = inspect.signature(override)
        if not callable(override) or not _accepts(signature, ("self", *positional), ()):
            raise PreflightError(
                key,
                spec,
                f"hook {hook}{base} (as PrivacyAwareStrategy defines it), got {hook}{signature}",
            )


def _accepts(
    signature: inspect.Signature, positional: tuple[str, ...], named: tuple[str, ...]
) -> bool:
    """Whether a callable with ``signature`` can be called with these arguments."""
    try:
        signature.bind(*positional, **dict.fromkeys(named))
    except TypeError:
        return False
    return True


@contextmanager
def _importable_from(app_root: Path) -> Iterator[None]:
    """Import as Flower runs the app: with the app's directory first on ``sys.path``.

    (Third-party packages can shadow an app's top-level names otherwise: opacus installs a
    package called ``examples``.)
    """
    root = str(app_root)
    sys.path.insert(0, root)
    try:
        yield
    finally:
        sys.path.remove(root)
