"""The gallery from the JSONs (issue 16 items 5, 7): the tally counts each claim once from the confirmatory verdicts
(exploratory beside, checks never), and only the claims confirmed so far: a JSON without a confirmation under the
frozen declaration (figures/FROZEN.json) awaits confirmation, its old verdict marked superseded and counted nowhere
(gallery, picture, README findings); the claims x protocols picture, Methods (headline policy, confidence level,
pre-registration with the registry's commit, recalibrations), and README.md's "What the toolkit found" block
generated from the JSONs (the committed block equals the generated one)."""

from __future__ import annotations

import json
import shutil

import pytest

from figures import frozen, gallery, registry
from figures.criteria import CONFIDENCE_STATEMENT
from figures.framework import HEADLINE_POLICY, combine_verdicts

REG, RUN = "a" * 40, "b" * 40


def _protocols(verdicts: dict[str, str]) -> list[dict]:
    return [{"name": n, "verdict": v, "primary": i == 0, "paper": False, "plausible": True, "protocol": {},
             "note": "", "key": {}} for i, (n, v) in enumerate(verdicts.items())]


def _declaration(rec: dict) -> dict:
    """The frozen declaration a figure JSON was made under (what figures.frozen.declaration states for its spec)."""
    return {"id": rec["id"], "kind": rec["kind"], "claim_id": rec["claim_id"], "claim": rec["claim"],
            "criterion": {k: v for k, v in rec["criterion"].items() if k != "description"},
            "protocols": [{"name": p["name"], "settings": p["protocol"], "primary": p["primary"], "paper": p["paper"],
                           "plausible": p["plausible"], "note": p["note"]} for p in rec["protocols"]],
            "headline": {"rule": "plausible", "protocols": rec["headline_protocols"]}}


def _entries(records: list[dict]) -> dict[str, dict]:
    """A frozen registry whose declarations are those the records were made under."""
    return {r["id"]: {"sha256": frozen.sha256(_declaration(r)), "declaration": _declaration(r)} for r in records}


def _record(fid: str, kind: str, cid: str, conf: dict | None, explo: dict, paper: str = "P fig. 1") -> dict:
    """A figure JSON: with ``conf`` (protocol -> verdict) a confirmed one (top level confirmatory, ``exploratory``
    beside; its hash is that of the declaration :func:`_declaration` reads from it), else a JSON with the exploratory
    run at its top level."""
    base = {"id": fid, "paper": paper, "claim": "c", "kind": kind, "claim_id": cid, "summary": "s", "measured": {},
            "datasets": [], "fidelity": "default", "device": "cpu", "config": {}, "runtime_s": 1.0, "image": None,
            "criterion": {"description": "d", "recalibrations": [{"old": "old rule", "new": "new rule",
                                                                  "why": "a reason"}]},
            "headline_protocols": list(explo)}
    ex = {"seeds": list(range(10)), "verdict": combine_verdicts(list(explo.values())), "summary": "explo",
          "protocols": _protocols(explo)}
    if conf is None:
        return {**base, **ex}
    rec = {**base, "seeds": list(range(100, 110)), "verdict": combine_verdicts(list(conf.values())),
           "protocols": _protocols(conf), "exploratory": ex}
    rec["confirmation"] = {"seeds": list(range(100, 110)), "registry_commit": REG, "commit": RUN,
                           "criteria_sha256": frozen.sha256(_declaration(rec)),
                           "verdict": combine_verdicts(list(conf.values()))}
    return rec


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


ENTRIES = _entries(RECORDS)


def _superseded(rec: dict) -> dict:
    """``rec`` as an old JSON: no confirmation, exploratory run at the top level, a margin other than the frozen
    one (written before the freeze)."""
    old = _record(rec["id"], rec["kind"], rec["claim_id"], None,
                  {p["name"]: p["verdict"] for p in rec["exploratory"]["protocols"]}, rec["paper"])
    old["criterion"] = {**old["criterion"], "tests": [{"name": "gap", "margin": 0.0}]}
    return old


