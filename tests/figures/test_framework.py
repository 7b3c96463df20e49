"""figures.framework, figures.registry, figures.gallery and the --redraw path of figures.cli: a figure file's
skeleton, the seed fan-out of its runs, the one reading of a diverged run, the draw numbers' round trip through
the JSON, and redrawing without training."""

from __future__ import annotations

import ast
import inspect
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest

from figures import framework, registry
from figures.criteria import Criterion, Rule, Test
from figures.framework import Context, Measurement, Probe, Protocol, Runs, Unavailable, run_figure, spec_of
from lora_theory.cli import main as lora_theory
from toymodels.config import FinetuneConfig


def main(argv: list[str]) -> int:
    """``lora-theory figures ARGV``."""
    return lora_theory(["figures", *argv])


TINY = dict(dataset="synthetic", widths=(8, 12, 12, 4), n_pretrain=64, n_finetune=32, n_test=64, pretrain_steps=4,
            steps=4, batch_size=16, record_every=2, recorders=("loss",))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


def _module(**parts) -> types.ModuleType:
    """A figure module built in memory: a closed form by default (no runs)."""
    mod = types.ModuleType("figures.fake")
    mod.ID, mod.PAPER, mod.CLAIM = "rslora-fig2-loss-vs-rank", "paper", "claim"
    mod.KIND, mod.CLAIM_ID = "claim", mod.ID
    mod.CRITERION = Criterion(tests=(Test("gap", "gap", "greater"),), rule=Rule(reproduced=("gap",)))
    mod.PROTOCOLS = (Protocol("a", {"x": 1.0}, primary=True), Protocol("b", {"x": -1.0}))
    mod.configs = lambda ctx: {}

    def measure(ctx, runs):
        x = ctx.settings["x"]
        return Measurement(samples={"gap": x + np.array([0.1, -0.1, 0.2, 0.0])}, measured={"x": x}, summary="s",
                           draw={"curve": np.array([1.0, math.nan, math.inf]), "x": np.float64(x)})

    mod.measure = measure
    mod.draw = lambda numbers: numbers  # the test reads what draw received
    for k, v in parts.items():
        setattr(mod, k, v)
    return mod


def test_spec_of_checks_the_skeleton():
    spec = spec_of(_module())
    assert spec.id == "rslora-fig2-loss-vs-rank" and spec.configs is not None and spec.draw is not None
    bad = _module()
    del bad.draw
    with pytest.raises(ValueError, match="draw"):
        spec_of(bad)
    with pytest.raises(ValueError, match="primary"):
        spec_of(_module(PROTOCOLS=(Protocol("a"), Protocol("b"))))


def test_run_figure_draws_from_the_numbers_as_saved():
    res = run_figure(spec_of(_module()), Context(fidelity="quick", seeds=(0, 1), robustness=True))
    assert [p["verdict"] for p in res.protocols] == ["reproduced", "not reproduced"]
    # draw got the JSON round trip: NaN -> None, inf -> "inf", numpy scalars -> floats; the Result keeps them
    assert res.figure == {"curve": [1.0, None, "inf"], "x": 1.0} == res.draw
    np.testing.assert_array_equal(framework.floats(res.draw["curve"]), [1.0, math.nan, math.inf])
    assert res.headline == "a"


def test_unavailable_from_configs_makes_that_protocol_unavailable():
    def configs(ctx):
        if ctx.settings["x"] < 0:
            raise Unavailable("no second data set here")
        return {}

    res = run_figure(spec_of(_module(configs=configs)), Context(fidelity="quick", seeds=(0,), robustness=True))
    assert [p["verdict"] for p in res.protocols] == ["reproduced", "unavailable"]
    assert res.protocols[1]["summary"] == "no second data set here"


class _Steps(Probe):
    prefix = "probe_"

    def measure(self, state):
        return {"b_norm": float(state.layers[-1].lora_B.detach().norm())}


