"""Signed access tokens (JWT) for the serving API, and their strict verification.

Tokens are signed with an asymmetric key only: the router (or any service that checks tokens)
holds public keys, so a compromised verifier cannot mint tokens, and hospitals' own identity
providers can be trusted by adding their public key. Symmetric (HS*) and unsigned ("none")
tokens are refused outright; this also closes the classic key-confusion attack in which an
attacker signs an HS256 token with the verifier's *public* key as the HMAC secret.

The verifier picks the issuer's key from the token's unverified ``iss`` claim, then checks
everything (algorithm allowed for that issuer, signature, ``iss``, ``aud``, times, and the
fedllm claims ``sub``, ``role``, ``dept``) with that key, so a token can never choose its own
key or algorithm beyond what the operator configured for its issuer.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import exceptions as jwt_errors

from fedllm.security.users import Role, User

logger = structlog.get_logger(__name__)

# Asymmetric JWS algorithms and the key types that may sign them. Anything else (HS*, "none")
# is never accepted, whatever a configuration says.
_ALGORITHM_KEYS: dict[str, tuple[type, ...]] = {
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
    "ES256": (ec.EllipticCurvePublicKey,),
    "ES384": (ec.EllipticCurvePublicKey,),
    "ES512": (ec.EllipticCurvePublicKey,),
    "RS256": (rsa.RSAPublicKey,),
    "RS384": (rsa.RSAPublicKey,),
    "RS512": (rsa.RSAPublicKey,),
    "PS256": (rsa.RSAPublicKey,),
    "PS384": (rsa.RSAPublicKey,),
    "PS512": (rsa.RSAPublicKey,),
}
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
ASYMMETRIC_ALGORITHMS = frozenset(_ALGORITHM_KEYS)
MIN_RSA_BITS = 2048

# Registered claims PyJWT checks, then fedllm's own; all must be present in every token.
REQUIRED_CLAIMS = ("exp", "nbf", "iat", "iss", "aud", "sub", "role", "dept")
# Longer tokens are refused before any parsing: ours are a few hundred bytes.
MAX_TOKEN_LENGTH = 8192


class TokenError(Exception):
    """A token was refused; `reason` is a short machine-readable string for logs and metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid token: {reason}")
        self.reason = reason


class KeyLoadError(ValueError):
    """A key could not be read or parsed; the message names the source, never the secret."""


@dataclass(frozen=True)
class Principal:
    """The verified identity a token speaks for."""

    subject: str
    role: Role
    department: str
    issuer: str
    expires_at: float


@dataclass(frozen=True)
class TrustedIssuer:
    """An issuer whose tokens are accepted: its name, public key and allowed algorithms."""

    issuer: str
    public_key_pem: bytes
    algorithms: tuple[str, ...] = ("EdDSA",)


def _check_algorithm(algorithm: str, public_key: Any, owner: str) -> None:
    """Refuse non-asymmetric algorithms and keys that cannot sign with `algorithm`."""
    if algorithm not in _ALGORITHM_KEYS:
        allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
        raise ValueError(
            f"{owner}: algorithm {algorithm!r} is not allowed; expected one of {allowed} "
            "(symmetric HS* and 'none' are never accepted)"
        )
    if not isinstance(public_key, _ALGORITHM_KEYS[algorithm]):
        raise ValueError(f"{owner}: a {type(public_key).__name__} cannot verify {algorithm}")
    if algorithm in _EC_CURVES and public_key.curve.name != _EC_CURVES[algorithm]:
        raise ValueError(f"{owner}: {algorithm} needs curve {_EC_CURVES[algorithm]}")
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{owner}: RSA keys must have at least {MIN_RSA_BITS} bits")


