"""The CIFAR-10 path of the figures runs on a synthetic fixture in the official python-batch format."""

from __future__ import annotations

import json
import warnings

from figures.cli import main
from tests.toymodels.test_data import write_cifar_dir


def test_quick_figure_uses_cifar10_when_present(tmp_path, monkeypatch):
    cifar_dir, _ = write_cifar_dir(tmp_path / "src", n_per_batch=1000, seed=3)
    monkeypatch.setenv("LORA_THEORY_CIFAR10", str(cifar_dir))
    monkeypatch.setenv("LORA_THEORY_DATA", str(tmp_path / "data-cache"))  # never touch the user's data cache
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's non-official size is reported by a warning
        assert main(["allora-fig2-grad-std", "--quick", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "allora-fig2-grad-std.json").read_text())
    assert "cifar10" in record["datasets"], record["summary"]
    assert record["verdict"] != "unavailable"
