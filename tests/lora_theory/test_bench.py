"""``lora-theory bench --quick``: every benchmark runs on tiny sizes and its checks pass (a smoke run, not a
measurement: the numbers live in BENCHMARKS.md)."""

from __future__ import annotations

from lora_theory import cli


def test_bench_quick_runs_every_benchmark(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "cache"))  # cold: the pretrainings are part of it
    assert cli.main(["bench", "--quick"]) == 0
    out = capfd.readouterr().out
    assert "fine-tuning benchmark: QUICK" in out
    assert "(b) and (c) K=1 losses equal to rtol 1e-4: p=0 True, p=0.1 True" in out
    assert "sample_loss benchmark" in out and "ratio" in out
    assert "sweep benchmark: 4 runs (QUICK" in out
    assert "small-sweep benchmark: 12 runs (QUICK" in out and "(bits equal: True" in out
    assert "gallery benchmark: lora-theory allora-prop1-ripple lowr-fig3-with-without --quick" in out
    assert "2 figures," in out and "projection (model:" in out and "32 workers" in out
    assert "bit for bit: " in out and "False" not in out.split("bit for bit: ")[1].splitlines()[0]
