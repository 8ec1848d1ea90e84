"""What the store remembers of workflow files: which sources passed the schema
(``valid:<source_hash>``) and the parsed data of valid files (``parsed:<path>``).

Both are caches: an entry that cannot be read back is dropped and the file is checked
or parsed again, never trusted. The parsed data is kept as pickled bytes with their
digest, so an entry damaged where a pickle still decodes (a flipped byte inside a
prompt) is caught too: data that skips the schema pass must be the data that passed it.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import diskcache

from storyflow.store._fence import FOREIGN_ERRORS, Fence, Undecodable, read_value

VALID = 1
"""The value of a ``valid:`` entry."""


def valid_key(source_hash: str) -> str:
    return f"valid:{source_hash}"


def parsed_key(path: str) -> str:
    return f"parsed:{path}"


def _digest(blob: bytes) -> str:
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def known_valid(cache: diskcache.Cache, root: Path, source_hash: str) -> bool:
    """Whether this exact source passed the schema; a damaged entry is dropped."""
    key = valid_key(source_hash)
    with Fence(root, "read the validation cache"):
        value = read_value(cache, key)
        if value is not None and not (type(value) is int and value == VALID):
            _drop(cache, key)
            return False
    return value is not None


def remember_valid(cache: diskcache.Cache, root: Path, source_hash: str) -> None:
    with Fence(root, "write the validation cache"):
        cache.set(valid_key(source_hash), VALID)


def parsed(cache: diskcache.Cache, root: Path, path: str, text_hash: str) -> Any:
    """The parsed data of the file at ``path`` if its text hashes to ``text_hash``, else
    None; an entry for that text that cannot be read back whole is dropped."""
    key = parsed_key(path)
    with Fence(root, "read the parsed-workflow cache"):
        entry = read_value(cache, key)
        if entry is None:
            return None
        if isinstance(entry, dict) and entry.get("hash") != text_hash:
            return None  # the file changed since: parsed again, then this entry replaced
        data = _data(entry)
        if data is None:
            _drop(cache, key)
        return data


def _drop(cache: diskcache.Cache, key: str) -> None:
    """Delete a damaged cache entry if the database lets us; it is replaced anyway."""
    try:
        cache.delete(key)
    except FOREIGN_ERRORS:
        pass  # a damaged page, a busy database: the entry stays, and is not trusted


def _data(entry: Any) -> Any:
    """The data an entry holds, or None when it is damaged (or of an older shape)."""
    if isinstance(entry, Undecodable) or not isinstance(entry, dict):
        return None
    blob, digest = entry.get("blob"), entry.get("sum")
    if not isinstance(blob, bytes) or digest != _digest(blob):
        return None
    try:
        data = pickle.loads(blob)
    except Exception:  # a digest that matches damaged bytes: as good as impossible
        return None
    return data if isinstance(data, dict) else None


def remember_parsed(
    cache: diskcache.Cache, root: Path, path: str, text_hash: str, data: Any
) -> None:
    """Keep the parsed data of a valid workflow file (one entry per path)."""
    blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    with Fence(root, "write the parsed-workflow cache"):
        cache.set(parsed_key(path), {"hash": text_hash, "sum": _digest(blob), "blob": blob})
