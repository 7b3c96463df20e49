"""Benchmark: ``lora-theory figures --redraw``, every PNG and the gallery rebuilt from the JSONs, no training.

Copies the committed gallery's JSONs (``figures/*.json``) into a temporary folder and times the command there, as
a user runs it (a fresh process: imports included), then each figure's ``draw`` + PNG in-process. Target (issue
15): all 31 figures in under 60 s on 2 cores. ``--quick``: two figures, in-process only (the test suite's smoke
run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(quick: bool = False) -> dict:
    from benchmarks.bench_finetune import machine
    from figures import gallery, registry

    specs = registry.specs()
    ids = [i for i in specs if (ROOT / "figures" / f"{i}.json").exists()]
    if quick:
        ids = ids[:2]
    out: dict = {"machine": machine(), "load_before": os.getloadavg()[0], "figures": len(ids)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in ids:
            shutil.copy(ROOT / "figures" / f"{i}.json", tmp / f"{i}.json")
        if not quick:  # the command, as a user runs it
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "lora_theory.cli", "figures", "--redraw", "--out", str(tmp)],
                                  cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            out["command_s"] = time.perf_counter() - start
            out["command_rc"] = proc.returncode
            out["command_tail"] = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        per: dict[str, float] = {}
        for i in ids:
            start = time.perf_counter()
            why = gallery.redraw(specs[i], tmp)
            per[i] = time.perf_counter() - start
            if why is not None:
                raise RuntimeError(f"{i}: not redrawn: {why}")
        start = time.perf_counter()
        gallery.write_gallery(tmp)
        out["gallery_s"] = time.perf_counter() - start
    out["per_figure_s"] = per
    out["in_process_s"] = sum(per.values()) + out["gallery_s"]
    out["load_after"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two figures, in-process only")
    args = parser.parse_args(argv)
    res = run(quick=args.quick)
    print(f"--redraw of {res['figures']} figures on {res['machine']} (load {res['load_before']:.2f} -> "
          f"{res['load_after']:.2f})")
    if "command_s" in res:
        print(f"  lora-theory figures --redraw (fresh process): {res['command_s']:.1f} s, exit {res['command_rc']}")
    print(f"  in-process: {res['in_process_s']:.1f} s (draw + PNG per figure, max "
          f"{max(res['per_figure_s'].values()):.2f} s; gallery README {res['gallery_s']:.2f} s)")
    for fig_id, s in sorted(res["per_figure_s"].items(), key=lambda kv: -kv[1])[:5]:
        print(f"    {fig_id:<40} {s:.2f} s")
    return 0 if res.get("command_rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