def test_confirmation_state_against_the_frozen_declaration():
    rec = RECORDS[0]
    assert gallery.confirmation_state(rec, ENTRIES) == {"state": "confirmed", "text": "confirmed",
                                                        "superseded": False, "differences": []}
    old = gallery.confirmation_state(_superseded(rec), ENTRIES)
    assert (old["state"], old["superseded"], old["differences"]) == ("predates", True, ["criterion"])
    assert old["text"] == "awaiting confirmation: JSON predates the frozen criteria"
    first_look = _record(rec["id"], "claim", "one", None, {"sgd": "reproduced", "adam": "reproduced"})
    state = gallery.confirmation_state(first_look, _entries([first_look]))
    assert (state["state"], state["superseded"]) == ("exploratory only", False)
    wrong_hash = {**rec, "confirmation": {**rec["confirmation"], "criteria_sha256": "0" * 64}}
    assert gallery.confirmation_state(wrong_hash, ENTRIES)["differences"] == ["hash"]
    assert gallery.confirmation_state(wrong_hash, ENTRIES)["state"] == "other criterion"
    for changed in ({"claim": "another claim"}, {"headline_protocols": ["sgd"]},
                    {"protocols": [{**rec["protocols"][0], "protocol": {"lr": 1.0}}, rec["protocols"][1]]},
                    {"criterion": {**rec["criterion"], "alpha": 0.1}}):
        state = gallery.confirmation_state({**rec, **changed}, ENTRIES)  # the hash alone would not catch these
        assert (state["state"], state["superseded"]) == ("other criterion", True), changed
    # a rendering is not a declaration: the criterion's prose may change
    assert gallery.confirmation_state({**rec, "criterion": {**rec["criterion"], "description": "new prose"}},
                                      ENTRIES)["state"] == "confirmed"
    assert gallery.confirmation_state(rec, {})["state"] == "not frozen"


def test_tally_counts_claims_once_from_the_confirmatory_verdicts_exploratory_beside():
    conf = gallery.claim_tally(RECORDS, "confirmatory", ENTRIES)
    explo = gallery.claim_tally(RECORDS, "exploratory", ENTRIES)
    assert set(conf) == set(explo) == {"one", "two", "hyp"}  # the check is never counted, "two" once
    assert conf["one"]["verdict"] == "partially reproduced" and explo["one"]["verdict"] == "reproduced"
    assert conf["two"]["verdict"] == "reproduced" and explo["two"]["verdict"] == "not reproduced"  # the weakest
    assert conf["hyp"]["stated_verdict"] == "supported"
    assert gallery.awaiting_claims(RECORDS, ENTRIES) == {}
    text = gallery._tally(RECORDS, ENTRIES)[0]
    assert text.startswith("**Tally: all 3 paper claims confirmed**")
    assert "confirmatory seeds (100-109" in text and "reproduced 1, partially reproduced 1, supported 1" in text
    assert "exploratory seeds (0-9" in text and "reproduced 1, not reproduced 1, supported 1" in text
    with pytest.raises(ValueError, match="seed_set"):
        gallery.claim_tally(RECORDS, "lucky")


# the mix of a regeneration in progress: x-one confirmed, x-two-b's JSON predates the freeze (so claim "two" of
# x-two + x-two-b awaits although x-two is confirmed), x-hyp an exploratory run under the frozen criteria
MIX = [RECORDS[0], RECORDS[1], _superseded(RECORDS[2]),
       _record("x-hyp", "hypothesis", "hyp", None, {"sgd": "not reproduced", "adam": "not reproduced"}), RECORDS[4]]
MIX_ENTRIES = {**ENTRIES, "x-hyp": _entries([MIX[3]])["x-hyp"]}


