"""The ``lora-theory verify`` command: the derivation checks of :mod:`analysis.verify` as one table."""

from __future__ import annotations

import argparse

from analysis.inputs import default_seed
from analysis.verify import TOPICS

HELP = "prove the closed forms: enumeration, autograd and Monte Carlo checks, one table row per check"
DESCRIPTION = (
    "Run the derivation checks of every closed form (or of the topics named) and print one row per check: what "
    "is checked, the measured value, the criterion and PASS or FAIL. Monte-Carlo checks use tolerances from "
    "their own standard error and the seed given (by default the LORA_THEORY_SEED environment variable, else "
    "0). The exit status is 1 when any check fails."
)


def _topic(name: str) -> str:
    if name not in TOPICS:
        raise argparse.ArgumentTypeError(f"unknown topic {name!r}; the topics are {', '.join(TOPICS)}")
    return name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topics", nargs="*", type=_topic, metavar="TOPIC",
                        help=f"topics to check, among {', '.join(TOPICS)} (default: all of them)")
    parser.add_argument("--seed", type=int, default=None,
                        help="Monte-Carlo seed (default: the LORA_THEORY_SEED environment variable, else 0)")


def run(args: argparse.Namespace) -> int:
    from analysis import verify

    seed = default_seed() if args.seed is None else args.seed
    return verify.main(args.topics or None, seed)
