"""API keys: who is calling (a tenant is a digest of its key), checked in one place for
the middleware that runs before any body is read and for the routes' dependency."""

from __future__ import annotations

import hashlib
import hmac

from .problems import Problem

__all__ = ["PUBLIC", "bearer_key", "owner_of", "unauthorized"]

PUBLIC = "public"


def owner_of(authorization: str, keys: frozenset[str]) -> str:
    """The tenant of an ``Authorization`` header: a digest of its bearer key, ``public``
    without keys; a 401 problem for a missing or unknown key."""
    if not keys:
        return PUBLIC
    known = bearer_key(authorization, keys)
    if known is None:
        raise unauthorized()
    return hashlib.sha256(known.encode()).hexdigest()[:24]


def bearer_key(authorization: str, keys: frozenset[str]) -> str | None:
    """The key of ``keys`` an ``Authorization: Bearer`` header presents, if any (compared
    in constant time)."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() == "bearer" and key:
        for known in keys:
            if hmac.compare_digest(key.encode(), known.encode()):
                return known
    return None


def unauthorized() -> Problem:
    return Problem(
        401,
        "unauthorized",
        "Unauthorized",
        "a valid 'Authorization: Bearer <key>' header is required",
        field="authorization",
        headers={"WWW-Authenticate": 'Bearer realm="alignment-planner"'},
    )
