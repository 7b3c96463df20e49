"""The gallery from the JSONs (issue 16 items 5, 7): the tally counts each claim once from the confirmatory verdicts
(exploratory beside, checks never), the claims x protocols picture, Methods (headline policy, confidence level,
pre-registration with the registry's commit, recalibrations), and README.md's "What the toolkit found" block
generated from the JSONs (the committed block equals the generated one)."""

from __future__ import annotations

import json

import pytest

from figures import gallery, registry
from figures.criteria import CONFIDENCE_STATEMENT
from figures.framework import HEADLINE_POLICY

REG, RUN = "a" * 40, "b" * 40


def _protocols(verdicts: dict[str, str]) -> list[dict]:
    return [{"name": n, "verdict": v, "primary": i == 0, "plausible": True, "protocol": {}, "key": {}}
            for i, (n, v) in enumerate(verdicts.items())]


def _record(fid: str, kind: str, cid: str, conf: dict | None, explo: dict, paper: str = "P fig. 1") -> dict:
    """A figure JSON: with ``conf`` (protocol -> verdict) a confirmed one (top level confirmatory, ``exploratory``
    beside), else a JSON with the exploratory run at its top level."""
    from figures.framework import combine_verdicts

    base = {"id": fid, "paper": paper, "claim": "c", "kind": kind, "claim_id": cid, "summary": "s", "measured": {},
            "datasets": [], "fidelity": "default", "device": "cpu", "config": {}, "runtime_s": 1.0, "image": None,
            "criterion": {"description": "d", "recalibrations": [{"old": "old rule", "new": "new rule",
                                                                  "why": "a reason"}]},
            "headline_protocols": list(explo)}
    ex = {"seeds": list(range(10)), "verdict": combine_verdicts(list(explo.values())), "summary": "explo",
          "protocols": _protocols(explo)}
    if conf is None:
        return {**base, **ex}
    return {**base, "seeds": list(range(100, 110)), "verdict": combine_verdicts(list(conf.values())),
            "protocols": _protocols(conf), "exploratory": ex,
            "confirmation": {"seeds": list(range(100, 110)), "registry_commit": REG, "commit": RUN,
                             "verdict": combine_verdicts(list(conf.values()))}}


RECORDS = [
    _record("x-one", "claim", "one", {"sgd": "reproduced", "adam": "not reproduced"},
            {"sgd": "reproduced", "adam": "reproduced"}),
    _record("x-two", "claim", "two", {"sgd": "reproduced", "adam": "reproduced"},
            {"sgd": "not reproduced", "adam": "not reproduced"}),
    _record("x-two-b", "claim", "two", {"sgd": "reproduced", "adam": "reproduced"},
            {"sgd": "reproduced", "adam": "reproduced"}),
    _record("x-hyp", "hypothesis", "hyp", {"sgd": "reproduced", "adam": "reproduced"},
            {"sgd": "reproduced", "adam": "reproduced"}),
    _record("x-check", "check", "chk", {"exact": "reproduced"}, {"exact": "reproduced"}),
]


def test_runs_of_reads_both_layouts():
    confirmed = gallery.runs_of(RECORDS[0])
    assert confirmed["confirmatory"]["seeds"] == list(range(100, 110))
    assert confirmed["confirmatory"]["verdict"] == "partially reproduced"
    assert confirmed["exploratory"]["verdict"] == "reproduced"
    first_look = gallery.runs_of(_record("y", "claim", "y", None, {"sgd": "not reproduced"}))
    assert first_look["confirmatory"] is None and first_look["exploratory"]["verdict"] == "not reproduced"


def test_tally_counts_claims_once_from_the_confirmatory_verdicts_exploratory_beside():
    conf = gallery.claim_tally(RECORDS, "confirmatory")
    explo = gallery.claim_tally(RECORDS, "exploratory")
    assert set(conf) == set(explo) == {"one", "two", "hyp"}  # the check is never counted, "two" once
    assert conf["one"]["verdict"] == "partially reproduced" and explo["one"]["verdict"] == "reproduced"
    assert conf["two"]["verdict"] == "reproduced" and explo["two"]["verdict"] == "not reproduced"  # the weakest
    assert conf["hyp"]["stated_verdict"] == "supported"
    text = gallery._tally(RECORDS)[0]
    assert text.startswith("**Tally: 3 paper claims**")
    assert "confirmatory (seeds 100-109" in text and "reproduced 1, partially reproduced 1, supported 1" in text
    assert "Exploratory (seeds 0-9" in text and "reproduced 1, not reproduced 1, supported 1" in text
    with pytest.raises(ValueError, match="seed_set"):
        gallery.claim_tally(RECORDS, "lucky")


