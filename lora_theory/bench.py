"""The ``lora-theory bench`` command: the benchmarks of the source checkout (``benchmarks/``), with their numbers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "run the speed benchmarks (fine-tuning engines, Monte-Carlo sampler, sweeps) and print their numbers"
DESCRIPTION = (
    "Time the fine-tuning engines side by side (a DataLoader with PEFT, the training loop, the batched engine, "
    "torch.func), the Monte-Carlo loss sampler against a plain loop, and a sweep of 64 runs in every executor, "
    "and print each table with the machine and its load. The benchmarks live in the source checkout, next to "
    "this package; BENCHMARKS.md records their numbers. With --quick every benchmark runs on tiny sizes in "
    "seconds: a smoke run that checks they work, not a measurement."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and no Ray start-up: checks in seconds that every benchmark runs")


def checkout() -> Path:
    """The folder holding ``benchmarks/`` in a source checkout (the parent of this package)."""
    return Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> int:
    root = checkout()
    if not (root / "benchmarks" / "__init__.py").is_file():
        print(f"lora-theory bench: the benchmarks live in the source checkout (benchmarks/ next to lora_theory/), "
              f"which is not there ({root}); clone the repository and run it from there (pip install -e .)",
              file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import run_all  # type: ignore[import-not-found]

    return run_all(quick=args.quick)
