"""API keys: where they come from (flags, `KVMESH_API_KEY`, a key file), how a presented key is checked, and
which tenant it belongs to.

A key file holds one key a line, optionally followed by whitespace and the key's tenant; `#` starts a comment
line. A key given without a tenant belongs to the unnamed tenant "" (all such keys share one cache namespace).

    alice-key-8f2c   team-a
    bob-key-19d7     team-b
    # rotated out: old-key
    ci-key-55e0

A check hashes the presented key once and compares it, with `hmac.compare_digest`, against the digest of every
key, without stopping at a match: how long a check takes says nothing of which key (or which prefix) was close.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: The tenant of the request being served; None when the server checks no keys (an open gateway).
TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvmesh_tenant", default=None)


class KeyFileError(ValueError):
    """A key file is missing, unreadable or malformed."""


def parse_key_file(text: str, source: str = "key file") -> dict[str, str]:
    """{key: tenant} from a key file's text; KeyFileError naming the line for a malformed one."""
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2 and not fields[2].startswith("#"):
            raise KeyFileError(f"{source}:{number}: expected 'KEY [TENANT]', got {len(fields)} fields")
        key, tenant = fields[0], fields[1] if len(fields) > 1 and not fields[1].startswith("#") else ""
        if keys.get(key, tenant) != tenant:
            raise KeyFileError(f"{source}:{number}: the same key is given to two tenants")
        keys[key] = tenant
    return keys


def read_key_file(path: str) -> dict[str, str]:
    """{key: tenant} from the key file at path."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    return parse_key_file(text, path)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeySet:
    """Keys (as digests, so every comparison is of equal length) and their tenants."""

    digests: tuple[tuple[bytes, str], ...]

    @classmethod
    def of(cls, keys: dict[str, str]) -> KeySet:
        return cls(tuple((_digest(key), tenant) for key, tenant in keys.items()))

    def tenant_of(self, key: str) -> str | None:
        """The tenant of key, or None when it is no key of this set; the time taken does not depend on which."""
        presented = _digest(key)
        found: str | None = None
        for digest, tenant in self.digests:  # no early exit: every key is compared
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    def __len__(self) -> int:
        return len(self.digests)


class KeyRing:
    """The keys a server accepts: those given at start (flags, environment) plus a key file, which `reload()`
    reads again (on SIGHUP) without a restart."""

    def __init__(self, static_keys: tuple[str, ...] = (), key_file: str = ""):
        self.static_keys, self.key_file = tuple(static_keys), key_file
        self.keys = self._load()
        if not self.keys:
            raise KeyFileError("no API key given")

    def _load(self) -> KeySet:
        keys = read_key_file(self.key_file) if self.key_file else {}
        if self.key_file and not keys:  # most likely a file being rewritten, or emptied by mistake
            raise KeyFileError(f"the API key file {self.key_file} holds no key")
        for key in self.static_keys:
            keys.setdefault(key, "")
        return KeySet.of(keys)

    def reload(self) -> bool:
        """Read the key file again; when it cannot be read, is malformed or holds no key, keep the current keys
        and log why (revoke every key by stopping the gateway, or with a file of keys nobody has)."""
        try:
            keys = self._load()
        except KeyFileError as exc:
            log.error("API keys not reloaded, the %d current ones stay: %s", len(self.keys), exc)
            return False
        self.keys = keys
        log.warning("API keys reloaded: %d key(s)", len(keys))
        return True

    def tenant_of(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization` value (`Bearer <key>`), or None when it names no valid key."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self.keys.tenant_of(key.strip())