def test_overview_rows_are_claims_by_protocols_on_both_seed_sets():
    rows = gallery.overview_rows(RECORDS)
    assert [r["id"] for r in rows] == ["x-one", "x-two", "x-two-b", "x-hyp"]
    one = rows[0]
    assert one["headline_protocols"] == ["sgd", "adam"]
    assert one["headline"] == {"confirmatory": "partially reproduced", "exploratory": "reproduced"}
    assert one["protocols"] == [("sgd", {"confirmatory": "reproduced", "exploratory": "reproduced"}),
                                ("adam", {"confirmatory": "not reproduced", "exploratory": "reproduced"})]
    first_look = gallery.overview_rows([_record("y", "claim", "y", None, {"sgd": "reproduced"})])[0]
    assert first_look["protocols"] == [("sgd", {"confirmatory": None, "exploratory": "reproduced"})]


def _write(tmp_path, records, monkeypatch):
    monkeypatch.setattr(registry, "FIGURE_IDS", tuple(r["id"] for r in records))
    for r in records:
        (tmp_path / f"{r['id']}.json").write_text(json.dumps(r))
    return gallery.write_gallery(tmp_path).read_text()


def test_gallery_page_picture_and_methods(tmp_path, monkeypatch):
    text = _write(tmp_path, RECORDS, monkeypatch)
    assert (tmp_path / gallery.OVERVIEW_PNG).stat().st_size > 10_000
    top = text.split("### Claims and hypotheses")[0]
    assert f"![verdict per claim and protocol]({gallery.OVERVIEW_PNG})" in top and "**Tally: 3 paper claims**" in top
    row = next(line for line in text.splitlines() if line.startswith("| [x-one]"))
    assert "| **partially reproduced** | reproduced |" in row
    methods = text.split("## Methods")[1]
    assert HEADLINE_POLICY in methods and CONFIDENCE_STATEMENT in methods
    assert f"Registry commit(s): `{REG}` (5 figures)" in methods and f"`{RUN}`" in methods
    assert "[x-one](#x-one) reproduced -> partially reproduced" in methods
    assert "| [x-one](#x-one) | old rule | new rule | a reason |" in methods  # recalibrations kept
    unconfirmed = [_record(r["id"], r["kind"], r["claim_id"], None, {p["name"]: p["verdict"]
                                                                     for p in r["exploratory"]["protocols"]})
                   for r in RECORDS]
    text = _write(tmp_path, unconfirmed, monkeypatch)
    assert "no confirmatory run in these JSONs yet" in text and "No confirmatory run in these JSONs yet" in text


def test_findings_say_the_tally_and_where_plausible_protocols_disagree():
    text = gallery.findings(RECORDS)
    assert text.startswith("**3 paper claims** (each counted once; 1 check that cannot fail listed apart)")
    assert "confirmatory seeds (100-109)" in text and "reproduced 1, partially reproduced 1, supported 1" in text
    assert "partially reproduced: [one](figures/README.md#x-one) (holds under sgd; not under adam)" in text
    assert "[two](figures/README.md#x-two)" in text and "x-two-b" not in text  # one claim, linked once


def test_write_findings_replaces_only_the_block(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FIGURE_IDS", tuple(r["id"] for r in RECORDS))
    for r in RECORDS:
        (tmp_path / f"{r['id']}.json").write_text(json.dumps(r))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gallery.FINDINGS_BEGIN}\nstale 42\n{gallery.FINDINGS_END}\nrest\n")
    gallery.write_findings(tmp_path, readme)
    assert readme.read_text() == f"intro\n{gallery.findings_block(RECORDS)}\nrest\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        gallery.write_findings(tmp_path, readme)


def test_the_committed_readme_findings_are_generated_from_the_committed_jsons():
    text = gallery.README.read_text()
    block = text[text.index(gallery.FINDINGS_BEGIN):text.index(gallery.FINDINGS_END) + len(gallery.FINDINGS_END)]
    assert block == gallery.findings_block(gallery._load_records(gallery.DEFAULT_OUT)), \
        "README.md's findings are stale: `lora-theory figures --redraw` regenerates them"
