"""Converted-weights cache: a model's tensors after conversion, one safetensors file per dtype.

Dequantizing a GGUF (or casting a float32 checkpoint to bfloat16) takes seconds on every start and
gives the same result each time. The first load writes exactly the tensors `load_weights` consumes
to `$KVFERRY_CACHE_DIR/weights/<name>-<path hash>-<dtype>-<key>.safetensors` (default
`~/.cache/kvferry`); later loads read that file memory-mapped. A small JSON entry next to it keeps
what parsing the source's header yields (config, tokenizer), which for a GGUF also takes seconds.
The key covers the source files' identity (resolved path, size, mtime), the dtype and
FORMAT_VERSION: a changed source is converted again, and its new entry replaces the old one.

Entries are written to a temporary name, fsynced and renamed: a writer killed midway, or two
writers at once, never leave a partial file under the final name. An entry that does not read
back (truncated, garbage, another key) is logged, ignored and replaced. A cache directory that
cannot be written only costs the speed-up. `KVFERRY_WEIGHT_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only annotations here: read_meta serves the frontend, which runs without torch
    import torch

log = logging.getLogger(__name__)

# Bump when a conversion changes what it produces (dequantizer, name mapping, q/k row order, the
# metadata entry's fields): older entries then no longer match and are replaced.
FORMAT_VERSION = 1
# Sources smaller than this load in milliseconds; an entry would only litter the disk.
MIN_SOURCE_BYTES = 1 << 20
# Temporary files left by writers killed mid-write are removed once this old.
STALE_TMP_S = 3600.0
_MARK = "kvferry_weight_cache"

Tensors = Iterable[tuple[str, "torch.Tensor"]]


@dataclass(frozen=True)
class Origin:
    """Where a load's tensors came from: "cache" (read back from `path`), "convert" (converted now and
    written to `path` unless `note` says why not) or "direct" (not cached; `note` says why)."""

    source: str
    path: Path | None = None
    note: str = ""


class CorruptCache(Exception):
    """A cache entry that exists but cannot be used."""


def cache_dir() -> Path:
    """$KVFERRY_CACHE_DIR, else $XDG_CACHE_HOME/kvferry, else ~/.cache/kvferry."""
    explicit = os.environ.get("KVFERRY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvferry"


def enabled() -> bool:
    return os.environ.get("KVFERRY_WEIGHT_CACHE", "1").lower() not in ("0", "false", "no", "off")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def source_key(files: Iterable[Path], kind: str) -> dict[str, Any]:
    """What an entry must have been made from: the files' identity, `kind` (a dtype name, or
    "meta"), the format version. OSError when a file cannot be stat'ed."""
    ident = []
    for f in files:
        st = Path(f).stat()
        ident.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return {"format": FORMAT_VERSION, "kind": kind, "files": ident}


def entry_path(name: str, key: dict[str, Any], suffix: str) -> Path:
    """The entry for `key`. Entries of one source path and kind share a name prefix, which is how a
    new entry finds the ones it supersedes."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "model"
    paths = hashlib.sha256(json.dumps([f[0] for f in key["files"]]).encode()).hexdigest()[:8]
    full = hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]
    return cache_dir() / "weights" / f"{safe}-{paths}-{key['kind']}-{full}{suffix}"


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def _usable_key(files: tuple[Path, ...], kind: str) -> tuple[dict[str, Any] | None, str]:
    """The key for `files`, or None and why the cache is not used for them."""
    if not files:
        return None, "no source files (a generated model)"
    if not enabled():
        return None, "cache off (KVFERRY_WEIGHT_CACHE=0)"
    try:
        key = source_key(files, kind)
    except OSError as exc:
        return None, f"source not readable: {exc}"
    if sum(f[1] for f in key["files"]) < MIN_SOURCE_BYTES:
        return None, "source too small to be worth caching"
    return key, ""


# ---- writing ---------------------------------------------------------------------------------


def _atomic_write(path: Path, write_to: Callable[[Path], None]) -> None:
    """`write_to(tmp)`, fsync, rename onto `path`, then drop the entries it supersedes. Raises
    OSError (directory not writable, disk full, ...), leaving no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_to(tmp)
        os.chmod(tmp, 0o644)  # readable like any cache file (safetensors creates it owner-only)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the final name says the entry is whole
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _prune(path)