class TokenIssuer:
    """Mints short-lived access tokens for authenticated users.

    `clock` (Unix seconds) is injectable so tests can mint expired or not-yet-valid tokens.
    """

    def __init__(
        self,
        private_key_pem: bytes,
        *,
        algorithm: str = "EdDSA",
        issuer: str,
        audience: str,
        ttl_s: int = 900,
        key_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuer or not isinstance(issuer, str):
            raise ValueError("issuer must be a non-empty string")
        if not audience or not isinstance(audience, str):
            raise ValueError("audience must be a non-empty string")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
            raise ValueError(f"ttl_s must be a positive integer, got {ttl_s!r}")
        self._key = _parse_private_key(private_key_pem, "token issuer")
        _check_algorithm(algorithm, self._key.public_key(), "token issuer")
        self._algorithm = algorithm
        self._issuer = issuer
        self._audience = audience
        self._ttl_s = ttl_s
        self._headers = {"kid": key_id} if key_id else None
        self._clock = clock

    @property
    def issuer(self) -> str:
        """The ``iss`` claim of every token this issuer mints."""
        return self._issuer

    def trusted(self) -> TrustedIssuer:
        """The entry a `TokenVerifier` needs to accept this issuer's tokens."""
        pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return TrustedIssuer(issuer=self._issuer, public_key_pem=pem, algorithms=(self._algorithm,))

    def issue(self, user: User) -> str:
        """A signed token for `user`, valid from now for `ttl_s` seconds."""
        now = int(self._clock())
        claims = {
            "sub": user.username,
            "role": Role(user.role).value,
            "dept": user.department,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": now,
            "nbf": now,
            "exp": now + self._ttl_s,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers=self._headers)


@dataclass(frozen=True)
class _Issuer:
    name: str
    key: Any
    algorithms: tuple[str, ...]


# PyJWT's exceptions, most specific first, mapped to TokenError reasons.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt_errors.ExpiredSignatureError, "expired"),
    (jwt_errors.ImmatureSignatureError, "not yet valid"),
    (jwt_errors.InvalidSignatureError, "bad signature"),
    (jwt_errors.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt_errors.InvalidAudienceError, "wrong audience"),
    (jwt_errors.InvalidIssuerError, "unknown issuer"),
    (jwt_errors.InvalidSubjectError, "invalid claim: sub"),
    (jwt_errors.InvalidJTIError, "invalid claim: jti"),
    (jwt_errors.InvalidIssuedAtError, "invalid claim: iat"),
)


