"""Every registered figure runs in --quick mode (into a temporary directory) and writes a complete JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import figures
from figures import VERDICTS, frozen, registry
from figures.gallery import OVERVIEW_PNG
from lora_theory.cli import main as lora_theory


def main(argv: list[str]) -> int:
    """``lora-theory figures ARGV``."""
    return lora_theory(["figures", *argv])


REQUIRED = {"id", "paper", "claim", "verdict", "summary", "measured", "datasets", "seeds", "fidelity", "config",
            "runtime_s", "image"}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # quick runs must never pollute (or read) the user's run cache
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path_factory.getbasetemp() / "runs"))


@pytest.mark.parametrize("fig_id", list(figures.specs()))
def test_quick_figure_writes_png_json(fig_id, tmp_path):
    assert main([fig_id, "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"{fig_id}.json").read_text())
    assert REQUIRED <= set(record)
    assert record["verdict"] in VERDICTS
    assert record["fidelity"] == "quick"
    assert record["summary"]
    # every protocol, on the exploratory seeds and then on the confirmatory ones (the headline)
    assert record["exploratory"]["seeds"] == [0, 1] and record["seeds"] == record["confirmation"]["seeds"] == [100, 101]
    assert record["confirmation"]["verdict"] == record["verdict"]
    assert len(record["protocols"]) == len(figures.specs()[fig_id].protocols)
    if record["verdict"] != "unavailable":
        assert record["measured"], "a verdict must rest on measured numbers"
        assert (tmp_path / f"{fig_id}.png").stat().st_size > 1000
    else:
        assert "error" not in record["measured"], record["summary"]
    gallery = (tmp_path / "README.md").read_text()
    assert fig_id in gallery and record["verdict"] in gallery


def test_list_and_bad_ids(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for fig_id in figures.specs():
        assert fig_id in out
    assert main(["no-such-figure"]) == 2
    assert "no-such-figure" in capsys.readouterr().err


def test_every_contract_id_is_registered():
    """The registry's ids are the committed gallery's (one JSON and one PNG per figure; besides them only the frozen
    registry of the criteria and the gallery's overview picture)."""
    gallery = Path(figures.__file__).parent
    assert list(figures.specs()) == list(registry.FIGURE_IDS)
    others = {frozen.REGISTRY.name, OVERVIEW_PNG}
    assert sorted(registry.FIGURE_IDS) == sorted(p.stem for p in gallery.glob("*.json") if p.name not in others)
    assert sorted(registry.FIGURE_IDS) == sorted(p.stem for p in gallery.glob("*.png") if p.name not in others)
