"""``lora-theory diagnose ADAPTER_DIR [--base MODEL] [--calibration FILE] [--json OUT] [--plot OUT.png]``.

Prints the per-layer table (rich when installed) with one line per raised flag and its rule; exits 0 on
success, 2 on bad input (the message names the file and what was expected; no traceback), 1 on an unexpected
failure (one line; ``LORA_THEORY_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from diagnose.errors import DiagnoseError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-theory diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="a PEFT save_pretrained folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", help="base model folder loadable by transformers: m_l, ripple bound, intruder dims")
    p.add_argument("--calibration", help="token ids (.pt/.safetensors/.npy/.json/.txt, shape (N, T)); needs --base")
    p.add_argument("--json", dest="json_out", help="write the JSON report here")
    p.add_argument("--full", action="store_true", help="JSON: include per-row ALLoRA arrays and intruder cosines")
    p.add_argument("--plot", help="write a PNG of the per-layer bars here")
    p.add_argument("--eta", type=float, default=2.0, help="ALLoRA's eta (default 2: listing 1's 1/eta^2 = 1/4)")
    p.add_argument("--lowr-alpha", type=float, default=1.0, help="LoWR Algorithm 1 alpha (default 1)")
    p.add_argument("--lowr-tau", type=float, default=math.inf, help="LoWR Algorithm 1 tau (default inf)")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from diagnose.report import diagnose_adapter

        report = diagnose_adapter(args.adapter, base=args.base, calibration=args.calibration, eta=args.eta,
                                  lowr_alpha=args.lowr_alpha, lowr_tau=args.lowr_tau)
        if not args.quiet:
            print(report.table())
        if args.json_out:
            report.to_json(args.json_out, full=args.full)
            print(f"wrote {args.json_out}")
        if args.plot:
            report.plot(args.plot)
            print(f"wrote {args.plot}")
    except DiagnoseError as exc:
        print(f"lora-theory diagnose: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback for the user; the debug switch shows it
        if os.environ.get("LORA_THEORY_DEBUG"):
            raise
        print(f"lora-theory diagnose: unexpected failure: {type(exc).__name__}: {exc} "
              f"(LORA_THEORY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