def _prune(current: Path) -> None:
    """Remove entries `current` supersedes (same name, path and kind; another key) and stale
    temporary files. Best effort; a process that has an old entry mapped keeps its pages."""
    prefix = current.name[: current.name.rindex("-") + 1]
    now = time.time()
    for p in current.parent.glob(prefix + "*"):
        try:
            if p.name.endswith(".tmp"):
                if now - p.stat().st_mtime > STALE_TMP_S:
                    p.unlink()
            elif p != current and p.suffix == current.suffix:
                p.unlink()
        except OSError:
            pass


def _warn_unwritable(path: Path, exc: OSError) -> str:
    log.warning("weight cache entry %s not written (%s); loading works, the next start converts again", path, exc)
    return f"not written: {exc}"


# ---- converted tensors -------------------------------------------------------------------------


def read_tensors(path: Path, key: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of entry `path`, memory-mapped; CorruptCache unless it is a whole entry for `key`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            if meta.get(_MARK) != str(FORMAT_VERSION) or meta.get("key") != _canonical(key):
                raise CorruptCache("made for another source or format")
            if not names or meta.get("count") != str(len(names)):
                raise CorruptCache(f"{len(names)} tensors where the header says {meta.get('count')}")
            tensors = {n: f.get_tensor(n) for n in names}
    except (SafetensorError, OSError, ValueError) as exc:  # truncated, garbage header, unreadable
        raise CorruptCache(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    if any(t.dtype != dtype for t in tensors.values()):
        raise CorruptCache(f"tensors are not all {dtype}")
    return tensors


def write_tensors(path: Path, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write entry `path` atomically. OSError when it cannot be written."""
    from safetensors.torch import save_file

    meta = {_MARK: str(FORMAT_VERSION), "key": _canonical(key), "count": str(len(tensors))}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _converted(tensors: Tensors, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """In `dtype`, contiguous, no two sharing memory (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors:
        t = t.to(dtype).contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def load(name: str, files: tuple[Path, ...], tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]],
         dtype: torch.dtype, converts: bool = True) -> tuple[Tensors, Origin]:
    """Source `name`'s tensors (read from `files` by `tensors()`) in `dtype`: from the cache when it
    holds them, else converted now and written to it. With `converts=False` (the source already
    stores `dtype`) there is nothing worth caching and `tensors()` is returned as is."""
    key, why = _usable_key(files, dtype_name(dtype)) if converts else (None, "nothing to convert")
    if key is None:
        return tensors(), Origin("direct", note=why)
    path = entry_path(name, key, ".safetensors")
    if path.is_file():
        try:
            return read_tensors(path, key, dtype).items(), Origin("cache", path)
        except CorruptCache as exc:
            log.warning("weight cache entry %s is unusable (%s); converting again and replacing it", path, exc)
    log.info("converting %s weights to %s (cached in %s for the next start)", name, dtype_name(dtype), path)
    converted = _converted(tensors(), dtype)
    note = ""
    try:
        write_tensors(path, key, converted)
    except OSError as exc:
        note = _warn_unwritable(path, exc)
    return converted.items(), Origin("convert", path, note)


# ---- parsed metadata -----------------------------------------------------------------------------


def read_meta(name: str, files: tuple[Path, ...]) -> dict[str, Any] | None:
    """The metadata entry stored for `files` by write_meta, or None (none, unusable, cache off)."""
    key, _ = _usable_key(files, "meta")
    if key is None:
        return None
    path = entry_path(name, key, ".json")
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("weight cache entry %s is unusable (%s); reading the source again", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("meta"), dict):
        log.warning("weight cache entry %s is unusable (made for another source); reading the source again", path)
        return None
    return doc["meta"]


def write_meta(name: str, files: tuple[Path, ...], meta: dict[str, Any]) -> None:
    """Store `meta` (JSON-able) for `files`; a failure is logged, never raised."""
    key, _ = _usable_key(files, "meta")
    if key is None:
        return
    path = entry_path(name, key, ".json")
    text = json.dumps({"key": key, "meta": meta})
    try:
        _atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError as exc:
        _warn_unwritable(path, exc)
