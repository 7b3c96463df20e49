"""The CIFAR-10 path of the figures runs on a synthetic fixture in the official python-batch format.

allora-fig1-dropout-mc's second protocol is the paper's CIFAR-10 column (Fashion-MNIST only where CIFAR-10 is
absent): with ``--robustness`` it fine-tunes on CIFAR-10 read from the fixture (3072-dimensional inputs, its own
pretrained model) and measures; in-process (``--workers 1``), about a third of the cost of allora-fig2-grad-std,
which trains every data set with the grad_std recorder."""

from __future__ import annotations

import json
import warnings

from lora_theory.cli import main as lora_theory
from tests.toymodels.test_data import write_cifar_dir


def main(argv: list[str]) -> int:
    """``lora-theory figures ARGV``."""
    return lora_theory(["figures", *argv])


def test_quick_figure_uses_cifar10_when_present(tmp_path, monkeypatch):
    cifar_dir, _ = write_cifar_dir(tmp_path / "src", n_per_batch=1000, seed=3)
    monkeypatch.setenv("LORA_THEORY_CIFAR10", str(cifar_dir))
    monkeypatch.setenv("LORA_THEORY_DATA", str(tmp_path / "data-cache"))  # never touch the user's data cache
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))
    fig_id = "allora-fig1-dropout-mc"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's non-official size is reported by a warning
        assert main([fig_id, "--quick", "--robustness", "--workers", "1", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / f"{fig_id}.json").read_text())
    assert "cifar10" not in record["measured"]["notes"]  # found: no "missing" note for it
    second = {p["name"]: p for p in record["protocols"]}["second data set"]
    assert second["verdict"] != "unavailable", second["summary"]
    assert "cifar10" in second["summary"] and "fashion-mnist" not in second["summary"], second["summary"]
    assert second["key"], "the CIFAR-10 protocol must rest on measured numbers"
