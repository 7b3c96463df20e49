"""``lora-theory diagnose``: the command-line face of :func:`diagnose.diagnose_adapter` (CLI contract: HELP,
DESCRIPTION, add_arguments, run)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from diagnose.errors import DiagnoseError

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "main"]

HELP = "diagnose a trained PEFT LoRA adapter against the papers' theory (usable in CI with --fail-on)"

DESCRIPTION = (
    "Reads a PEFT LoRA adapter saved with save_pretrained and prints, per adapted layer, its rank, scaling and update "
    "norm, with the problems found (a dead layer, a scale that dominates, modules missing from the save) and the "
    "notes worth knowing. With the base model it adds m, the update against the frozen weight, the ripple bound per "
    "stack of layers and the intruder dimensions; with a calibration batch it adds the exact dropout penalty. "
    "--explain prints what every column and flag means. Exit status: 0 done, 2 bad input (the message names it), "
    "3 a flag named in --fail-on was raised, 1 an unexpected failure."
)

_PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _threshold(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER (e.g. update_dominates=0.5), got {text!r}") from None


def _fail_on(text: str) -> set[str]:
    from diagnose.flags import resolve_fail_on

    try:
        return resolve_fail_on(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``lora-theory diagnose``, with its help."""
    parser.add_argument("adapter", nargs="?", help="the adapter folder written by PEFT's save_pretrained "
                        "(adapter_config.json and adapter_model.safetensors or .bin)")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--base", metavar="MODEL", help="the base model the adapter was trained on: a folder, a "
                        "Hugging Face model id found in the local cache, or 'auto' for the adapter config's "
                        "base_model_name_or_path (never downloaded). Adds m, the ripple bound and intruder dimensions")
    inputs.add_argument("--calibration", metavar="FILE", help="token ids, shape (N, T), in a .pt, .safetensors, "
                        ".npy, .json (a list or a dict with input_ids) or .txt file (one sequence per line); needs "
                        "--base. Adds the exact dropout penalty on these inputs")
    inputs.add_argument("--layers", metavar="REGEX", help="analyse only the layers whose name matches this regular "
                        "expression (e.g. 'layers\\.(0|31)\\.' or 'q_proj')")
    inputs.add_argument("--base-fingerprint", metavar="HEX", help="the base weights' fingerprint expected (from an "
                        "earlier report's base_model.fingerprint); a different one raises base_mismatch")
    out = parser.add_argument_group("outputs")
    out.add_argument("--json", dest="json_out", metavar="OUT.json", help="write the JSON report here (its layout: "
                     "diagnose/report.schema.json)")
    out.add_argument("--full", action="store_true", help="in the JSON, also the per-row ALLoRA arrays and the "
                     "intruder cosines")
    out.add_argument("--plot", metavar="OUT.png", help="write a layer-by-module heatmap here (.png, .pdf or .svg)")
    out.add_argument("--bake", metavar="OUT_DIR", help="for an rsLoRA adapter: write a copy with the scale folded "
                     "into B and use_rslora off, which gives the same outputs in engines that ignore use_rslora")
    out.add_argument("--wide", action="store_true", help="print every column (norms, ranks, the papers' quantities, "
                     "calibration) instead of the 100-column table")
    out.add_argument("--explain", action="store_true", help="print what every column and flag means, with the "
                     "thresholds in force (alone, without an adapter, just the legend)")
    out.add_argument("--quiet", action="store_true", help="print no table")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    inputs.add_argument("--device", metavar="DEVICE", help="where the base model runs the calibration forward pass: "
                        "cpu, cuda, cuda:N (default: cuda when available); when given, the base numerics of every layer (Gram "
                        "matrices and their eigendecompositions, float64) run there too, otherwise on the CPU")
    out.add_argument("--threads", type=int, default=1, metavar="N", help="BLAS threads for the per-layer "
                     "numerics (default 1, the fastest on a shared machine; 0: the library's default)")
    ci = parser.add_argument_group("checks (CI)")
    ci.add_argument("--fail-on", type=_fail_on, metavar="FLAGS", help="exit with status 3 when any of these flags "
                    "is raised: flag names separated by commas, or 'problems', 'notes', 'any'")
    ci.add_argument("--strict", action="store_true", help="a targeted module missing from the save is an error "
                    "(exit 2) instead of the missing_modules flag")
    ci.add_argument("--threshold", type=_threshold, action="append", default=[], metavar="NAME=VALUE",
                    help="change a flag's threshold (repeatable), e.g. update_dominates=0.5; --explain lists them")
    theory = parser.add_argument_group("the papers' settings")
    theory.add_argument("--eta", type=float, default=2.0, help="ALLoRA's eta (default 2: listing 1's 1/eta^2 = 1/4)")
    theory.add_argument("--lowr-alpha", type=float, default=1.0, help="LoWR Algorithm 1's alpha (default 1)")
    theory.add_argument("--lowr-tau", type=float, default=math.inf, help="LoWR Algorithm 1's tau (default: no "
                        "threshold)")


