"""Claim kinds (issue 16 item 1): every figure declares KIND and CLAIM_ID, the JSON carries them, hypotheses read
supported / inconclusive / not supported, and the gallery's tally counts each paper claim once, checks never."""

import json

import pytest

from figures import registry
from figures.framework import KINDS, Spec, claim_verdict, stated_verdict
from figures.gallery import claim_tally, write_gallery

CHECKS = {"allora-fig6-adaptive-fn", "allora-prop1-ripple", "lowr-prop41-equivalent"}


def test_every_figure_declares_a_kind_and_a_claim_id():
    specs = registry.specs()
    assert {s.kind for s in specs.values()} <= set(KINDS)
    assert {i for i, s in specs.items() if s.kind == "check"} == CHECKS
    assert specs["allora-regularization-like-dropout"].kind == "hypothesis"
    assert specs["allora-tab5-dropout-epochs"].claim_id == specs["allora-tab5-best-epoch"].claim_id
    assert specs["allora-fig3-norms"].claim_id == "allora-fig3-norms"


def test_spec_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        Spec("x", "p", "c", None, (), None, None, None, kind="evidence")


def test_stated_verdicts_per_kind():
    assert stated_verdict("claim", "partially reproduced") == "partially reproduced"
    assert [stated_verdict("hypothesis", v) for v in ("reproduced", "partially reproduced", "not reproduced")] == [
        "supported", "inconclusive", "not supported"]
    assert stated_verdict("check", "reproduced") == "holds" and stated_verdict("check", "not reproduced") == "fails"
    with pytest.raises(ValueError, match="kind"):
        stated_verdict("theorem", "reproduced")


def test_a_claim_of_several_figures_gets_the_weakest_verdict():
    assert claim_verdict(["reproduced", "partially reproduced"]) == "partially reproduced"
    assert claim_verdict(["not reproduced", "reproduced"]) == "not reproduced"
    assert claim_verdict(["unavailable", "reproduced"]) == "reproduced"
    assert claim_verdict(["unavailable"]) == "unavailable"


def _rec(fid, kind, cid, verdict):
    return {"id": fid, "kind": kind, "claim_id": cid, "verdict": verdict}


def test_tally_counts_each_claim_once_and_no_check():
    recs = [_rec("a", "claim", "t5", "reproduced"), _rec("b", "claim", "t5", "partially reproduced"),
            _rec("c", "check", "c", "reproduced"), _rec("d", "hypothesis", "d", "reproduced")]
    tally = claim_tally(recs)
    assert set(tally) == {"t5", "d"}
    assert tally["t5"]["verdict"] == "partially reproduced" and tally["t5"]["figures"] == ["a", "b"]
    assert tally["d"]["stated_verdict"] == "supported"
    with pytest.raises(ValueError, match="kinds"):
        claim_tally([_rec("a", "claim", "x", "reproduced"), _rec("b", "hypothesis", "x", "reproduced")])


def test_committed_jsons_carry_the_kind_and_the_gallery_tally(tmp_path):
    from figures.gallery import DEFAULT_OUT
    figs = DEFAULT_OUT
    specs = registry.specs()
    for fid, spec in specs.items():
        rec = json.loads((figs / f"{fid}.json").read_text())
        assert (rec["kind"], rec["claim_id"]) == (spec.kind, spec.claim_id), fid
        assert rec["stated_verdict"] == stated_verdict(spec.kind, rec["verdict"]), fid
        (tmp_path / f"{fid}.json").write_text(json.dumps(rec))
    text = write_gallery(tmp_path).read_text()  # judged against the package's figures/FROZEN.json
    n_claims = len({s.claim_id for s in specs.values() if s.kind != "check"})
    assert f"{n_claims} paper claims confirmed" in text.split("\n\n")[2]
    top = text.split("### Checks")[0]
    assert not any(f"[{c}]" in top for c in CHECKS)
