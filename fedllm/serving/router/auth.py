"""Logins and bearer-token checks for the router.

Verifying an EdDSA signature costs far more than the rest of a cached request, so verified
tokens are remembered (by their exact string) until they expire: the cache can only return a
principal for a token that already passed full verification, and it forgets it at ``exp``.
"""

from __future__ import annotations

import time

from fedllm.security.tokens import (
    Principal,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    TrustedIssuer,
    load_private_key_pem,
    load_public_key_pem,
)
from fedllm.serving.router.config import AuthConfig

# Distinct tokens remembered at most; beyond this the cache is cleared (tokens are short-lived).
TOKEN_CACHE_SIZE = 50_000


def key_source(path: str | None, env: str | None) -> str:
    """A tokens.read_key_source source string for a file path or an environment variable."""
    if env is not None:
        return f"env:{env}"
    assert path is not None
    return path


class RouterTokens:
    """The router's issuer (own key) and a caching verifier (own key + trusted issuers)."""

    def __init__(self, config: AuthConfig) -> None:
        private_pem = load_private_key_pem(
            key_source(config.signing_key_file, config.signing_key_env)
        )
        self.issuer = TokenIssuer(
            private_pem,
            algorithm=config.algorithm,
            issuer=config.issuer,
            audience=config.audience,
            ttl_s=config.token_ttl_s,
        )
        trusted: list[TrustedIssuer] = [self.issuer.trusted()]
        for entry in config.trusted_issuers:
            trusted.append(
                TrustedIssuer(
                    issuer=entry.issuer,
                    public_key_pem=load_public_key_pem(entry.public_key_file),
                    algorithms=tuple(entry.algorithms),
                )
            )
        self.ttl_s = config.token_ttl_s
        self._verifier = TokenVerifier(trusted, audience=config.audience)
        self._verified: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        """The token's principal; TokenError when refused (never cached)."""
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires_at > time.time():
                return cached
            self._verified.pop(token, None)
            raise TokenError("expired")
        principal = self._verifier.verify(token)
        if len(self._verified) >= TOKEN_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = principal
        return principal
