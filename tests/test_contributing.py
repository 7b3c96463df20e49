"""CONTRIBUTING.md names only what exists: every file path and every dotted name of the package it cites."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("analysis", "toymodels", "figures", "diagnose", "lora_theory")


def _cited() -> list[str]:
    return re.findall(r"`([^`]+)`", (ROOT / "CONTRIBUTING.md").read_text())


def test_cited_files_exist():
    paths = [c for c in _cited() if re.fullmatch(r"[\w/.-]+\.(py|md)", c) and "<" not in c]
    assert paths, "CONTRIBUTING.md cites no file"
    assert [p for p in paths if not (ROOT / p).exists()] == []


def test_cited_dotted_names_resolve():
    names = {m.group(1) for c in _cited() for m in [re.match(r"([\w.]+)(\(.*\))?$", c)]
             if m and "." in m.group(1) and m.group(1).split(".")[0] in PACKAGES}
    assert len(names) > 10
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for k in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:k]))
            except ModuleNotFoundError:
                continue
            try:
                for attr in parts[k:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert missing == []
