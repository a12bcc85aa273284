"""API keys: created for an org, shown once, stored as a hash, checked on every request."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from tunesmith.errors import ServiceError
from tunesmith.service.settings import valid_name
from tunesmith.service.store import Store
from tunesmith.service.tables import ApiKey, new_id, now

KEY_PREFIX = "sk-ts-"


@dataclass(frozen=True)
class KeyInfo:
    id: str
    org: str
    prefix: str
    name: str | None
    created_at: int
    revoked_at: int | None


def hash_key(key: str) -> str:
    # A plain SHA-256 is enough here: keys are 256 random bits, so there is nothing to
    # brute-force, and a fast hash lets every request be checked with one indexed lookup.
    # (Slow salted hashes like bcrypt exist for low-entropy human passwords.)
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, org: str, *, name: str | None = None) -> tuple[str, KeyInfo]:
    """A new key for ``org``: the secret (shown once, never stored) and its record."""
    if not valid_name(org):
        raise ServiceError(f"org name {org!r}: use 1-64 letters, digits, '.', '_' or '-'",
                           status=400, param="org")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key_"), org=org, key_hash=hash_key(key), prefix=key[:12],
                 name=name, created_at=now())
    with store.begin() as s:
        s.add(row)
    return key, _info(row)


def list_keys(store: Store, org: str | None = None) -> list[KeyInfo]:
    with store.begin() as s:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if org is not None:
            query = query.where(ApiKey.org == org)
        return [_info(k) for k in s.scalars(query)]


def revoke_key(store: Store, key_id: str) -> KeyInfo:
    with store.begin() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise ServiceError(f"no API key with id {key_id!r}; see `tunesmith keys list`",
                               status=404)
        if row.revoked_at is None:
            row.revoked_at = now()
        return _info(row)


def org_for_key(store: Store, authorization: str | None) -> str:
    """The org an ``Authorization: Bearer <key>`` header belongs to, or a 401."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ServiceError("You didn't provide an API key. Send it as 'Authorization: Bearer "
                           "<key>'; create one with `tunesmith keys create --org NAME`.",
                           status=401, code="missing_api_key")
    key = authorization[7:].strip()
    with store.begin() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        shown = key[:8] + "..." if len(key) > 8 else "..."
        raise ServiceError(f"Incorrect API key provided: {shown}", status=401,
                           code="invalid_api_key")
    return row.org


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(id=row.id, org=row.org, prefix=row.prefix, name=row.name,
                   created_at=row.created_at, revoked_at=row.revoked_at)
