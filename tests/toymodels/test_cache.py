"""toymodels.cache: atomic, checksummed, keyed by the full configuration; corrupt entries are recomputed."""

from __future__ import annotations

import numpy as np
import pytest

from toymodels import cache


def test_round_trip_and_hit(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"loss": np.arange(5.0), "acc": np.array([0.5])}

    cfg = {"r": 8, "p": 0.1, "seed": 0}
    a = cache.cached("runs", cfg, compute, root=tmp_path)
    b = cache.cached("runs", cfg, compute, root=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(a["loss"], b["loss"])
    cache.cached("runs", {**cfg, "seed": 1}, compute, root=tmp_path)
    assert len(calls) == 2


def test_key_is_order_independent_and_sensitive():
    assert cache.config_key({"a": 1, "b": 2}) == cache.config_key({"b": 2, "a": 1})
    assert cache.config_key({"a": 1, "b": 2}) != cache.config_key({"a": 1, "b": 3})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        cache.config_key({"f": object()})


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_entry_is_detected_and_recomputed(tmp_path, damage):
    cfg = {"x": 1}
    cache.cached("runs", cfg, lambda: {"v": np.ones(1000)}, root=tmp_path)
    path = tmp_path / "runs" / f"{cache.config_key(cfg)}.npz"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        # flip a byte inside the stored array data (npz is an uncompressed zip: payload bytes are verbatim)
        pos = bytes(raw).find(np.ones(1000).tobytes()[:64]) + 100
        raw[pos] ^= 0xFF
        path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="recomputing"):
        out = cache.cached("runs", cfg, lambda: {"v": np.full(1000, 2.0)}, root=tmp_path)
    assert out["v"][0] == 2.0
    assert cache.load(path)["v"][0] == 2.0


def test_interrupted_write_leaves_no_entry(tmp_path):
    class Boom(Exception):
        pass

    def compute():
        raise Boom

    with pytest.raises(Boom):
        cache.cached("runs", {"k": 1}, compute, root=tmp_path)
    assert not list((tmp_path).rglob("*.npz"))


def test_env_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == tmp_path / "c"


def test_atomic_write_bytes_replaces_whole_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    cache.atomic_write_bytes(target, b"old")  # creates the directory
    assert target.read_bytes() == b"old"

    class Boom(Exception):
        pass

    def failing(f):
        f.write(b"half")
        raise Boom

    with pytest.raises(Boom):
        cache.atomic_write(target, failing)
    assert target.read_bytes() == b"old"  # the old file stays whole
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # no temporary left behind


def test_concurrent_writers_never_show_a_partial_file(tmp_path):
    """Two writers replace one file with different 64 KiB payloads while a reader reads it: every read is one
    payload, whole (the reader never sees a mix or a truncated file)."""
    import threading

    target = tmp_path / "entry.bin"
    size = 1 << 16
    cache.atomic_write_bytes(target, b"a" * size)
    stop = threading.Event()
    bad = []

    def writer(byte):
        for _ in range(25):
            cache.atomic_write_bytes(target, byte * size)

    def reader():
        while not stop.is_set():
            data = target.read_bytes()
            if len(data) != size or data.count(data[:1]) != size:
                bad.append(len(data))

    threads = [threading.Thread(target=writer, args=(b,)) for b in (b"a", b"b")]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert bad == []
    assert target.read_bytes() in (b"a" * size, b"b" * size)
    assert not list(tmp_path.glob("*.tmp"))


def test_one_cache_directory_for_runs_and_data(monkeypatch, tmp_path):
    """The toolkit's cache directory is defined once (cache.toolkit_dir): the runs under runs/, the data sets in it;
    each moves with its own variable."""
    from toymodels import cache, data

    monkeypatch.delenv("LORA_THEORY_CACHE", raising=False)
    monkeypatch.delenv("LORA_THEORY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.toolkit_dir() == tmp_path / "lora-theory"
    assert cache.cache_root() == tmp_path / "lora-theory" / "runs"
    assert data.cache_dir() == tmp_path / "lora-theory"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "lora-theory" / "runs"
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))
    monkeypatch.setenv("LORA_THEORY_DATA", str(tmp_path / "data"))
    assert (cache.cache_root(), data.cache_dir()) == (tmp_path / "runs", tmp_path / "data")
