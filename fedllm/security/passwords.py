"""Password hashing with argon2id, the memory-hard hash recommended for stored passwords.

A stolen user database must not reveal passwords: argon2id makes every guess cost memory and
time, and the salt in each hash defeats precomputed tables. Parameters are argon2-cffi's
defaults (RFC 9106 "second recommended" profile); they are stored in every hash, so raising
them later keeps old hashes verifiable and `needs_rehash` tells callers when to upgrade one.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    """The argon2id hash of `password` (salted; encoded with its parameters)."""
    if not isinstance(password, str):
        raise TypeError("password must be a string")
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether `password` matches `password_hash`.

    Returns False, never raises, for a mismatch, a malformed or foreign hash, or non-string
    input: a login attempt is user input and must not be able to crash the caller.
    """
    if not isinstance(password_hash, str) or not isinstance(password, str):
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether `password_hash` was made with weaker parameters than the current ones."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True