def test_sweep_fans_out_seeds_and_first_seed_only_runs():
    cfg = FinetuneConfig(**TINY)
    ctx = Context(fidelity="quick", seeds=(3, 5), workers=1)
    out = framework.sweep(ctx, {"plain": cfg, "probe": Runs(cfg.replace(dropout=0.1), callbacks=(_Steps([4]),),
                                                                     first_seed_only=True)})
    assert [len(out["plain"]), len(out["probe"])] == [2, 1]
    from toymodels.loop import finetune

    # the same runs as direct calls: the two seeds form one batched task, and the batched engine equals the loop up
    # to float rounding (toymodels/batched.py; 1 ulp here), far below the gap between the two seeds
    direct = [finetune(cfg.replace(seed=seed))["test_loss"] for seed in (3, 5)]
    assert np.max(np.abs(direct[0] - direct[1])) > 1e-4
    for want, hist in zip(direct, out["plain"], strict=True):
        np.testing.assert_allclose(hist["test_loss"], want, rtol=1e-6, atol=0)
    assert _Steps.of(out["probe"][0])["step"].tolist() == [4] and not framework.diverged(out["plain"][0])
    assert framework.final(out["plain"][0], "test_loss") == out["plain"][0]["test_loss"][-1]
    assert math.isnan(framework.final({"diverged_step": 2, "test_loss": np.array([1.0])}, "test_loss"))


def test_probe_cache_name_replaces_the_class_path_in_the_key():
    class Moved(_Steps):
        cache_name = "figures.old_module._Steps"

    assert Moved([1]).full_key()["callback"] == "figures.old_module._Steps"
    assert _Steps([1]).full_key()["callback"].endswith("test_framework._Steps")
    assert {k: v for k, v in Moved([1]).full_key().items() if k != "callback"} == \
        {k: v for k, v in _Steps([1]).full_key().items() if k != "callback"}


def _figure_files() -> list[Path]:
    return [Path(inspect.getfile(m)) for m in registry.FIGURES]


def test_every_figure_file_has_the_skeleton_in_order_and_at_most_250_lines():
    order = ["ID", "PAPER", "CLAIM", "CRITERION", "PROTOCOLS", "configs", "measure", "draw"]
    for path in _figure_files():
        lines = path.read_text().splitlines()
        assert len(lines) <= 250, f"{path}: {len(lines)} lines"
        tree = ast.parse("\n".join(lines))
        where = {}
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        where.setdefault(t.id, node.lineno)
            elif isinstance(node, ast.FunctionDef):
                where.setdefault(node.name, node.lineno)
        assert all(k in where for k in order), (path, [k for k in order if k not in where])
        assert [where[k] for k in order] == sorted(where[k] for k in order), f"{path}: skeleton out of order"
        assert path.stem.replace("_", "-") == registry.specs()[_id_of(path)].id.split("-", 1)[1]


def _id_of(path: Path) -> str:
    return f"{path.parent.name}-{path.stem.replace('_', '-')}"


def test_registry_lists_each_figure_file_once_in_the_contract_order():
    ids = [m.ID for m in registry.FIGURES]
    assert len(set(ids)) == len(ids) and set(ids) <= set(registry.FIGURE_IDS)
    assert list(registry.specs()) == list(registry.FIGURE_IDS)


