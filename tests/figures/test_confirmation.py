"""The confirmation (issue 16 items 7, 8): a figure run measures every protocol on the exploratory seeds and then on
the confirmatory seeds, and writes one JSON whose headline is the confirmatory verdict (the exploratory one beside it)
with a ``confirmation`` block (seeds, the hash of the frozen declaration, commits, verdicts); the committed JSONs'
confirmations match the frozen registry on seeds disjoint from the exploratory ones; ``--primary`` (a first look)
never replaces a fuller JSON."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import types

import numpy as np
import pytest

from figures import frozen, gallery, registry
from figures.criteria import Criterion, Rule, Test
from figures.framework import CONFIRMATORY_SEEDS, EXPLORATORY_SEEDS, Context, Measurement, Protocol, spec_of
from lora_theory.cli import main as lora_theory


def main(argv: list[str]) -> int:
    return lora_theory(["figures", *argv])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


def _fake_spec():
    """A closed-form figure whose claim holds on the confirmatory seeds (>= 100) and fails on the exploratory ones
    under protocol "a", and fails everywhere under "b"; draw returns its numbers."""
    mod = types.ModuleType("figures.fake")
    mod.ID, mod.PAPER, mod.CLAIM, mod.KIND, mod.CLAIM_ID = "fake-fig", "paper", "claim", "claim", "fake-fig"
    mod.CRITERION = Criterion(tests=(Test("gap", "gap", "greater"),), rule=Rule(reproduced=("gap",)))
    mod.PROTOCOLS = (Protocol("a", {"x": 1.0}, primary=True), Protocol("b", {"x": -1.0}))
    mod.configs = lambda ctx: {}

    def measure(ctx, runs):
        sign = 1.0 if min(ctx.seeds) >= 100 and ctx.settings["x"] > 0 else -1.0
        return Measurement(samples={"gap": sign + np.array([0.1, -0.1, 0.2, 0.0])}, measured={"sign": sign},
                           summary=f"sign {sign}", draw={"first_seed": ctx.seeds[0], "set": ctx.seed_set})

    mod.measure = measure
    mod.draw = lambda numbers: None
    return spec_of(mod)


def test_regenerate_writes_the_confirmatory_headline_with_the_exploratory_run_beside(tmp_path, monkeypatch):
    spec = _fake_spec()
    monkeypatch.setattr(registry, "specs", lambda: {spec.id: spec})
    ctx = Context(fidelity="quick", seeds=(0, 1), robustness=True)
    rec = gallery.regenerate(spec.id, ctx, tmp_path, confirmatory=(100, 101), commit="c0ffee")
    assert rec == json.loads((tmp_path / "fake-fig.json").read_text())
    assert (rec["verdict"], rec["seeds"], rec["seed_set"]) == ("reproduced", [100, 101], "confirmatory")
    assert rec["draw"] == {"first_seed": 100, "set": "confirmatory"}  # the draw numbers: the confirmatory primary
    assert [p["verdict"] for p in rec["protocols"]] == ["reproduced", "not reproduced"]
    explo = rec["exploratory"]
    assert (explo["seeds"], explo["verdict"], explo["headline"]) == ([0, 1], "not reproduced", "a")
    assert [p["verdict"] for p in explo["protocols"]] == ["not reproduced", "not reproduced"]
    conf = rec["confirmation"]
    assert conf["seeds"] == [100, 101] and conf["commit"] == "c0ffee"
    assert conf["criteria_sha256"] == frozen.criteria_sha256(spec)
    assert conf["verdict"] == rec["verdict"] and conf["protocols"] == {"a": "reproduced", "b": "not reproduced"}
    assert conf["registry_commit"]
    with pytest.raises(ValueError, match="disjoint"):
        gallery.regenerate(spec.id, ctx, tmp_path, confirmatory=(1, 100))
    first = gallery.regenerate(spec.id, ctx, tmp_path / "first")  # a first look: exploratory only
    assert "confirmation" not in first and "exploratory" not in first
    assert (first["seed_set"], first["seeds"], first["verdict"]) == ("exploratory", [0, 1], "not reproduced")


def test_the_seed_sets_are_disjoint():
    assert EXPLORATORY_SEEDS == tuple(range(10)) and CONFIRMATORY_SEEDS == tuple(range(100, 110))
    assert not set(EXPLORATORY_SEEDS) & set(CONFIRMATORY_SEEDS)
    with pytest.raises(ValueError, match="seed_set"):
        Context(seed_set="lucky")


def test_primary_never_replaces_a_fuller_json(tmp_path, capsys):
    fig_id, out = "allora-fig6-adaptive-fn", tmp_path / "out"
    assert main([fig_id, "--quick", "--out", str(out)]) == 0  # the full run: every protocol, both seed sets
    full = (out / f"{fig_id}.json").read_bytes()
    rec = json.loads(full)
    assert rec["confirmation"]["seeds"] == list(CONFIRMATORY_SEEDS[:2]) and rec["exploratory"]["seeds"] == [0, 1]
    capsys.readouterr()
    assert main([fig_id, "--quick", "--primary", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert (out / f"{fig_id}.json").read_bytes() == full
    first = json.loads((out / "first-look" / f"{fig_id}.json").read_text())
    assert "confirmation" not in first and str(out / "first-look") in said
    assert (out / "first-look" / "README.md").exists()
    # a full run replaces a first look in place
    assert main([fig_id, "--quick", "--primary", "--out", str(tmp_path / "fresh")]) == 0
    assert main([fig_id, "--quick", "--out", str(tmp_path / "fresh")]) == 0
    assert "confirmation" in json.loads((tmp_path / "fresh" / f"{fig_id}.json").read_text())
    assert not (tmp_path / "fresh" / "first-look").exists()


def _committed() -> dict[str, dict]:
    return {i: json.loads((gallery.DEFAULT_OUT / f"{i}.json").read_text()) for i in registry.FIGURE_IDS}


def _git(*args: str) -> str | None:
    res = subprocess.run(["git", *args], cwd=gallery.DEFAULT_OUT, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


# Until the gallery is regenerated after the freeze no committed JSON has a confirmation; once one has, every one must.
@pytest.mark.skipif(not any("confirmation" in r for r in _committed().values()), reason="no committed JSON has a confirmation yet: the regeneration after the freeze writes them")  # noqa: E501
def test_the_committed_confirmations_match_the_frozen_registry_on_fresh_seeds():
    frozen_hashes = frozen.hashes()
    for fig_id, rec in _committed().items():
        conf = rec.get("confirmation")
        assert conf, f"{fig_id}.json has no confirmation"
        assert conf["criteria_sha256"] == frozen_hashes[fig_id], \
            f"{fig_id}: confirmed under a criterion that is not the frozen one (a changed rule needs new seeds)"
        assert not set(conf["seeds"]) & set(EXPLORATORY_SEEDS), f"{fig_id}: confirmatory seeds overlap 0-9"
        assert not set(conf["seeds"]) & set(rec["exploratory"]["seeds"]), fig_id
        assert (rec["verdict"], rec["seeds"]) == (conf["verdict"], conf["seeds"]), fig_id
        assert conf["protocols"] == {p["name"]: p["verdict"] for p in rec["protocols"]}, fig_id
        reg, run = conf["registry_commit"], conf["commit"]
        assert reg not in ("unknown", "uncommitted"), f"{fig_id}: confirmed against a registry never committed"
        if _git("cat-file", "-e", f"{run}^{{commit}}") is not None:  # a clone with the history of the run
            assert reg == frozen.freeze_commit(conf["criteria_sha256"]), f"{fig_id}: not the commit that froze it"
            assert _git("merge-base", "--is-ancestor", reg, run) is not None, f"{fig_id}: frozen after its run's commit"
            started = dt.datetime.fromisoformat(rec["generated"]) - dt.timedelta(seconds=rec["runtime_s"])
            assert dt.datetime.fromisoformat(frozen.commit_time(reg)) <= started, f"{fig_id}: run before the freeze"


def test_freeze_commit_names_the_commit_that_froze_a_declaration():
    if frozen.head_commit() == "unknown":
        pytest.skip("not a git checkout")
    assert frozen.freeze_commit("0" * 64) == "uncommitted"
    committed = _git("show", "HEAD:figures/FROZEN.json")
    if committed is None:
        pytest.skip("no committed registry yet")
    for fig_id, entry in list(json.loads(committed)["figures"].items())[:3]:
        commit = frozen.freeze_commit(entry["sha256"])
        assert entry["sha256"] in _git("show", f"{commit}:figures/FROZEN.json"), fig_id
        before = _git("show", f"{commit}^:figures/FROZEN.json") or ""
        assert entry["sha256"] not in before, fig_id


def test_redraw_sets_the_registry_commit_to_the_one_that_froze_the_hash(tmp_path):
    committed = _git("show", "HEAD:figures/FROZEN.json")
    if frozen.head_commit() == "unknown" or committed is None:
        pytest.skip("no committed registry in a git checkout")
    fig_id, entry = next(iter(json.loads(committed)["figures"].items()))
    spec = registry.specs()[fig_id]
    rec = {"id": fig_id, "paper": spec.paper, "claim": spec.claim, "verdict": "reproduced",
           "confirmation": {"criteria_sha256": entry["sha256"], "registry_commit": "a later freeze"}}
    (tmp_path / f"{fig_id}.json").write_text(json.dumps(rec))
    assert "no draw numbers" in gallery.redraw(spec, tmp_path)
    fixed = json.loads((tmp_path / f"{fig_id}.json").read_text())["confirmation"]
    assert fixed == {"criteria_sha256": entry["sha256"], "registry_commit": frozen.freeze_commit(entry["sha256"])}
