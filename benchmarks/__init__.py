"""Benchmarks (speed and memory targets live here, never in unit tests). Run with ``lora-theory bench``."""

from __future__ import annotations


def run_all(quick: bool = False) -> int:
    from benchmarks import bench_sample_loss

    __import__("benchmarks.bench_finetune").bench_finetune.run_isolated(quick=quick)
    status = bench_sample_loss.main(quick=quick)
    from benchmarks import bench_redraw, bench_sweep, bench_sweep_small

    # quick: a smoke run in seconds (the test suite runs it), so without Ray's start-up (tests/toymodels cover Ray)
    status = bench_sweep.main(["--quick", "--skip-ray"] if quick else []) or status
    status = bench_sweep_small.main(["--quick"] if quick else []) or status
    status = bench_redraw.main(["--quick"] if quick else []) or status
    if quick:  # the whole gallery takes hours: `python -m benchmarks.bench_gallery` on its own (BENCHMARKS.md)
        from benchmarks import bench_gallery

        status = bench_gallery.main(["--quick"]) or status
    return __import__("benchmarks.bench_diagnose").bench_diagnose.main(quick=quick) or status