def test_redraw_rebuilds_png_and_gallery_from_the_json_without_training(tmp_path, monkeypatch, capsys):
    fig_id = "allora-fig6-adaptive-fn"
    assert main([fig_id, "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"{fig_id}.json").read_text())
    assert record["draw"]["x"] and set(record["draw"]["f"]) == {"1", "2", "4"}
    (tmp_path / f"{fig_id}.png").unlink()
    (tmp_path / "README.md").unlink()
    monkeypatch.setattr(framework, "sweep", lambda *a, **k: pytest.fail("--redraw must not train"))
    assert main(["--redraw", fig_id, "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{fig_id}.png").stat().st_size > 1000 and fig_id in (tmp_path / "README.md").read_text()
    del record["draw"]
    (tmp_path / f"{fig_id}.json").write_text(json.dumps(record))
    assert main(["--redraw", fig_id, "--out", str(tmp_path)]) == 1
    assert "no draw numbers" in capsys.readouterr().err


# ---------------------------------------------------------------- the headline-protocol policy (issue 16 item 4)

def test_headline_is_the_papers_protocol_or_the_plausible_ones():
    from figures.framework import headline_protocols

    paper = (Protocol("a", primary=True, paper=True), Protocol("b"))
    assert [p.name for p in headline_protocols(paper)] == ["a"]
    plaus = (Protocol("sgd", primary=True, plausible=True), Protocol("adam", plausible=True), Protocol("lr x3"))
    assert [p.name for p in headline_protocols(plaus)] == ["sgd", "adam"]
    assert [p.name for p in headline_protocols((Protocol("x", primary=True), Protocol("y")))] == ["x"]


def test_combined_verdict_holds_under_all_none_or_some():
    from figures.framework import combine_verdicts

    assert combine_verdicts(["reproduced", "reproduced"]) == "reproduced"
    assert combine_verdicts(["not reproduced", "not reproduced"]) == "not reproduced"
    assert combine_verdicts(["reproduced", "not reproduced"]) == "partially reproduced"
    assert combine_verdicts(["partially reproduced", "partially reproduced"]) == "partially reproduced"
    assert combine_verdicts(["not reproduced", "partially reproduced"]) == "partially reproduced"
    assert combine_verdicts(["reproduced", "unavailable"]) == "unavailable"
    with pytest.raises(ValueError, match="verdicts"):
        combine_verdicts([])
    with pytest.raises(ValueError, match="verdicts"):
        combine_verdicts(["holds"])


@pytest.mark.parametrize("marks, match", [
    # (primary: paper, plausible), (other: plausible), ...
    (((True, False), (True,)), "plausible although the paper states"),
    (((False, False), (True,), (True,)), "primary protocol 'p0' must be one of the plausible"),
    (((False, True),), "single plausible"),
])
def test_check_protocols_refuses_inconsistent_marks(marks, match):
    from figures.framework import check_protocols

    (paper, plausible), *others = marks
    prots = (Protocol("p0", primary=True, paper=paper, plausible=plausible),
             *(Protocol(f"p{i}", plausible=o[0]) for i, o in enumerate(others, 1)), Protocol("extra"))
    with pytest.raises(ValueError, match=match):
        check_protocols(prots)


def test_run_figure_combines_the_plausible_protocols():
    from figures.framework import Spec

    crit = Criterion(tests=(Test("x", "a value per seed", "greater", margin=0.0, margin_from="theory",
                                 why="constructed"),), rule=Rule(reproduced=("x",)))
    values = {"sgd": [1.0, 1.1, 0.9, 1.2], "adam": [-1.0, -1.1, -0.9, -1.2], "lr x3": [1.0, 1.1, 0.9, 1.2]}
    spec = Spec("toy", "paper", "claim", crit,
                (Protocol("sgd", primary=True, plausible=True, note="n"), Protocol("adam", plausible=True, note="n"),
                 Protocol("lr x3")),
                configs=lambda ctx: {},
                measure=lambda ctx, runs: Measurement(samples={"x": values[ctx.protocol.name]}, summary="s"),
                draw=lambda numbers: None)
    full = run_figure(spec, Context(robustness=True))
    assert full.verdict == "partially reproduced"  # holds under SGD, not under Adam
    assert full.headline_protocols == ["sgd", "adam"] and full.headline_complete
    first = run_figure(spec, Context(robustness=False))
    assert first.verdict == "reproduced" and not first.headline_complete and "First look" in first.summary
    values["adam"] = values["sgd"]
    assert run_figure(spec, Context(robustness=True)).verdict == "reproduced"