def test_only_confirmed_claims_are_counted_in_a_mix():
    states = {r["id"]: gallery.confirmation_state(r, MIX_ENTRIES)["state"] for r in MIX}
    assert states == {"x-one": "confirmed", "x-two": "confirmed", "x-two-b": "predates",
                      "x-hyp": "exploratory only", "x-check": "confirmed"}
    for seed_set in ("confirmatory", "exploratory"):
        assert set(gallery.claim_tally(MIX, seed_set, MIX_ENTRIES)) == {"one"}  # "two" waits for x-two-b
    waiting = gallery.awaiting_claims(MIX, MIX_ENTRIES)
    assert waiting == {"two": {"kind": "claim", "figures": ["x-two", "x-two-b"], "awaiting": {"x-two-b": "predates"},
                               "superseded": True},
                       "hyp": {"kind": "hypothesis", "figures": ["x-hyp"], "awaiting": {"x-hyp": "exploratory only"},
                               "superseded": False}}
    assert set(gallery.claim_tally(MIX)) == {"one", "two", "hyp"}  # seed_set None: every headline, unjudged
    text = gallery._tally(MIX, MIX_ENTRIES)[0]
    assert text.startswith("**Tally: 1 of 3 paper claims confirmed so far; 2 awaiting confirmation**")
    assert "(100-109, run after the criteria were frozen): partially reproduced 1;" in text
    assert "(0-9, the seeds the criteria were written on), beside it: reproduced 1." in text
    assert "JSON predates the frozen criteria: [two](#x-two-b)" in text
    assert "exploratory run only, under the frozen criteria: [hyp](#x-hyp)" in text
    rows = {r["id"]: r for r in gallery.overview_rows(MIX, MIX_ENTRIES)}
    assert rows["x-two-b"]["headline"] == {"confirmatory": None, "exploratory": None}  # superseded: not drawn
    assert rows["x-two-b"]["protocols"] == [("sgd", {"confirmatory": None, "exploratory": None}),
                                            ("adam", {"confirmatory": None, "exploratory": None})]
    assert rows["x-two-b"]["label"].endswith("(awaiting: superseded JSON)") and rows["x-one"]["state"] == "confirmed"
    assert rows["x-hyp"]["headline"] == {"confirmatory": None, "exploratory": "not reproduced"}


def test_overview_rows_are_claims_by_protocols_on_both_seed_sets():
    rows = gallery.overview_rows(RECORDS, ENTRIES)
    assert [r["id"] for r in rows] == ["x-one", "x-two", "x-two-b", "x-hyp"]
    one = rows[0]
    assert one["headline_protocols"] == ["sgd", "adam"]
    assert one["headline"] == {"confirmatory": "partially reproduced", "exploratory": "reproduced"}
    assert one["protocols"] == [("sgd", {"confirmatory": "reproduced", "exploratory": "reproduced"}),
                                ("adam", {"confirmatory": "not reproduced", "exploratory": "reproduced"})]
    first_look = _record("y", "claim", "y", None, {"sgd": "reproduced"})
    row = gallery.overview_rows([first_look], _entries([first_look]))[0]
    assert row["protocols"] == [("sgd", {"confirmatory": None, "exploratory": "reproduced"})]
    assert row["state"] == "exploratory only"


def _write(tmp_path, records, monkeypatch, entries=None):
    """The gallery of ``records`` in ``tmp_path`` judged against the registry ``entries`` (FROZEN.json there)."""
    monkeypatch.setattr(registry, "FIGURE_IDS", tuple(r["id"] for r in records))
    for r in records:
        (tmp_path / f"{r['id']}.json").write_text(json.dumps(r))
    entries = _entries(records) if entries is None else entries
    (tmp_path / "FROZEN.json").write_text(frozen.render({"about": "test", "figures": entries}))
    return gallery.write_gallery(tmp_path).read_text()


def test_gallery_page_picture_and_methods(tmp_path, monkeypatch):
    text = _write(tmp_path, RECORDS, monkeypatch)
    assert (tmp_path / gallery.OVERVIEW_PNG).stat().st_size > 10_000
    top = text.split("### Claims and hypotheses")[0]
    assert f"![verdict per claim and protocol]({gallery.OVERVIEW_PNG})" in top
    assert "**Tally: all 3 paper claims confirmed**" in top
    row = next(line for line in text.splitlines() if line.startswith("| [x-one]"))
    assert "| **partially reproduced** | reproduced |" in row
    methods = text.split("## Methods")[1]
    assert HEADLINE_POLICY in methods and CONFIDENCE_STATEMENT in methods
    assert f"Registry commit(s): `{REG}` (5 figures)" in methods and f"`{RUN}`" in methods
    assert "[x-one](#x-one) reproduced -> partially reproduced" in methods
    assert "| [x-one](#x-one) | old rule | new rule | a reason |" in methods  # recalibrations kept
    unconfirmed = [_superseded(r) for r in RECORDS]
    text = _write(tmp_path, unconfirmed, monkeypatch, ENTRIES)
    assert "**Tally: 0 of 3 paper claims confirmed so far; 3 awaiting confirmation**" in text
    assert "No claim is confirmed yet" in text and "every figure awaits confirmation" in text