def _check_output(flag: str, value: str | None, suffixes: tuple[str, ...] | None = None) -> None:
    if value is None:
        return
    path = Path(value)
    if suffixes and path.suffix.lower() not in suffixes:
        raise DiagnoseError(f"{flag} {value}: the file must end in {', '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DiagnoseError(f"{flag} {value}: the folder {parent} does not exist")
    if path.is_dir():
        raise DiagnoseError(f"{flag} {value}: is a folder; give a file name")
    if not os.access(parent, os.W_OK):
        raise DiagnoseError(f"{flag} {value}: the folder {parent} is not writable")


def run(args: argparse.Namespace) -> int:
    """Run the diagnosis from parsed arguments; returns the exit status (0, 2 bad input, 3 --fail-on, 1)."""
    thresholds = dict(args.threshold)
    try:
        if args.explain:
            from diagnose.flags import default_thresholds
            from diagnose.render import legend

            unknown = set(thresholds) - set(default_thresholds())
            if unknown:
                raise DiagnoseError(f"--threshold: unknown flag(s) {sorted(unknown)}; flags with a threshold: "
                                    f"{', '.join(default_thresholds())}")
            print(legend(thresholds))
            if args.adapter is None:
                return 0
            print()
        if args.adapter is None:
            raise DiagnoseError("the adapter folder is missing (lora-theory diagnose ADAPTER_DIR; --explain alone "
                                "prints the legend)")
        _check_output("--json", args.json_out)
        _check_output("--plot", args.plot, _PLOT_SUFFIXES)
        if args.bake is not None:
            bake = Path(args.bake)
            if bake.exists() and (not bake.is_dir() or any(bake.iterdir())):
                raise DiagnoseError(f"--bake {bake}: exists and is not an empty folder")
            _check_output("--bake", args.bake)
        if args.threads < 0:
            raise DiagnoseError(f"--threads must be >= 0, got {args.threads}")
        if args.calibration is not None and args.base is None:
            raise DiagnoseError("--calibration needs --base (the base model runs the calibration batch)")
        from diagnose.report import diagnose_adapter

        report = diagnose_adapter(args.adapter, base=args.base, calibration=args.calibration, eta=args.eta,
                                  lowr_alpha=args.lowr_alpha, lowr_tau=args.lowr_tau, thresholds=thresholds,
                                  layers=args.layers, strict=args.strict, base_fingerprint=args.base_fingerprint,
                                  progress=not args.no_progress and sys.stderr.isatty(),
                                  blas_threads=args.threads or None, device=args.device)
        if not args.quiet:
            print(report.table(wide=args.wide))
        if args.json_out:
            report.to_json(args.json_out, full=args.full)
            print(f"wrote {args.json_out}")
        if args.plot:
            report.plot(args.plot)
            print(f"wrote {args.plot}")
        if args.bake is not None:
            from diagnose.bake import bake_rslora

            bake_rslora(args.adapter, args.bake)
            print(f"wrote {args.bake} (use_rslora folded into lora_B)")
    except DiagnoseError as exc:
        print(f"lora-theory diagnose: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback for the user; the debug switch shows it
        if os.environ.get("LORA_THEORY_DEBUG"):
            raise
        print(f"lora-theory diagnose: unexpected failure: {type(exc).__name__}: {exc} "
              f"(LORA_THEORY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    if args.fail_on:
        hit = sorted(set(report.flags) & args.fail_on)
        if hit:
            print(f"lora-theory diagnose: failing (--fail-on): raised {', '.join(hit)}", file=sys.stderr)
            return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m diagnose.cli ...`` (and the programmatic entry the tests use): the same parser and run."""
    parser = argparse.ArgumentParser(prog="lora-theory diagnose", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
