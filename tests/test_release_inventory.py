"""The release inventory: docs/privacy.md and the code list the same keys, and it is enforced."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedllm.privacy.inventory import (
    RELEASE_INVENTORY,
    UndeclaredReleaseError,
    check_reply,
    undeclared,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"
ROW = re.compile(r"^\| (\w+) \| `([\w-]+)\.([\w*-]+)` \| (dp|public) \| (.+) \|$")


def documented_inventory() -> set[tuple[str, str, str, str]]:
    """(message, record, key, kind) of every row of the table in docs/privacy.md."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- release-inventory:start -->")[1].split("<!-- release-inventory:end")[0]
    rows = set()
    for line in table.strip().splitlines()[2:]:
        match = ROW.match(line)
        assert match, f"malformed inventory row in docs/privacy.md: {line!r}"
        rows.add(match.groups()[:4])
    return rows


def test_docs_and_code_list_the_same_releases():
    code = {(e.message, e.record, e.key, e.kind) for e in RELEASE_INVENTORY}
    assert documented_inventory() == code
    assert len(code) == len(RELEASE_INVENTORY)  # no key listed twice


def test_exact_losses_and_timings_are_not_in_the_inventory():
    keys = {e.key for e in RELEASE_INVENTORY}
    assert not {"train-loss", "train-seconds", "eval-tokens"} & keys
    dp = {e.key for e in RELEASE_INVENTORY if e.kind == "dp"}
    assert dp == {"profile", "*", "utility-square-loss-sum", "eval-loss-sum"}


def test_a_reply_with_an_undeclared_key_is_refused():
    assert (
        undeclared("train", {"arrays": ["a.weight", "b.weight"], "metrics": ["num-examples"]}) == []
    )
    with pytest.raises(UndeclaredReleaseError, match=r"metrics\.train-loss"):
        check_reply("train", {"metrics": ["num-examples", "train-loss"]})
    with pytest.raises(UndeclaredReleaseError, match=r"status\.num-units"):
        check_reply("evaluate", {"status": ["num-units"]})
