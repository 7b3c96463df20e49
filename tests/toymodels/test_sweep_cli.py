"""``lora-theory sweep`` (toymodels/sweep_cli.py): Hydra-style overrides, --dry-run, the table, resuming, and every
bad input caught before anything runs, with the key and its allowed values named."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from toymodels import config, sweep_cli

TINY = ["dataset=synthetic", "widths=[16,32,32,4]", "n_pretrain=256", "pretrain_steps=20", "n_finetune=64",
        "n_test=64", "steps=30"]


def sweep_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lora-theory sweep")
    sweep_cli.add_arguments(parser)
    return sweep_cli.run(parser.parse_args(argv))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))
    return tmp_path / "runs"


def test_overrides_expand_like_hydra():
    grid = sweep_cli.parse_overrides(["r=4,8,16", "dropout=0,0.1", "seed=range(3)", "lr=range(0.1,0.35,0.1)",
                                      "widths=[16,32,4],[16,64,4]", "scaling=none,rslora,2", "method=lora,rslora",
                                      "n_test=null", "rank_scaled_init=true"])
    assert grid["r"] == [4, 8, 16] and grid["dropout"] == [0.0, 0.1] and grid["seed"] == [0, 1, 2]
    assert grid["lr"] == pytest.approx([0.1, 0.2, 0.3])
    assert grid["widths"] == [(16, 32, 4), (16, 64, 4)]
    assert grid["scaling"] == [None, "rslora", 2.0] and grid["method"] == ["lora", "rslora"]
    assert grid["n_test"] == [None] and grid["rank_scaled_init"] == [True]


def test_configs_are_the_product_and_rslora_is_lora_with_its_scaling():
    configs = sweep_cli.build_configs(["r=4,8", "method=lora,rslora", "seed=range(2)"])
    assert len(configs) == 8
    assert configs[0] == config.FinetuneConfig(r=4, method="lora", seed=0)
    assert configs[3] == config.FinetuneConfig(r=4, method="lora", scaling="rslora", seed=1)
    assert configs[-1] == config.FinetuneConfig(r=8, method="lora", scaling="rslora", seed=1)


@pytest.mark.parametrize("override, named", [
    (["rank=4"], ["unknown key 'rank'", "did you mean", "dropout", "seed"]),
    (["r=abc"], ["r=abc", "integer"]),
    (["r=0"], ["r=0", "r must be"]),
    (["dropout=0,1.5"], ["dropout=1.5", "[0, 1)"]),
    (["method=lora,lorax"], ["method=lorax", "lora, dora, allora", "rslora"]),
    (["dataset=imagenet"], ["dataset=imagenet", "mnist, fashion-mnist, cifar10, synthetic"]),
    (["optimizer=lion"], ["optimizer", "sgd, adam, adamw"]),
    (["scaling=sqrt"], ["scaling=sqrt", "lora, rslora, a number"]),
    (["seed=range(a)"], ["seed=range(a)", "range takes numbers"]),
    (["seed=range(0)"], ["seed=range(0)", "empty"]),
    (["r=4,,8"], ["r=4,,8", "empty value"]),
    (["r=4,4"], ["repeated"]),
    (["r=4", "r=8"], ["r is given twice"]),
    (["r4"], ["'r4'", "key=value"]),
    (["widths=16"], ["widths=16", "list in brackets"]),
    (["dataset=synthetic", "widths=[16,32,4]"], ["widths=(16, 32, 4)", "targets must be"]),
    (["method=rslora", "scaling=lora"], ["method=rslora", "scaling"]),
])
def test_bad_overrides_name_the_key_and_run_nothing(override, named, capsys, cache_dir, tmp_path):
    assert sweep_command([*override, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-theory sweep: error: ")
    for text in named:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists() and not cache_dir.exists()  # nothing ran


@pytest.mark.parametrize("argv, named", [(["--workers", "0"], "--workers"), (["--executor", "dask"], "--executor"),
                                         (["--threads", "x"], "--threads")])
def test_bad_options_exit_2_naming_the_option(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        sweep_command(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err


def test_keys_lists_every_field_with_allowed_values(capsys):
    assert sweep_command(["--keys"]) == 0
    out = capsys.readouterr().out
    for f in ("dataset", "method", "r", "dropout", "seed", "widths"):
        assert f"\n{f} " in "\n" + out
    assert "rslora" in out and "fashion-mnist" in out


def test_dry_run_plans_and_runs_nothing_then_the_sweep_runs_and_resumes(tmp_path, cache_dir, capsys):
    argv = [*TINY, "seed=range(3)", "method=lora,rslora,dora", "--out", str(tmp_path / "out"), "--workers", "1",
            "--no-progress"]
    assert sweep_command([*argv, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "9 runs" in plan and "0 of 9 runs already in the run cache" in plan and "estimated time" in plan
    assert "batched, 6 runs varying seed, scaling (to run)" in plan and "sequential" in plan
    assert not cache_dir.exists() and not (tmp_path / "out").exists()

    assert sweep_command(argv) == 0
    assert "9 ok" in capsys.readouterr().out
    first = pd.read_parquet(tmp_path / "out" / "runs.parquet")
    assert len(first) == 9 and set(first["variant"]) == {"lora", "rslora", "dora"}
    assert (first["status"] == "ok").all() and first["final_test_acc"].between(0, 1).all()

    assert sweep_command([*argv, "--dry-run"]) == 0  # resumable: everything is in the run cache now
    assert "9 of 9 runs already in the run cache" in capsys.readouterr().out
    assert sweep_command(argv) == 0
    again = pd.read_parquet(tmp_path / "out" / "runs.parquet")
    np.testing.assert_array_equal(again["final_test_loss"], first["final_test_loss"])


def test_diverged_runs_are_rows_not_errors(tmp_path, cache_dir, capsys):
    assert sweep_command([*TINY, "optimizer=sgd", "lr=0.01,1e6", "--out", str(tmp_path), "--workers", "1",
                          "--no-progress"]) == 0
    assert "1 ok, 1 diverged" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "runs.csv")
    assert list(df["status"]) == ["ok", "diverged"] and df.loc[1, "diverged_step"] >= 1