class TokenVerifier:
    """Accepts only tokens from configured issuers, signed with their keys and algorithms."""

    def __init__(
        self, trusted: Sequence[TrustedIssuer], *, audience: str, leeway_s: float = 5.0
    ) -> None:
        if not audience or not isinstance(audience, str):
            raise ValueError("audience must be a non-empty string")
        if not 0 <= leeway_s <= 300:
            raise ValueError(f"leeway_s must be within [0, 300] seconds, got {leeway_s!r}")
        if not trusted:
            raise ValueError("at least one trusted issuer is required")
        self._issuers: dict[str, _Issuer] = {}
        for entry in trusted:
            owner = f"trusted issuer {entry.issuer!r}"
            if not entry.issuer or not isinstance(entry.issuer, str):
                raise ValueError("a trusted issuer needs a non-empty name")
            if entry.issuer in self._issuers:
                raise ValueError(f"{owner} is listed twice")
            if not entry.algorithms:
                raise ValueError(f"{owner}: no algorithms allowed")
            key = _parse_public_key(entry.public_key_pem, owner)
            for algorithm in entry.algorithms:
                _check_algorithm(algorithm, key, owner)
            self._issuers[entry.issuer] = _Issuer(entry.issuer, key, tuple(entry.algorithms))
        self._audience = audience
        self._leeway_s = float(leeway_s)

    def verify(self, token: str) -> Principal:
        """The principal `token` speaks for; TokenError with a short `reason` otherwise."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise TokenError("malformed")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt_errors.PyJWTError:
            raise TokenError("malformed") from None
        if "crit" in header:
            raise TokenError("unsupported critical header")
        name = unverified.get("iss")
        if name is None:
            raise TokenError("missing claim: iss")
        issuer = self._issuers.get(name) if isinstance(name, str) else None
        if issuer is None:
            raise TokenError("unknown issuer")
        if header.get("alg") not in issuer.algorithms:
            raise TokenError("algorithm not allowed")
        try:
            claims = jwt.decode(
                token,
                issuer.key,
                algorithms=list(issuer.algorithms),
                audience=self._audience,
                issuer=issuer.name,
                leeway=self._leeway_s,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt_errors.MissingRequiredClaimError as exc:
            raise TokenError(f"missing claim: {exc.claim}") from None
        except jwt_errors.PyJWTError as exc:
            raise TokenError(_reason(exc)) from None
        return _principal(claims, issuer.name)


def _reason(exc: Exception) -> str:
    for error_type, reason in _REASONS:
        if isinstance(exc, error_type):
            return reason
    return "malformed"


def _principal(claims: dict[str, Any], issuer: str) -> Principal:
    """The fedllm claims of a signature-checked token, each validated."""
    subject, department = claims["sub"], claims["dept"]
    if not isinstance(subject, str) or not subject:
        raise TokenError("invalid claim: sub")
    if not isinstance(department, str) or not department:
        raise TokenError("invalid claim: dept")
    try:
        role = Role(claims["role"])
    except ValueError:
        raise TokenError("invalid claim: role") from None
    return Principal(
        subject=subject,
        role=role,
        department=department,
        issuer=issuer,
        expires_at=float(claims["exp"]),
    )


def _parse_private_key(pem: bytes, owner: str) -> Any:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise KeyLoadError(f"{owner}: not an unencrypted PEM private key") from None
    _check_key_kind(key.public_key(), owner)
    return key


def _parse_public_key(pem: bytes, owner: str) -> Any:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise KeyLoadError(f"{owner}: not a PEM public key") from None
    _check_key_kind(key, owner)
    return key


def _check_key_kind(public_key: Any, owner: str) -> None:
    kinds = tuple({kind for kinds in _ALGORITHM_KEYS.values() for kind in kinds})
    if not isinstance(public_key, kinds):
        raise KeyLoadError(f"{owner}: unsupported key type {type(public_key).__name__}")


def read_key_source(source: str | Path) -> bytes:
    """The PEM bytes named by `source`: ``env:NAME`` reads variable NAME, anything else a file.

    Keys come from files or the environment, never from configs or the repository. Error
    messages name the file or variable but never include its content. Literal ``\\n``
    sequences in a variable (common when a PEM is pasted into one line) become newlines.
    """
    text = str(source)
    if text.startswith("env:"):
        name = text[4:]
        value = os.environ.get(name)
        if not value:
            raise KeyLoadError(f"environment variable {name} is not set or empty")
        if "\n" not in value and "\\n" in value:
            value = value.replace("\\n", "\n")
        return value.encode()
    path = Path(text).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyLoadError(f"cannot read key file {path}: {exc.strerror}") from None
    return data


def load_private_key_pem(source: str | Path) -> bytes:
    """A private key PEM from a file path or ``env:NAME``, checked to parse.

    Warns (without the key) when a key file is readable by group or others.
    """
    text = str(source)
    if not text.startswith("env:"):
        path = Path(text).expanduser()
        if path.exists() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("private key file is readable by other users", path=str(path))
    pem = read_key_source(source)
    _parse_private_key(pem, f"private key from {_describe(text)}")
    return pem


def load_public_key_pem(source: str | Path) -> bytes:
    """A public key PEM from a file path or ``env:NAME``, checked to parse."""
    pem = read_key_source(source)
    _parse_public_key(pem, f"public key from {_describe(str(source))}")
    return pem


def _describe(source: str) -> str:
    return f"environment variable {source[4:]}" if source.startswith("env:") else source


def generate_ed25519_keypair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as (PKCS#8 private PEM, SubjectPublicKeyInfo public PEM)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem
