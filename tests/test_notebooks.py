"""Every notebook in notebooks/ runs top to bottom (nbclient) and is stored without outputs.

Notebooks call only the public API, so they double as living documentation; a notebook that errors fails the
suite. The run cache is isolated per session so notebooks never read or pollute the user's cache.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nb-runs"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them (jupyter nbconvert --clear-output)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, cache_env, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", cache_env)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
