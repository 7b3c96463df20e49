"""figures.cli's plan of a run (issue 16 item 8): the time estimate of the progress bar, read from the runtimes the
JSONs in --out record and scaled to this run's protocols, seed sets and seeds; where a thinner run writes."""

from __future__ import annotations

import json

import pytest

from figures import cli, registry


def _json(out, fig_id, runtime, n_protocols, confirmed, n_seeds=10, fidelity="default"):
    rec = {"id": fig_id, "runtime_s": runtime, "fidelity": fidelity, "seeds": list(range(n_seeds)),
           "protocols": [{"name": f"p{i}"} for i in range(n_protocols)]}
    if confirmed:
        rec["confirmation"] = {}
    (out / f"{fig_id}.json").write_text(json.dumps(rec))


def test_estimates_scale_the_recorded_runtimes(tmp_path):
    specs = registry.specs()
    a, b, c = "allora-fig3-norms", "allora-fig5-escape", "rslora-multilayer"
    _json(tmp_path, a, 80.0, 4, confirmed=True)  # 80 s for 4 protocols x 2 seed sets x 10 seeds: 1 s per unit
    _json(tmp_path, b, 30.0, 1, confirmed=False)  # a first look: 3 s per seed
    est = cli._estimates([a, b, c], specs, tmp_path, "default", 10, confirm=True)
    assert est[a] == pytest.approx(1.0 * len(specs[a].protocols) * 2 * 10)
    assert est[b] == pytest.approx(3.0 * len(specs[b].protocols) * 2 * 10)
    assert est[c] == pytest.approx(2.0 * len(specs[c].protocols) * 2 * 10)  # no JSON: the median unit cost
    first = cli._estimates([a], specs, tmp_path, "default", 5, confirm=False)
    assert first[a] == pytest.approx(1.0 * 1 * 1 * 5)
    assert cli._estimates([a], specs, tmp_path, "quick", 2, confirm=False)[a] == pytest.approx(
        cli._GUESS_S["quick"])  # another fidelity: a guess


def test_a_thinner_run_never_replaces_a_fuller_json(tmp_path):
    fid = "allora-fig3-norms"
    assert cli._target(tmp_path, fid, "default", complete=False) == tmp_path  # nothing there yet
    _json(tmp_path, fid, 1.0, 4, confirmed=True)
    assert cli._target(tmp_path, fid, "default", complete=True) == tmp_path
    assert cli._target(tmp_path, fid, "default", complete=False) == tmp_path / cli.FIRST_LOOK
    assert cli._target(tmp_path, fid, "quick", complete=True) == tmp_path / cli.FIRST_LOOK
    _json(tmp_path, fid, 1.0, 6, confirmed=False)  # a JSON of the robustness grid without confirmation
    assert cli._target(tmp_path, fid, "default", complete=False) == tmp_path / cli.FIRST_LOOK
    _json(tmp_path, fid, 1.0, 1, confirmed=False)  # a first look: replaced by another
    assert cli._target(tmp_path, fid, "default", complete=False) == tmp_path
