"""Logins and bearer-token checks for the router.

Verifying an EdDSA signature costs far more than the rest of a cached request, so verified
tokens are remembered (by their exact string) until they expire: the cache can only return a
principal for a token that already passed full verification, and it forgets it at ``exp``.

Logins are the one unauthenticated request that costs real CPU (argon2, on purpose), so
`LoginGate` admits them in three steps: a token bucket per client address, one per username,
then a slot on the router's own bounded `HashingPool`. A flood is answered with 429 or 503
(with ``Retry-After``) and never occupies the threads that budgets, audit and routing use.
Failures are counted in the audit log per kind and client (`AuditLog.count_failure`), and a
name that matches no account is kept only as a keyed digest.
"""

from __future__ import annotations

import hashlib
import time

from prometheus_client import Counter

from fedllm.security.audit import AuditLog
from fedllm.security.passwords import HashingPool, HashingPoolFullError
from fedllm.security.ratelimit import RateLimiter
from fedllm.security.tokens import (
    Principal,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    TrustedIssuer,
    load_private_key_pem,
    load_public_key_pem,
)
from fedllm.security.users import (
    AccountLockedError,
    AuthenticationError,
    UnknownUserError,
    User,
    UserStore,
)
from fedllm.serving.router.config import AuthConfig, RateLimitConfig
from fedllm.serving.router.errors import ApiError, retry_after

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


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class LoginGate:
    """Admission and outcome of ``POST /v1/auth/token``: rate limits, hashing pool, audit."""

    def __init__(
        self,
        users: UserStore,
        *,
        rate: RateLimitConfig,
        auth: AuthConfig,
        audit_log: AuditLog,
        failures: Counter,
    ) -> None:
        self._users = users
        self._audit = audit_log
        self._failures = failures
        self.by_address = RateLimiter(rate.login_per_s, rate.login_burst)
        self.by_username = RateLimiter(rate.login_user_per_s, rate.login_user_burst)
        self.pool = HashingPool(auth.password_workers, auth.password_queue)

    def admit(self, client: str) -> None:
        """Spend the client address's login token before the body is even read; 429 if none."""
        wait = self.by_address.try_acquire(f"login:{client}")
        if wait > 0:
            self._failures.labels(reason="rate limited").inc()
            raise ApiError(429, "too many login attempts; slow down", retry_after(wait))

    async def authenticate(self, username: str, password: str, client: str) -> User:
        """The user, or ApiError: 429 (username bucket), 503 (pool full), 423, 401."""
        # Keyed by a digest: a flood of 256 KB usernames must not become 256 KB bucket keys.
        name_key = hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()
        wait = self.by_username.try_acquire(f"login-user:{name_key}")
        if wait > 0:
            self._failures.labels(reason="rate limited").inc()
            raise ApiError(
                429, "too many login attempts for this username; slow down", retry_after(wait)
            )
        try:
            return await self.pool.run(self._users.authenticate, username, password)
        except HashingPoolFullError as error:
            self._failures.labels(reason="overloaded").inc()
            raise ApiError(
                503, "too many logins in progress; retry shortly", retry_after(error.retry_after_s)
            ) from None
        except AccountLockedError as error:
            self._failures.labels(reason="locked").inc()
            self._audit.count_failure("locked_account", client, user=username)
            raise ApiError(
                423,
                "account locked after repeated failed logins; try again later",
                retry_after(error.retry_after_s),
            ) from None
        except UnknownUserError:
            self._failures.labels(reason="bad credentials").inc()
            self._audit.count_failure("unknown_user", client, unknown_user=username)
            raise ApiError(401, "invalid username or password", _CHALLENGE) from None
        except AuthenticationError:
            self._failures.labels(reason="bad credentials").inc()
            self._audit.count_failure("bad_password", client, user=username)
            raise ApiError(401, "invalid username or password", _CHALLENGE) from None

    def close(self) -> None:
        """Stop the hashing pool (queued logins are cancelled)."""
        self.pool.shutdown()
