"""On-disk run cache: each run's results keyed by its full configuration, written atomically, checksummed.

Nothing a long sweep computed is lost if it is interrupted: every finished run is one file
``<root>/<namespace>/<key>.npz`` written to a temporary name and renamed into place (atomic on POSIX), with a
SHA-256 of its payload stored inside. A truncated or corrupt entry fails the checksum, is reported and
recomputed. The key is the SHA-256 of the configuration's canonical JSON (sorted keys), so any change of any
setting (seed, rate, rank, steps, code version) is a different run.

The root is ``$LORA_THEORY_CACHE`` if set, else ``$XDG_CACHE_HOME/lora-theory/runs`` (``~/.cache/...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

CACHE_VERSION = 1


def toolkit_dir() -> Path:
    """The toolkit's cache directory, the one place it is defined: ``$XDG_CACHE_HOME/lora-theory``, else
    ``~/.cache/lora-theory``. The runs live in ``runs/`` under it (:func:`cache_root`), the data sets directly in
    it (:func:`toymodels.data.cache_dir`); ``$LORA_THEORY_CACHE`` / ``$LORA_THEORY_DATA`` move either."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lora-theory"


def cache_root() -> Path:
    """Directory holding cached runs (created on first write): ``$LORA_THEORY_CACHE``, else
    ``<toolkit_dir()>/runs``."""
    env = os.environ.get("LORA_THEORY_CACHE")
    if env:
        return Path(env).expanduser()
    return toolkit_dir() / "runs"


def _canonical(config: Mapping) -> str:
    def default(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, tuple | set):
            return list(obj)
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")

    return json.dumps({"__cache_version__": CACHE_VERSION, **config}, sort_keys=True, default=default)


def config_key(config: Mapping) -> str:
    """SHA-256 hex digest of the configuration's canonical JSON."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def _payload_digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write a file through ``write(fileobj)`` all or nothing: into a temporary file next to ``path`` (same
    file system), flushed and fsync'ed, then renamed over ``path`` (``os.replace``, atomic on POSIX). Readers
    see the old file or the new one, never a part; concurrent writers of one path leave one complete file
    (the last rename wins); an interrupted write leaves no temporary behind. Creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def save(path: Path, arrays: Mapping[str, np.ndarray], config: Mapping) -> None:
    """Write ``arrays`` (+ config and checksum) to ``path`` atomically (:func:`atomic_write`)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    meta = json.dumps({"config": json.loads(_canonical(config)), "sha256": _payload_digest(arrays)})
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path) -> dict[str, np.ndarray] | None:
    """Read a cached entry; ``None`` (with a warning) if it is missing, truncated or fails its checksum."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "__meta__"}
            meta = json.loads(bytes(data["__meta__"]).decode())
    except Exception as exc:  # zipfile, json, key errors: all mean "corrupt"
        warnings.warn(f"corrupt cache entry {path} ({type(exc).__name__}); recomputing", stacklevel=2)
        return None
    if meta.get("sha256") != _payload_digest(arrays):
        warnings.warn(f"cache entry {path} fails its checksum; recomputing", stacklevel=2)
        return None
    return arrays


def cached(namespace: str, config: Mapping, compute: Callable[[], Mapping[str, np.ndarray]], *,
           root: Path | None = None, refresh: bool = False) -> dict[str, np.ndarray]:
    """Return the cached result of ``compute()`` for ``config``, computing and storing it if needed."""
    path = (root or cache_root()) / namespace / f"{config_key(config)}.npz"
    if not refresh:
        hit = load(path)
        if hit is not None:
            return hit
    result = {k: np.asarray(v) for k, v in compute().items()}
    save(path, result, config)
    return result
