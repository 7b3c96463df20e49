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


def check_confirmation(fig_id: str, rec: dict, frozen_hashes: dict[str, str]) -> list[str]:
    """What is wrong with a JSON's ``confirmation`` (empty: nothing): its hash is the frozen registry's, its
    declaration the frozen one, its seeds disjoint from the exploratory seeds, its verdicts those of the JSON, and
    (in a clone with the run's history) its registry commit the one that froze the hash, an ancestor of the run's
    commit and older than the run."""
    conf, bad = rec["confirmation"], []
    if conf["criteria_sha256"] != frozen_hashes.get(fig_id):
        bad.append("confirmed under a criterion that is not the frozen one (a changed rule needs new seeds)")
    state = gallery.confirmation_state(rec, gallery.frozen_entries())
    if state["state"] != gallery.CONFIRMED:
        bad.append(f"the JSON's declaration is not the frozen one: {state['differences']}")
    if set(conf["seeds"]) & set(EXPLORATORY_SEEDS) or set(conf["seeds"]) & set(rec["exploratory"]["seeds"]):
        bad.append("confirmatory seeds overlap the exploratory ones")
    if (rec["verdict"], rec["seeds"]) != (conf["verdict"], conf["seeds"]):
        bad.append("verdict / seeds differ from the JSON's top level")
    if conf["protocols"] != {p["name"]: p["verdict"] for p in rec["protocols"]}:
        bad.append("per-protocol verdicts differ from the JSON's protocols")
    reg, run = conf["registry_commit"], conf["commit"]
    if reg in ("unknown", "uncommitted"):
        return bad + ["confirmed against a registry never committed"]
    if _git("cat-file", "-e", f"{run}^{{commit}}") is not None:  # a clone with the history of the run
        if reg != frozen.freeze_commit(conf["criteria_sha256"]):
            bad.append("registry_commit is not the commit that froze its hash (`lora-theory figures --redraw`)")
        if _git("merge-base", "--is-ancestor", reg, run) is None:
            bad.append("frozen after its run's commit")
        started = dt.datetime.fromisoformat(rec["generated"]) - dt.timedelta(seconds=rec["runtime_s"])
        froze = frozen.commit_time(reg)
        if froze is None or dt.datetime.fromisoformat(froze) > started:
            bad.append("run started before the freeze (or its registry commit is unknown to git)")
    return bad


def test_the_committed_confirmations_match_the_frozen_registry_on_fresh_seeds():
    """Every committed JSON has a confirmation, and it matches the frozen registry on fresh seeds (issue 16's "done
    when"; the gallery's handling of a JSON awaiting confirmation is tested in tests/figures/test_gallery.py)."""
    frozen_hashes = frozen.hashes()
    committed = _committed()
    bad = {fig_id: why for fig_id, rec in committed.items() if "confirmation" in rec
           for why in [check_confirmation(fig_id, rec, frozen_hashes)] if why}
    assert not bad, "\n".join(f"{fig_id}: {'; '.join(why)}" for fig_id, why in bad.items())
    awaiting = sorted(i for i, rec in committed.items() if "confirmation" not in rec)
    assert not awaiting, (f"{len(awaiting)} of {len(committed)} committed figure JSONs have no confirmatory run under "
                          f"the frozen criteria: {', '.join(awaiting)}")


def test_a_confirmation_that_does_not_match_is_caught():
    """:func:`check_confirmation` on a JSON confirmed under the frozen declaration, then with each defect."""
    entries = gallery.frozen_entries()
    fig_id = "allora-fig3-norms"
    decl, sha = entries[fig_id]["declaration"], entries[fig_id]["sha256"]
    protocols = [{"name": p["name"], "protocol": p["settings"], "primary": p["primary"], "paper": p["paper"],
                  "plausible": p["plausible"], "note": p["note"], "verdict": "reproduced"} for p in decl["protocols"]]
    rec = {"id": fig_id, "claim": decl["claim"], "kind": decl["kind"], "claim_id": decl["claim_id"],
           "criterion": {**decl["criterion"], "description": "d"}, "protocols": protocols,
           "headline_protocols": decl["headline"]["protocols"], "verdict": "reproduced",
           "seeds": list(CONFIRMATORY_SEEDS), "exploratory": {"seeds": list(EXPLORATORY_SEEDS)},
           "confirmation": {"seeds": list(CONFIRMATORY_SEEDS), "criteria_sha256": sha, "verdict": "reproduced",
                            "protocols": {p["name"]: "reproduced" for p in protocols},
                            "registry_commit": "f" * 40, "commit": "e" * 40}}  # commits git does not know
    hashes = {fig_id: sha}
    assert check_confirmation(fig_id, rec, hashes) == []
    assert "not the frozen one" in check_confirmation(fig_id, rec, {fig_id: "0" * 64})[0]
    changed = {**rec, "criterion": {**rec["criterion"], "alpha": 0.1}}
    assert "declaration is not the frozen one: ['criterion']" in check_confirmation(fig_id, changed, hashes)[0]
    overlap = {**rec, "confirmation": {**rec["confirmation"], "seeds": [9, 100]}, "seeds": [9, 100]}
    assert check_confirmation(fig_id, overlap, hashes) == ["confirmatory seeds overlap the exploratory ones"]
    never = {**rec, "confirmation": {**rec["confirmation"], "registry_commit": "uncommitted"}}
    assert check_confirmation(fig_id, never, hashes) == ["confirmed against a registry never committed"]


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
