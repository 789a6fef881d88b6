"""API keys: who may call `/v1/*`, and under which name and limits.

Keys come from `--api-key` (repeatable) and `--api-keys-file` (YAML or JSON). Only their SHA-256
digests are kept in memory, and a presented key is checked against every digest with
`hmac.compare_digest`, so neither a timing difference nor a memory dump gives a key away. A keys
file may hold `sha256:` digests instead of keys, so the file itself need not hold secrets.

    keys:
      - name: team-a
        key: sk-team-a-change-me          # or  sha256: <hex digest of the key>
        requests_per_minute: 60
        tokens_per_minute: 40000
        max_concurrent: 4
      - name: ops
        key: sk-ops-change-me
        admin: true                       # may read /v1/usage
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import AuthenticationError, PermissionDenied

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")


@dataclass(frozen=True)
class Key:
    """One configured key, by name; the key itself is only its digest."""

    name: str
    digest: bytes
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    admin: bool = False


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeysFileError(ValueError):
    pass


def _entry(item: Any, where: str) -> Key:
    if not isinstance(item, dict):
        raise KeysFileError(f"{where}: each key must be a mapping with name and key (or sha256)")
    unknown = set(item) - {"name", "key", "sha256", "admin", *LIMIT_FIELDS}
    if unknown:
        raise KeysFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise KeysFileError(f"{where}: 'name' must be a non-empty string")
    if ("key" in item) == ("sha256" in item):
        raise KeysFileError(f"{where} ({name}): give exactly one of 'key' and 'sha256'")
    if "key" in item:
        if not isinstance(item["key"], str) or len(item["key"]) < 8:
            raise KeysFileError(f"{where} ({name}): 'key' must be a string of at least 8 characters")
        raw = digest(item["key"])
    else:
        try:
            raw = bytes.fromhex(str(item["sha256"]))
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise KeysFileError(f"{where} ({name}): 'sha256' must be 64 hex digits")
    limits: dict[str, int] = {}
    for f in LIMIT_FIELDS:
        v = item.get(f)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise KeysFileError(f"{where} ({name}): '{f}' must be a positive integer")
            limits[f] = v
    admin = item.get("admin", False)
    if not isinstance(admin, bool):
        raise KeysFileError(f"{where} ({name}): 'admin' must be true or false")
    return Key(name=name, digest=raw, admin=admin, **limits)


def load_keys_file(path: Path) -> list[Key]:
    """Parse a keys file (YAML, or JSON when it ends in .json); errors name the entry."""
    try:
        text = path.read_text()
    except OSError as e:
        raise KeysFileError(f"cannot read {path}: {e.strerror}") from e
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KeysFileError(f"{path}: not valid JSON: {e}") from e
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise KeysFileError(f"{path}: not valid YAML: {e}") from e
    items = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise KeysFileError(f"{path}: expected a non-empty list under 'keys'")
    return [_entry(item, f"{path}: keys[{i}]") for i, item in enumerate(items)]


class Keys:
    """The configured keys. Empty: the server is open (no key needed anywhere)."""

    def __init__(self, keys: list[Key]) -> None:
        names = [k.name for k in keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise KeysFileError(f"key names must be unique: {', '.join(dupes)}")
        self.keys = keys

    @classmethod
    def from_settings(cls, api_keys: tuple[str, ...], keys_file: Path | None) -> Keys:
        keys = [Key(name=f"key-{i + 1}", digest=digest(k)) for i, k in enumerate(api_keys)]
        if keys_file is not None:
            keys += load_keys_file(keys_file)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def named(self, name: str) -> Key | None:
        """The configured key called `name` (what a batch records as its owner)."""
        return next((k for k in self.keys if k.name == name), None)

    def require_admin(self, key: Key | None, what: str) -> None:
        """403 unless keys are off or `key` is an admin key."""
        if self.enabled and (key is None or not key.admin):
            raise PermissionDenied(f"{what} needs an admin key (admin: true in the keys file).")

    def authenticate(self, authorization: str | None) -> Key | None:
        """The key behind an `Authorization: Bearer ...` header; None when keys are off."""
        if not self.keys:
            return None
        if not authorization:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("The Authorization header must be 'Bearer YOUR_KEY'.")
        presented = digest(token)
        found: Key | None = None
        for key in self.keys:  # no early exit: every key is compared, found or not
            if hmac.compare_digest(presented, key.digest):
                found = key
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found
