"""The ``lora-theory`` command: ``verify`` (prove the closed forms), ``data`` (data sets), ``figures``, ``bench`` (benchmarks).

The top layer of the package: it imports the layers below (analysis, toymodels, figures); none of them imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.inputs import default_seed


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: the sweep already said what is cached and how to resume; no traceback
        print("interrupted", file=sys.stderr)
        return 130


def _benchmarks_run_all():
    """``benchmarks.run_all`` from the source checkout: benchmarks/ is not installed with the package (it is not
    a library); it lies next to this package in a clone. None when it is not there."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "__init__.py").is_file():
        return None
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks import run_all  # type: ignore[import-not-found]

    return run_all


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["data"]:  # its own argument parser lives with the data sources
        from toymodels.data import data_command

        return data_command(argv[1:])
    if argv[:1] == ["diagnose"]:  # the theory applied to a user's PEFT adapter
        from diagnose.cli import main as diagnose_main

        return diagnose_main(argv[1:])
    if argv[:1] == ["figures"]:  # likewise with the figures
        from figures.cli import main as figures_main

        return figures_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lora-theory", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_verify = sub.add_parser("verify", help="run the derivation checks (enumeration, autograd, Monte Carlo)")
    p_verify.add_argument("topics", nargs="*", help="subset of topics (default: all)")
    p_verify.add_argument("--seed", type=int, default=None, help="Monte-Carlo seed (default: $LORA_THEORY_SEED or 0)")

    sub.add_parser("data", add_help=False,
                   help="show which data sets are available and from where; --fetch NAME... fills the cache")

    sub.add_parser("diagnose", add_help=False,
                   help="diagnose a trained PEFT LoRA adapter against the papers' theory (ADAPTER_DIR [--base ...])")

    sub.add_parser("figures", add_help=False,
                   help="regenerate the papers' figures with claim checks (--list, --quick, ids...)")

    p_bench = sub.add_parser("bench", help="run the benchmarks and print their numbers")
    p_bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")

    args = parser.parse_args(argv)
    if args.command == "verify":
        from analysis import verify

        seed = default_seed() if args.seed is None else args.seed
        return verify.main(args.topics or None, seed)
    if args.command == "bench":
        run_all = _benchmarks_run_all()
        if run_all is None:
            print("lora-theory bench: the benchmarks live in the source checkout (benchmarks/ next to lora_theory/), "
                  f"which is not there ({Path(__file__).resolve().parent.parent}); clone the repository and run it "
                  "from there (pip install -e .)", file=sys.stderr)
            return 2
        return run_all(quick=args.quick)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