def test_gallery_page_of_a_mix_marks_old_verdicts_superseded(tmp_path, monkeypatch):
    text = _write(tmp_path, MIX, monkeypatch, MIX_ENTRIES)
    assert "**Tally: 1 of 3 paper claims confirmed so far; 2 awaiting confirmation**" in text
    row = next(line for line in text.splitlines() if line.startswith("| [x-two-b]"))
    assert "| awaiting confirmation: JSON predates the frozen criteria | ~~reproduced~~ (exploratory) " \
           "superseded | superseded |" in row
    row = next(line for line in text.splitlines() if line.startswith("| [x-hyp]"))
    assert "| awaiting confirmation: exploratory run only, under the frozen criteria | not supported | not run |" \
        in row
    section = text.split("## x-two-b")[1].split("\n## ")[0]
    assert "**Awaiting confirmation: JSON predates the frozen criteria** (differs in: criterion)" in section
    assert "~~reproduced~~ (superseded)" in section and "**Criterion in this JSON (superseded" in section
    assert "| ~~reproduced~~ |" in section and "under the superseded criteria (not counted)" in section
    methods = text.split("## Methods")[1]
    assert "Confirmed 3 of 5 figures" in methods and f"`{REG}` (3 figures)" in methods
    assert "Awaiting confirmation (2 figures): JSON predates the frozen criteria: [x-two-b](#x-two-b); " \
           "exploratory run only, under the frozen criteria: [x-hyp](#x-hyp)." in methods
    assert "x-two-b](#x-two-b) reproduced ->" not in methods  # moved verdicts: confirmed figures only


def test_findings_say_the_tally_and_where_plausible_protocols_disagree():
    text = gallery.findings(RECORDS, entries=ENTRIES)
    assert text.startswith("**All 3 paper claims confirmed** (each claim counted "
                           "once; 1 check that cannot fail listed apart)")
    assert "confirmatory seeds (100-109" in text and "reproduced 1, partially reproduced 1, supported 1" in text
    assert "partially reproduced: [one](figures/README.md#x-one) (holds under sgd; not under adam)" in text
    assert "[two](figures/README.md#x-two)" in text and "x-two-b" not in text  # one claim, linked once


def test_findings_of_a_mix_name_the_awaiting_claims_without_a_verdict():
    text = gallery.findings(MIX, entries=MIX_ENTRIES)
    assert text.startswith("**1 of 3 paper claims confirmed so far; 2 awaiting confirmation**")
    assert text.endswith("- **P**: partially reproduced: [one](figures/README.md#x-one) (holds under sgd; not under "
                         "adam); awaiting confirmation: [two](figures/README.md#x-two-b), [hyp](figures/README.md#x-hyp).")
    assert "supported" not in text and "not reproduced 1" not in text  # no old or exploratory-only verdict
    nothing = gallery.findings([_superseded(r) for r in RECORDS], entries=ENTRIES)
    assert nothing.startswith("**0 of 3 paper claims confirmed so far; 3 awaiting confirmation**")
    assert "No claim is confirmed yet" in nothing and "reproduced" not in nothing


def test_write_findings_replaces_only_the_block(tmp_path, monkeypatch):
    _write(tmp_path, RECORDS, monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gallery.FINDINGS_BEGIN}\nstale 42\n{gallery.FINDINGS_END}\nrest\n")
    gallery.write_findings(tmp_path, readme)
    assert readme.read_text() == f"intro\n{gallery.findings_block(RECORDS, ENTRIES)}\nrest\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        gallery.write_findings(tmp_path, readme)


