"""The operator's node registry: a hospital's name is bound to its registered SuperNode key and
node id, and a node claiming another hospital's name (or unknown to the registry) is refused in
one line. Real keys from the project's CA code, real files, a real SuperLink database table."""

from __future__ import annotations

import sqlite3
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from fedllm.federation.node_registry import (
    REGISTRY_ENV,
    NodeRegistry,
    RegistryError,
    claim_refusal,
    key_fingerprint,
    node_id_in_superlink_db,
    registry_from_environment,
)
from fedllm.security.certs import init_credentials


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    creds = init_credentials(
        tmp_path_factory.mktemp("registry") / "credentials", hospitals=["north", "south", "west"]
    )
    return {name: public for name, (_, public) in creds.supernode_keys.items()}


def test_a_registered_node_may_claim_its_own_name_only(tmp_path, keys):
    registry = NodeRegistry.load(tmp_path / "node-registry.json")
    registry.record("north", keys["north"], 101)
    registry.record("south", keys["south"], 202)
    assert claim_refusal(registry, 101, "north") is None
    reason = claim_refusal(registry, 202, "north")
    assert reason == (
        "node 202 claims hospital 'north' but its registered key belongs to 'south' "
        f"(node registry {tmp_path / 'node-registry.json'})"
    )


def test_a_node_the_registry_does_not_know_is_refused(tmp_path, keys):
    registry = NodeRegistry.load(tmp_path / "node-registry.json")
    registry.record("north", keys["north"], 101)
    reason = claim_refusal(registry, 999, "north")
    assert reason is not None
    assert reason.startswith("node 999 claims hospital 'north' but is not in the operator's")
    assert "\n" not in reason


def test_the_registry_survives_a_restart_and_is_private(tmp_path, keys):
    path = tmp_path / "state" / "node-registry.json"
    NodeRegistry.load(path).record("north", keys["north"], 101)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reloaded = NodeRegistry.load(path)
    assert reloaded.hospital_of(101) == "north"
    assert reloaded.entries["north"].key_sha256 == key_fingerprint(keys["north"])
    # registering the same key again without a node id ("already registered") keeps the id
    reloaded.record("north", keys["north"], None)
    assert NodeRegistry.load(path).hospital_of(101) == "north"


def test_one_key_cannot_belong_to_two_hospitals(tmp_path, keys):
    registry = NodeRegistry.load(tmp_path / "node-registry.json")
    registry.record("north", keys["north"], 101)
    with pytest.raises(RegistryError, match="already registered as hospital 'north'"):
        registry.record("south", keys["north"], 202)
    with pytest.raises(RegistryError, match="node 101 is already hospital 'north'"):
        registry.record("south", keys["south"], 101)


def test_a_rotated_key_replaces_the_old_node(tmp_path, keys):
    registry = NodeRegistry.load(tmp_path / "node-registry.json")
    registry.record("north", keys["north"], 101)
    registry.record("north", keys["west"], 303)  # north's new key
    assert claim_refusal(registry, 303, "north") is None
    assert claim_refusal(registry, 101, "north") is not None


def test_the_servers_registry_comes_from_the_environment(tmp_path, keys):
    assert registry_from_environment({}) is None
    missing = tmp_path / "gone.json"
    with pytest.raises(RegistryError, match="does not exist"):
        registry_from_environment({REGISTRY_ENV: str(missing)})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(RegistryError, match="unreadable"):
        registry_from_environment({REGISTRY_ENV: str(broken)})
    path = tmp_path / "node-registry.json"
    NodeRegistry.load(path).record("north", keys["north"], 101)
    registry = registry_from_environment({REGISTRY_ENV: str(path)})
    assert registry is not None
    assert registry.hospital_of(101) == "north"


def test_the_node_id_of_an_already_registered_key_is_read_from_the_superlink_db(tmp_path, keys):
    database = tmp_path / "superlink.db"
    pem = serialization.load_ssh_public_key(keys["south"].read_bytes()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with sqlite3.connect(database) as connection:  # Flower's own `node` table, as 1.42 keeps it
        connection.execute("CREATE TABLE node (node_id INTEGER, status TEXT, public_key BLOB)")
        connection.execute("INSERT INTO node VALUES (7, 'unregistered', ?)", (pem,))
        connection.execute("INSERT INTO node VALUES (-8, 'online', ?)", (pem,))
    connection.close()
    # Flower stores the unsigned 64-bit id as a signed integer: -8 is 2**64 - 8
    assert node_id_in_superlink_db(database, keys["south"]) == 2**64 - 8
    assert node_id_in_superlink_db(database, keys["north"]) is None
    assert node_id_in_superlink_db(tmp_path / "absent.db", keys["north"]) is None
