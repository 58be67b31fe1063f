"""Security building blocks for serving: who may ask, how they prove it, and what was asked.

- `passwords`: argon2id password hashes.
- `users`: the user store with roles, departments and login lockout.
- `tokens`: signed JWT access tokens (asymmetric keys only) and their strict verification.
- `ratelimit`: per-key token buckets.
- `audit`: the hash-chained, redacted audit log and its verifier.
- `certs`, `encryption`: deployment credentials and encryption at rest.

Modules are imported directly (``from fedllm.security.tokens import TokenVerifier``) so that
using one does not load the others' dependencies.
"""