def test_the_committed_readme_findings_are_generated_from_the_committed_jsons():
    text = gallery.README.read_text()
    block = text[text.index(gallery.FINDINGS_BEGIN):text.index(gallery.FINDINGS_END) + len(gallery.FINDINGS_END)]
    assert block == gallery.findings_block(gallery._load_records(gallery.DEFAULT_OUT)), \
        "README.md's findings are stale: `lora-theory figures --redraw` regenerates them"


def _confirmed_from_registry(fig_id: str, verdict: str, entries: dict[str, dict]) -> dict:
    """A JSON of figure ``fig_id`` confirmed under its frozen declaration, every protocol with ``verdict``."""
    decl = entries[fig_id]["declaration"]
    old = json.loads((gallery.DEFAULT_OUT / f"{fig_id}.json").read_text())
    protocols = [{"name": p["name"], "protocol": p["settings"], "primary": p["primary"], "paper": p["paper"],
                  "plausible": p["plausible"], "note": p["note"], "verdict": verdict, "key": {}}
                 for p in decl["protocols"]]
    run = {"seeds": list(range(10)), "verdict": verdict, "summary": "explo", "protocols": protocols}
    return {**old, "claim": decl["claim"], "kind": decl["kind"], "claim_id": decl["claim_id"],
            "criterion": {**decl["criterion"], "description": "d"}, "protocols": protocols, "verdict": verdict,
            "stated_verdict": verdict, "headline_protocols": decl["headline"]["protocols"],
            "seeds": list(range(100, 110)), "exploratory": run,
            "confirmation": {"seeds": list(range(100, 110)), "criteria_sha256": entries[fig_id]["sha256"],
                             "registry_commit": REG, "commit": RUN, "verdict": verdict}}


def test_the_committed_gallery_with_some_figures_confirmed(tmp_path):
    """The state of a regeneration in progress, on the real registry: the committed JSONs with two replaced by
    confirmed ones; one of them (allora-tab5-best-epoch) shares its claim with a figure still awaiting."""
    shutil.copytree(gallery.DEFAULT_OUT, tmp_path / "figures",
                    ignore=lambda _, names: [n for n in names if not n.endswith(".json")])  # JSONs + FROZEN.json
    out = tmp_path / "figures"
    entries = gallery.frozen_entries(out)
    assert set(entries) == set(registry.FIGURE_IDS)
    for path in out.glob("*.json"):  # whatever is committed: no confirmation (then every figure awaits) ...
        rec = json.loads(path.read_text())
        if rec.pop("confirmation", None) is not None:
            path.write_text(json.dumps(rec))
    # ... but these two
    for fig_id in ("allora-fig3-norms", "allora-tab5-best-epoch"):
        (out / f"{fig_id}.json").write_text(json.dumps(_confirmed_from_registry(fig_id, "reproduced", entries)))
    records = gallery._load_records(out)
    states = {r["id"]: gallery.confirmation_state(r, entries)["state"] for r in records}
    assert {i for i, s in states.items() if s == "confirmed"} == {"allora-fig3-norms", "allora-tab5-best-epoch"}
    n = len({r["claim_id"] for r in records if r["kind"] != "check"})
    text = gallery.write_gallery(out).read_text()
    assert f"**Tally: 1 of {n} paper claims confirmed so far; {n - 1} awaiting confirmation**" in text
    assert "on the confirmatory seeds (100-109, run after the criteria were frozen): reproduced 1;" in text
    assert "[allora-tab5](#allora-tab5-dropout-epochs)" in text.split("### Claims")[0]  # awaits its other figure
    readme = tmp_path / "README.md"
    readme.write_text(gallery.README.read_text())
    gallery.write_findings(out, readme)
    block = readme.read_text().split(gallery.FINDINGS_BEGIN)[1].split(gallery.FINDINGS_END)[0]
    assert f"**1 of {n} paper claims confirmed so far; {n - 1} awaiting confirmation**" in block
    assert "reproduced: [allora-fig3-norms](figures/README.md#allora-fig3-norms); awaiting confirmation: " in block
    assert "partially reproduced" not in block and "not reproduced" not in block  # no old verdict as a finding
