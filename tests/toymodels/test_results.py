"""The tidy results table (toymodels/results.py): its documented schema, read back with pandas alone; the summary
metrics against the history they come from; the long table rebuilds the history; failed and diverged runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from toymodels import config, loop, results, sweep

TINY = dict(dataset="synthetic", widths=(16, 32, 32, 4), n_pretrain=256, pretrain_steps=20, n_finetune=64,
            n_test=64, steps=30, record_every=10)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def swept(tmp_path, cache_dir):
    """A 4-run sweep (2 seeds x LoRA / rsLoRA) plus one that diverges (SGD at lr 1e6), with its table."""
    configs = [config.FinetuneConfig(seed=s, scaling=sc, **TINY) for s in (0, 1) for sc in (None, "rslora")]
    configs.append(config.FinetuneConfig(seed=0, optimizer="sgd", lr=1e6, **TINY))
    hists = sweep.run_sweep(configs + configs[:1], workers=1, progress=False, on_diverge="return",
                            table=tmp_path / "out")
    return configs, hists[:-1], tmp_path / "out"


def test_documented_schema_read_with_pandas_alone(swept):
    """A fresh interpreter with pandas and no project code reads both tables in both formats."""
    _, _, out = swept
    code = ("import sys, json, pandas as pd\n"
            f"d = {str(out)!r}\n"
            "r, rc = pd.read_parquet(d + '/runs.parquet'), pd.read_csv(d + '/runs.csv')\n"
            "s, sc = pd.read_parquet(d + '/steps.parquet'), pd.read_csv(d + '/steps.csv')\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('toymodels', 'analysis', 'torch')]\n"
            "print(json.dumps({'runs': list(r.columns), 'runs_csv': list(rc.columns), 'n': len(r),\n"
            "                  'steps': list(s.columns), 'steps_csv': list(sc.columns), 'ns': len(s)}))\n")
    res = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    assert res["runs"] == res["runs_csv"] == list(results.RUN_COLUMNS)
    assert res["steps"] == res["steps_csv"] == list(results.STEP_COLUMNS)
    assert res["n"] == 5  # the duplicate config is one run
    for name in ("seed", "r", "dropout", "method", "lr", "status", "reason", "tool_version", "git_commit",
                 "final_test_acc", "best_test_acc", "best_test_acc_step", "final_test_loss", "final_norm_A",
                 "final_norm_B"):
        assert name in res["runs"] and name in results.__doc__  # every column the docstring promises


def test_summary_metrics_are_the_history_s(swept):
    configs, hists, out = swept
    runs = pd.read_parquet(out / "runs.parquet")
    assert list(runs["status"]) == ["ok"] * 4 + ["diverged"]
    for cfg, hist, (_, row) in zip(configs, hists, runs.iterrows(), strict=True):
        assert row["seed"] == cfg.seed and row["run_id"] == results.run_id(cfg)
        assert row["variant"] == ("rslora" if cfg.scaling == "rslora" else "lora")
        assert row["widths"] == "[16, 32, 32, 4]" and row["lr"] == cfg.lr
        if row["status"] == "diverged":
            assert row["diverged_step"] == hist["diverged_step"][0] and "non-finite" in row["reason"]
            continue
        acc, loss = hist["test_acc"], hist["test_loss"]
        assert row["final_test_acc"] == acc[-1] and row["final_test_loss"] == loss[-1]
        assert row["best_test_acc"] == acc.max() and row["best_test_loss"] == loss.min()
        assert row["best_test_acc_step"] == hist["step"][list(acc).index(acc.max())]
        assert row["best_test_loss_step"] == hist["step"][int(np.argmin(loss))]
        assert row["final_batch_loss"] == pytest.approx(hist["batch_loss"][-10:].mean(), rel=1e-12)
        # total Frobenius norm of all A (resp. B): the norm of the concatenated per-layer norms
        assert row["final_norm_A"] == pytest.approx(np.linalg.norm(hist["norm_A"][-1]), rel=1e-12)
        assert row["final_norm_B"] == pytest.approx(np.linalg.norm(hist["norm_B"][-1]), rel=1e-12)
        assert pd.isna(row["reason"]) and pd.isna(row["diverged_step"])


def test_long_table_rebuilds_the_history(swept):
    configs, hists, out = swept
    steps = pd.read_parquet(out / "steps.parquet")
    for cfg, hist in zip(configs, hists, strict=True):
        mine = steps[steps["run_id"] == results.run_id(cfg)]
        bl = mine[mine["metric"] == "batch_loss"].sort_values("step")
        np.testing.assert_array_equal(bl["value"].to_numpy(), hist["batch_loss"])
        np.testing.assert_array_equal(bl["step"].to_numpy(), np.arange(len(hist["batch_loss"])))
        acc = mine[mine["metric"] == "test_acc"].sort_values("step")
        np.testing.assert_array_equal(acc["value"].to_numpy(), hist["test_acc"])
        np.testing.assert_array_equal(acc["step"].to_numpy(), hist["step"])
        norms = mine[mine["metric"] == "norm_B"].pivot(index="step", columns="layer", values="value")
        np.testing.assert_array_equal(norms.to_numpy(), hist["norm_B"])


def test_failed_run_row_has_its_reason_and_no_metrics(tmp_path, cache_dir):
    ok = config.FinetuneConfig(seed=0, **TINY)
    bad = ok.replace(seed=1)
    hist = loop.finetune(ok)
    runs, steps = results.tables([ok, bad], {ok: hist}, {bad: "worker died (exit code 3)"})
    results.write_tables(tmp_path / "t", runs, steps)
    df = pd.read_csv(tmp_path / "t" / "runs.csv")
    assert list(df["status"]) == ["ok", "failed"]
    assert df.loc[1, "reason"] == "worker died (exit code 3)"
    assert df.loc[1, list(results.METRIC_COLUMNS)].isna().all()
    assert set(pd.read_csv(tmp_path / "t" / "steps.csv")["run_id"]) == {results.run_id(ok)}


def test_failed_task_of_a_sweep_is_in_the_table_before_the_error(tmp_path, cache_dir, monkeypatch):
    """A task that still fails after its retries (here: the worker exits) is a 'failed' row, written before
    SweepError is raised; the other runs are 'ok'."""
    from toymodels import cache as run_cache

    good = config.FinetuneConfig(seed=0, **TINY)
    dead = config.FinetuneConfig(seed=1, method="dora", **TINY)  # a sequential task of its own
    monkeypatch.setenv(sweep.KILL_HOOK, run_cache.config_key(dead.as_dict()))
    with pytest.raises(sweep.SweepError):
        sweep.run_sweep([good, dead], workers=2, retries=0, progress=False, batched=False, table=tmp_path / "t")
    df = pd.read_parquet(tmp_path / "t" / "runs.parquet")
    assert list(df["status"]) == ["ok", "failed"] and "exit" in df.loc[1, "reason"].lower()
