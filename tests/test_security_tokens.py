"""JWT issuing and strict verification: every forgery and misuse is refused with its reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedllm.security.tokens import (
    KeyLoadError,
    Principal,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    TrustedIssuer,
    generate_ed25519_keypair,
    load_private_key_pem,
    load_public_key_pem,
)
from fedllm.security.users import Role, User

ISSUER = "fedllm-router"
AUDIENCE = "fedllm-serving"
ALICE = User("alice", Role.CLINICIAN, "cardiology")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade_token(header: dict, payload: dict, signature: bytes = b"") -> str:
    """A JWT built without PyJWT, which refuses to produce the malicious ones."""
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(signature),
        ]
    )


def claims(**overrides: object) -> dict:
    now = int(time.time())
    base = {
        "sub": "alice",
        "role": "clinician",
        "dept": "cardiology",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_ed25519_keypair()


@pytest.fixture(scope="module")
def rsa_private_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def issuer(keys: tuple[bytes, bytes]) -> TokenIssuer:
    return TokenIssuer(keys[0], issuer=ISSUER, audience=AUDIENCE, ttl_s=600, key_id="k1")


@pytest.fixture
def verifier(keys: tuple[bytes, bytes]) -> TokenVerifier:
    return TokenVerifier([TrustedIssuer(ISSUER, keys[1], ("EdDSA",))], audience=AUDIENCE)


def reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(TokenError) as error:
        verifier.verify(token)
    return error.value.reason


def test_issued_token_round_trips(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.issue(ALICE)
    principal = verifier.verify(token)
    assert principal == Principal(
        "alice", Role.CLINICIAN, "cardiology", ISSUER, principal.expires_at
    )
    assert principal.expires_at == pytest.approx(time.time() + 600, abs=5)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == "k1"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert {"sub", "role", "dept", "iss", "aud", "iat", "nbf", "exp", "jti"} <= set(payload)
    assert (
        payload["jti"]
        != jwt.decode(issuer.issue(ALICE), options={"verify_signature": False})["jti"]
    )


def test_forged_signature_is_refused(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    attacker_private, _ = generate_ed25519_keypair()
    forged = TokenIssuer(attacker_private, issuer=ISSUER, audience=AUDIENCE).issue(ALICE)
    assert reason(verifier, forged) == "bad signature"

    head, payload, signature = issuer.issue(ALICE).split(".")
    admin = json.loads(base64.urlsafe_b64decode(payload + "=="))
    admin["role"] = "admin"
    tampered = ".".join([head, b64url(json.dumps(admin).encode()), signature])
    assert reason(verifier, tampered) == "bad signature"


def test_expired_and_not_yet_valid(keys: tuple[bytes, bytes], verifier: TokenVerifier) -> None:
    past = TokenIssuer(
        keys[0], issuer=ISSUER, audience=AUDIENCE, ttl_s=60, clock=lambda: time.time() - 3600
    )
    future = TokenIssuer(
        keys[0], issuer=ISSUER, audience=AUDIENCE, ttl_s=60, clock=lambda: time.time() + 3600
    )
    assert reason(verifier, past.issue(ALICE)) == "expired"
    assert reason(verifier, future.issue(ALICE)) == "not yet valid"


def test_leeway_tolerates_small_clock_skew(keys: tuple[bytes, bytes]) -> None:
    skewed = TokenIssuer(
        keys[0], issuer=ISSUER, audience=AUDIENCE, clock=lambda: time.time() + 3
    ).issue(ALICE)
    lenient = TokenVerifier([TrustedIssuer(ISSUER, keys[1])], audience=AUDIENCE, leeway_s=10)
    strict = TokenVerifier([TrustedIssuer(ISSUER, keys[1])], audience=AUDIENCE, leeway_s=0)
    assert lenient.verify(skewed).subject == "alice"
    assert reason(strict, skewed) == "not yet valid"


def test_wrong_audience(keys: tuple[bytes, bytes], verifier: TokenVerifier) -> None:
    other = TokenIssuer(keys[0], issuer=ISSUER, audience="another-service").issue(ALICE)
    assert reason(verifier, other) == "wrong audience"


def test_unknown_issuer_even_with_a_valid_signature(
    keys: tuple[bytes, bytes], verifier: TokenVerifier
) -> None:
    stranger = TokenIssuer(keys[0], issuer="somebody-else", audience=AUDIENCE).issue(ALICE)
    assert reason(verifier, stranger) == "unknown issuer"


def test_external_issuers_each_use_their_own_key(
    keys: tuple[bytes, bytes], rsa_private_pem: bytes
) -> None:
    hospital = TokenIssuer(
        rsa_private_pem, algorithm="RS256", issuer="hospital-a-idp", audience=AUDIENCE
    )
    ours = TokenIssuer(keys[0], issuer=ISSUER, audience=AUDIENCE)
    verifier = TokenVerifier([ours.trusted(), hospital.trusted()], audience=AUDIENCE)
    assert verifier.verify(hospital.issue(ALICE)).issuer == "hospital-a-idp"
    assert verifier.verify(ours.issue(ALICE)).issuer == ISSUER
    # Our key signing a token that claims to come from the hospital's IdP: wrong key for it.
    impostor = TokenIssuer(keys[0], issuer="hospital-a-idp", audience=AUDIENCE).issue(ALICE)
    assert reason(verifier, impostor) == "algorithm not allowed"
    b_key, other_ec_key = (
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for _ in range(2)
    )
    hospital_b = TokenIssuer(b_key, algorithm="ES256", issuer="hospital-b-idp", audience=AUDIENCE)
    both = TokenVerifier([hospital.trusted(), hospital_b.trusted()], audience=AUDIENCE)
    assert both.verify(hospital_b.issue(ALICE)).issuer == "hospital-b-idp"
    # Another key of the right type claiming to be hospital B: the signature does not match.
    impostor_b = TokenIssuer(
        other_ec_key, algorithm="ES256", issuer="hospital-b-idp", audience=AUDIENCE
    )
    assert reason(both, impostor_b.issue(ALICE)) == "bad signature"
    # Hospital A's key claiming to be hospital B: RS256 is not B's algorithm.
    a_as_b = TokenIssuer(
        rsa_private_pem, algorithm="RS256", issuer="hospital-b-idp", audience=AUDIENCE
    )
    assert reason(both, a_as_b.issue(ALICE)) == "algorithm not allowed"


def test_algorithm_outside_the_issuers_allow_list(
    rsa_private_pem: bytes, verifier: TokenVerifier
) -> None:
    rs256 = TokenIssuer(rsa_private_pem, algorithm="RS256", issuer=ISSUER, audience=AUDIENCE)
    assert reason(verifier, rs256.issue(ALICE)) == "algorithm not allowed"


def test_alg_none_token_is_refused(verifier: TokenVerifier) -> None:
    token = handmade_token({"alg": "none", "typ": "JWT"}, claims())
    assert token.endswith(".")
    assert reason(verifier, token) == "algorithm not allowed"


def test_hs256_key_confusion_is_refused(keys: tuple[bytes, bytes], verifier: TokenVerifier) -> None:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims(role="admin")).encode())
    signing_input = f"{header}.{payload}".encode()
    # The public key is known to everybody; an HMAC "signed" with it must never verify.
    signature = hmac.new(keys[1], signing_input, hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(signature)}"
    assert reason(verifier, token) == "algorithm not allowed"


@pytest.mark.parametrize("algorithms", [("HS256",), ("none",), ("EdDSA", "HS512"), ()])
def test_symmetric_or_none_algorithms_cannot_be_configured(
    keys: tuple[bytes, bytes], algorithms: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=r"algorithm|no algorithms"):
        TokenVerifier([TrustedIssuer(ISSUER, keys[1], algorithms)], audience=AUDIENCE)


def test_key_type_must_match_the_algorithm(keys: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="cannot verify RS256"):
        TokenVerifier([TrustedIssuer(ISSUER, keys[1], ("RS256",))], audience=AUDIENCE)
    with pytest.raises(ValueError, match="cannot verify ES256"):
        TokenIssuer(keys[0], algorithm="ES256", issuer=ISSUER, audience=AUDIENCE)


@pytest.mark.parametrize("missing", ["exp", "nbf", "iat", "aud", "sub", "role", "dept"])
def test_missing_claims_are_refused(
    keys: tuple[bytes, bytes], verifier: TokenVerifier, missing: str
) -> None:
    private_key = serialization.load_pem_private_key(keys[0], password=None)
    token = jwt.encode(claims(**{missing: None}), private_key, algorithm="EdDSA")
    assert reason(verifier, token) == f"missing claim: {missing}"


def test_missing_issuer_claim(keys: tuple[bytes, bytes], verifier: TokenVerifier) -> None:
    private_key = serialization.load_pem_private_key(keys[0], password=None)
    token = jwt.encode(claims(iss=None), private_key, algorithm="EdDSA")
    assert reason(verifier, token) == "missing claim: iss"


@pytest.mark.parametrize(
    ("override", "expected"),
    [({"role": "superuser"}, "invalid claim: role"), ({"dept": ""}, "invalid claim: dept")],
)
def test_invalid_fedllm_claims(
    keys: tuple[bytes, bytes], verifier: TokenVerifier, override: dict, expected: str
) -> None:
    private_key = serialization.load_pem_private_key(keys[0], password=None)
    token = jwt.encode(claims(**override), private_key, algorithm="EdDSA")
    assert reason(verifier, token) == expected


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "x" * 10_000, "Bearer abc.def.ghi"])
def test_malformed_tokens(verifier: TokenVerifier, garbage: str) -> None:
    assert reason(verifier, garbage) == "malformed"


def test_keys_load_from_files_and_environment(
    tmp_path: Path, keys: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    private_path = tmp_path / "jwt.key"
    private_path.write_bytes(keys[0])
    private_path.chmod(0o600)
    assert load_private_key_pem(private_path) == keys[0]
    assert load_private_key_pem(str(private_path)) == keys[0]

    monkeypatch.setenv("FEDLLM_TEST_JWT_PUBLIC", keys[1].decode().replace("\n", "\\n"))
    assert load_public_key_pem("env:FEDLLM_TEST_JWT_PUBLIC") == keys[1]


def test_key_loading_errors_never_echo_the_secret(
    tmp_path: Path, keys: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(KeyLoadError, match="FEDLLM_TEST_UNSET"):
        load_private_key_pem("env:FEDLLM_TEST_UNSET")
    with pytest.raises(KeyLoadError, match="cannot read key file"):
        load_private_key_pem(tmp_path / "missing.pem")
    # A public key where a private one is expected: refused, and the PEM is not in the message.
    monkeypatch.setenv("FEDLLM_TEST_WRONG", keys[1].decode())
    with pytest.raises(KeyLoadError) as error:
        load_private_key_pem("env:FEDLLM_TEST_WRONG")
    assert "BEGIN" not in str(error.value)
    assert "FEDLLM_TEST_WRONG" in str(error.value)
