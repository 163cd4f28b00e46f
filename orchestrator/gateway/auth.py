"""API keys: who may call the gateway, which models they see, and their limits.

Keys come from a YAML file (in a cluster: a mounted Secret) or an environment variable
holding the same YAML::

    keys:
      - name: team-a
        key: sk-...            # plaintext as mounted; hashed at load, never kept or logged
        models: ["smollm2-*"]  # globs; default: every model
        rpm: 600               # optional requests per minute
        tpm: 200000            # optional tokens per minute
        tokens_per_day: 5000000  # optional daily budget (prompt + completion, UTC day)
        priority: standard     # interactive > standard > batch (who goes first when a model is full)
        weight: 1              # share among keys of the same class (by estimated tokens)
      - name: ops
        key: sk-...
        admin: true            # may read /fleet and /metrics

Each key is stored as a salted SHA-256 (a random salt per key, drawn at load). A presented
key is hashed with every salt and compared with ``hmac.compare_digest`` against every
stored hash, so the time taken does not depend on which key, if any, matched.

Example::

    store = load_keys_file("/etc/slm/keys.yaml")
    record = store.authenticate("sk-...")      # KeyRecord or None
    record.allows("smollm2-135m")             # glob match on the model name
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.spec import FieldError, FleetValidationError, PriorityClass, field_errors, parse_yaml, read_yaml


class KeySpec(BaseModel):
    """One API key as written in the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$",
                      description="Who the key belongs to; appears in the audit log and metrics, the key never.")
    key: str = Field(..., min_length=16, max_length=512, description="The secret, as clients send it.")
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                              description="Model-name globs the key may use (default: all).")
    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute (prompt + max_tokens, then actual).")
    tokens_per_day: int | None = Field(
        None, ge=1, description="Daily token budget (prompt + completion), per UTC day; then 429 until midnight UTC.")
    priority: PriorityClass = Field(
        "standard", description="The key's request class: interactive > standard > batch (strict priority).")
    weight: float = Field(
        1.0, gt=0, le=1000, description="The key's share among keys of its class while a model is full.")
    admin: bool = Field(False, description="May read /fleet and /metrics.")

    @field_validator("key")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(c.isspace() for c in value) or not value.isprintable():
            raise ValueError("the key may not contain spaces or control characters")
        return value


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeySpec] = Field(..., min_length=1)


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """A key as the gateway keeps it: no plaintext, a salted hash."""

    name: str
    salt: bytes
    digest: bytes
    models: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    admin: bool
    tokens_per_day: int | None = None
    priority: str = "standard"
    weight: float = 1.0

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


def _digest(salt: bytes, key: str) -> bytes:
    return hashlib.sha256(salt + key.encode()).digest()


class KeyStore:
    """The loaded keys; ``authenticate`` compares in constant time over all of them."""

    def __init__(self, specs: list[KeySpec]):
        records = []
        for spec in specs:
            salt = secrets.token_bytes(16)
            records.append(KeyRecord(spec.name, salt, _digest(salt, spec.key), tuple(spec.models), spec.rpm,
                                     spec.tpm, spec.admin, spec.tokens_per_day, spec.priority, spec.weight))
        self.records = tuple(records)
        self.interactive = any(r.priority == "interactive" for r in self.records)  # any interactive key

    def authenticate(self, presented: str | None) -> KeyRecord | None:
        if not presented:
            return None
        found = None
        for record in self.records:  # no early exit: every record costs the same
            if hmac.compare_digest(_digest(record.salt, presented), record.digest):
                found = record
        return found

    def __len__(self) -> int:
        return len(self.records)


def parse_keys(data: Any, origin: str) -> KeyStore:
    """Validate keys-file data; raise FleetValidationError naming the origin and field."""
    if not isinstance(data, dict):
        raise FleetValidationError(origin, [FieldError("", "expected a mapping with a `keys` list")])
    try:
        parsed = KeysFile.model_validate(data)
    except ValidationError as e:
        raise FleetValidationError(origin, field_errors(e, secret={"key"})) from None
    names = [k.name for k in parsed.keys]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FleetValidationError(origin, [FieldError("keys", f"key name {dupes[0]!r} appears twice")])
    return KeyStore(parsed.keys)


def load_keys_file(path: str | Path) -> KeyStore:
    return parse_keys(read_yaml(path, "the keys file", secret=True), str(path))


def load_keys_env(variable: str) -> KeyStore:
    text = os.environ.get(variable)
    origin = f"${variable}"
    if not text:
        raise FleetValidationError(origin, [FieldError("", "the variable is not set or empty")])
    return parse_keys(parse_yaml(text, origin, secret=True), origin)


def bearer(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header (None when absent or another scheme)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
