"""Numbers in prose that cannot go stale: anchors in Markdown checked against their sources.

A number that ERRATA.md, README.md or a notebook's Markdown quotes from a ``lora-theory verify`` row or from a
figure's JSON carries, right after it, an HTML comment (invisible when rendered) naming its source::

    the penalties are 12140 <!-- = verify("dropout", "D5 penalty, bottleneck") --> (bottleneck) ...
    1.13 [1.07, 1.19] <!-- = fig("allora-fig5-escape", "measured.sgd.ratio", "ci_low", "ci_high") -->

The comment holds a Python expression; its value (a number, or a tuple of k numbers) is compared with the k numbers
printed just before the comment (after the previous anchor), each within the precision it is printed with (half a
unit of its last digit: ``0.959`` within 5e-4, ``4062`` within 0.5, ``6e-16`` within 5e-17). Names available in the
expression:

- ``verify(topic, substring)``: the measured value of the one row of ``lora-theory verify <topic>`` (seed 0) whose
  check text contains ``substring``;
- ``fig(figure_id, path, *more)``: the value at the dotted ``path`` of ``figures/<figure_id>.json`` (list indices
  are numbers, ``name=adam lr x1`` picks the element whose ``name`` is that); each further name is a sibling key of the last one (``"ci_low"``), so an
  interval needs one anchor;
- ``math``, ``np`` (numpy), ``max``, ``min``, ``abs``; nothing else (no other builtins, no imports): a number
  worth quoting gets a verify row.

:func:`check_text` returns one :class:`Mismatch` per anchor whose printed numbers disagree with its source (or whose
expression fails); ``tests/analysis/test_prose_numbers.py`` runs it on ERRATA.md, README.md and every notebook.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

ANCHOR = re.compile(r"(?<!`)<!--\s*=\s*(?P<expr>.*?)\s*-->", re.S)
# a printed number: digits, optional decimals and exponent, a minus sign only right before a digit; not the tail of a
# word, of a dotted number or of a power (x2, 3.1.2, 10^6)
NUMBER = re.compile(r"(?<![\w.^])(?:-(?=\d))?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Mismatch:
    """One anchor whose printed number(s) differ from its source beyond the printed precision."""

    source: str
    line: int
    expr: str
    printed: tuple[str, ...]
    value: tuple[float, ...] | None
    why: str

    def __str__(self) -> str:
        got = "n/a" if self.value is None else ", ".join(f"{v:.6g}" for v in self.value)
        return f"{self.source}:{self.line}: printed {', '.join(self.printed) or '(nothing)'} vs {got} from " \
               f"`{self.expr}`: {self.why}"


def printed_tolerance(token: str) -> float:
    """Half a unit of the last printed digit of ``token`` (``"0.959"`` -> 5e-4, ``"4062"`` -> 0.5, ``"6e-16"`` ->
    5e-17, ``"1.5e3"`` -> 50)."""
    d = Decimal(token.lstrip("+-"))
    return float(Decimal(5) * Decimal(10) ** (d.as_tuple().exponent - 1))


def numbers_before(text: str) -> list[str]:
    """The numbers printed in ``text`` (tokens, in order)."""
    return [m.group(0) for m in NUMBER.finditer(text)]


class Sources:
    """Memoised access to verify rows (one run per topic, seed 0) and figure JSONs."""

    def __init__(self, root: Path = ROOT, seed: int = 0):
        self.root = Path(root)
        self.seed = seed
        self._rows: dict[str, list] = {}
        self._json: dict[str, dict] = {}

    def rows(self, topic: str) -> list:
        if topic not in self._rows:
            from analysis import verify as v

            self._rows[topic] = list(v.run([topic], seed=self.seed))
        return self._rows[topic]

    def verify(self, topic: str, substring: str) -> float:
        hits = [r for r in self.rows(topic) if substring in r.check]
        if len(hits) != 1:
            raise ValueError(f"substring {substring!r} matches {len(hits)} rows of verify topic {topic!r} (need 1)")
        return hits[0].value if hits[0].value is not None else float(hits[0].measured)

    def fig(self, figure_id: str, path: str, *more: str):
        if figure_id not in self._json:
            self._json[figure_id] = json.loads((self.root / "figures" / f"{figure_id}.json").read_text())
        node, parent = self._json[figure_id], None
        for key in path.split("."):
            parent = node
            if isinstance(node, list) and "=" in key:  # the element whose field equals the value
                field, want = key.split("=", 1)
                hits = [e for e in node if isinstance(e, dict) and str(e.get(field)) == want]
                if len(hits) != 1:
                    raise KeyError(f"{figure_id}.json: {len(hits)} elements with {field} = {want!r} (need 1)")
                node = hits[0]
            else:
                node = node[int(key)] if isinstance(node, list) else node[key]
        if not more:
            return node
        return (node, *(parent[k] for k in more))

    def namespace(self) -> dict[str, Callable]:
        return {"verify": self.verify, "fig": self.fig, "math": math, "np": np, "max": max, "min": min, "abs": abs}


def _as_values(value) -> tuple[float, ...]:
    if isinstance(value, tuple | list | np.ndarray):
        return tuple(float(v) for v in np.asarray(value, dtype=np.float64).ravel())
    return (float(value),)


def check_text(text: str, source: str, sources: Sources) -> tuple[list[Mismatch], int]:
    """Check every anchor of ``text`` (named ``source`` in messages); return (mismatches, number of anchors)."""
    out, start, n = [], 0, 0
    for m in ANCHOR.finditer(text):
        n += 1
        line = text.count("\n", 0, m.start()) + 1
        expr = m.group("expr")
        before = numbers_before(text[start:m.start()])
        start = m.end()
        try:
            values = _as_values(eval(expr, {"__builtins__": {}}, sources.namespace()))  # noqa: S307 (our own docs)
        except Exception as exc:  # a broken anchor is a failure, named
            out.append(Mismatch(source, line, expr, tuple(before[-1:]), None, f"{type(exc).__name__}: {exc}"))
            continue
        printed = tuple(before[-len(values):]) if len(before) >= len(values) else tuple(before)
        if len(printed) < len(values):
            out.append(Mismatch(source, line, expr, printed, values, f"needs {len(values)} printed numbers before it"))
            continue
        bad = [(p, v) for p, v in zip(printed, values, strict=True)
               if not (math.isfinite(v) and abs(float(p) - v) <= printed_tolerance(p) * (1 + 1e-9))]
        if bad:
            out.append(Mismatch(source, line, expr, printed, values,
                                "; ".join(f"{p} is not {v:.6g} to its printed precision" for p, v in bad)))
    return out, n


def markdown_of_notebook(path: Path) -> str:
    """The Markdown cells of a notebook, joined (code cells are checked by running them)."""
    cells = json.loads(Path(path).read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def documents(root: Path = ROOT) -> Iterable[tuple[str, str]]:
    """(name, Markdown text) of ERRATA.md, README.md and every notebook's Markdown."""
    for name in ("ERRATA.md", "README.md"):
        yield name, (root / name).read_text()
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        yield f"notebooks/{nb.name}", markdown_of_notebook(nb)
