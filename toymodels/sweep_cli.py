"""The ``lora-theory sweep`` command: a sweep of fine-tuning runs from Hydra-style overrides, with its results table.

``lora-theory sweep dataset=mnist r=4,8,16 dropout=0,0.1 seed='range(10)' method=lora,rslora --out results/``
runs the product of the values given (every other field of :class:`toymodels.config.FinetuneConfig` at its
default) through :func:`toymodels.sweep.run_sweep` and writes the tidy table of :mod:`toymodels.results` into
``--out``. Every override is checked before anything runs: an unknown key, a value of the wrong type or one the
engine does not accept is an error naming the key and its allowed values (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import math
import os
import re
import sys
import typing
from pathlib import Path

HELP = "run a sweep of fine-tuning runs from key=values overrides and write its tidy results table"
DESCRIPTION = """\
Run every combination of the values given for the fine-tuning settings, in parallel, and write one row per run
(its settings, status and summary metrics) to runs.parquet and runs.csv in the output folder, and the per-step
histories to steps.parquet and steps.csv. Finished runs are kept in the run cache, so an interrupted sweep
resumes where it stopped when the same command is run again, and a rerun costs nothing. Settings not given keep
their defaults (the ALLoRA protocol: MNIST, a 784-256-256-10 MLP, LoRA r=8 on all layers, Adam); --keys lists
them with their allowed values.

Overrides, in the style of Hydra: key=value, key=v1,v2,v3 (a sweep over the values), key='range(10)' or
key='range(start,stop,step)', and [a,b,c] for a list-valued key such as widths. method=rslora is LoRA with the
rsLoRA scaling (alpha / sqrt(r)). Examples:

  lora-theory sweep dataset=mnist r=4,8,16 dropout=0,0.1 seed='range(10)' method=lora,rslora --out results/
  lora-theory sweep dataset=synthetic widths=[32,64,64,10] steps=100 seed='range(4)' --dry-run"""

#: names a user knows that are (method, scaling) pairs of the engine (PEFT's use_rslora=True is LoRA + rsLoRA)
METHOD_ALIASES = {"rslora": {"method": "lora", "scaling": "rslora"}}
#: the names PEFT / transformers users type, and what they are here
PEFT_NAMES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
              "seeds": "seed", "use_rslora": "method=rslora", "target_modules": "targets", "max_steps": "steps",
              "per_device_train_batch_size": "batch_size", "use_dora": "method=dora", "init_lora_weights": "init"}
# rough seconds per unit of work (multiply-accumulates x samples), measured with the default protocol on the
# 2-core machine of BENCHMARKS.md (sweep benchmark, pretrained: loop 0.90 s, batched 0.33 s per run; pretraining
# 1.4 s): an order of magnitude for --dry-run, not a promise
_SECONDS_PER_UNIT = {"sequential": 3.7e-11, "batched": 1.4e-11, "pretrain": 2.8e-11}


class OverrideError(ValueError):
    """A bad override: the message names the key and what it accepts."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUES",
                        help="a setting and its value(s): key=v, key=v1,v2, key='range(n)', key=[a,b] (see --keys)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="folder for runs.parquet, runs.csv, steps.parquet and steps.csv (default: results)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (runs, tasks, batched groups, cache hits, a rough time) and run nothing")
    parser.add_argument("--keys", action="store_true", help="list every key with its default and allowed values")
    parser.add_argument("--executor", choices=("local", "ray", "slurm"), default="local",
                        help="where the runs go: local worker processes (default), a Ray cluster ($RAY_ADDRESS, "
                             "else a local one) or SLURM through submitit; the results are the same bits")
    parser.add_argument("--workers", type=_positive, default=None,
                        help="parallel workers (default: one per CPU core; 1 runs everything in this process)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch threads per task (default 1; part of each run's cache key)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ------------------------------------------------------------------------------------------------ overrides


def _fields() -> dict[str, dataclasses.Field]:
    from toymodels.config import FinetuneConfig

    return {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def _hints() -> dict[str, object]:
    from toymodels.config import FinetuneConfig

    return typing.get_type_hints(FinetuneConfig)


def allowed_values() -> dict[str, str]:
    """What each key accepts, in words (its type, and the engine's list of names where there is one)."""
    from toymodels import config, data, lora, mlp

    names = {"dataset": data.DATASETS, "method": (*lora.VARIANTS, *METHOD_ALIASES), "placement": lora.PLACEMENTS,
             "init": lora.INITS, "optimizer": config.OPTIMIZERS, "loss": config.LOSSES, "dtype": config.DTYPES,
             "activation": mlp.ACTIVATIONS, "task_shift": tuple(str(t).lower() for t in data.TASK_SHIFTS)}
    out = {}
    for key, hint in _hints().items():
        if key in names:
            out[key] = "one of " + ", ".join(map(str, names[key]))
        elif key == "scaling":
            out[key] = f"one of {', '.join(lora.SCALINGS)}, a number, or none"
        elif key == "recorders":
            out[key] = "a list [..] of " + ", ".join(config.RECORDERS)
        elif key == "targets":
            out[key] = "a list [..] of layer names layers.0, layers.1, ..."
        elif key == "widths":
            out[key] = "a list [..] of layer widths, the first the data's input size"
        elif key == "lowr":
            out[key] = "[tau,alpha,every] or none"
        elif key == "extra":
            out[key] = "a list [..] of tags"
        else:
            out[key] = _type_words(hint)
    return out


def _type_words(hint) -> str:
    args = set(typing.get_args(hint))
    base = [a for a in args if a is not type(None)] or [hint]
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    text = " or ".join(words.get(b, str(b)) for b in base)
    return text + (", or none" if type(None) in args else "")


def split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` -> ``["a", "b", "[c,d]"]``: commas split values outside brackets and parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def _expand(key: str, text: str) -> list[str]:
    """The value tokens of one override: ``range(...)`` and ``choice(...)`` expanded, commas split."""
    m = re.fullmatch(r"\s*range\((.*)\)\s*", text)
    if m:
        try:
            args = [_number(a) for a in split_values(m.group(1))]
        except ValueError:
            raise OverrideError(f"{key}={text}: range takes numbers, as range(stop), range(start, stop) or "
                                f"range(start, stop, step)") from None
        if not 1 <= len(args) <= 3 or (len(args) == 3 and args[2] == 0):
            raise OverrideError(f"{key}={text}: range takes 1 to 3 numbers (start, stop, step != 0)")
        start, stop, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) == 3 else 1)
        count = max(0, math.ceil((stop - start) / step))
        values = [start + i * step for i in range(count)]
        if not values:
            raise OverrideError(f"{key}={text}: the range is empty")
        return [repr(round(v, 12)) if isinstance(v, float) else str(v) for v in values]
    m = re.fullmatch(r"\s*choice\((.*)\)\s*", text)
    if m:
        text = m.group(1)
    values = split_values(text)
    if any(v == "" for v in values):
        raise OverrideError(f"{key}={text}: an empty value (two commas in a row, or a trailing comma)")
    return values


def convert(key: str, token: str, hint=None):
    """One value token as the Python value of the config field ``key`` (OverrideError naming the key if it is not
    of the field's type)."""
    hint = _hints()[key] if hint is None else hint
    low = token.strip().lower()
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if args and type(None) in args and origin is not tuple:
        if low in ("none", "null"):
            return None
        rest = [a for a in args if a is not type(None)]
        for sub in rest:  # e.g. str | float: a number when it reads as one, else the text
            if sub is str:
                continue
            try:
                return convert(key, token, sub)
            except OverrideError:
                pass
        if str in rest:
            return token.strip()
        raise OverrideError(f"{key}={token}: {key} takes {_type_words(hint)}")
    if origin is tuple or hint is tuple:
        if low in ("none", "null") and type(None) in args:
            return None
        t = token.strip()
        if not (t.startswith("[") and t.endswith("]")):
            raise OverrideError(f"{key}={token}: {key} takes a list in brackets, e.g. {key}=[a,b] "
                                f"({allowed_values()[key]})")
        items = [i for i in split_values(t[1:-1]) if i != ""]
        item_types = [a for a in args if a is not Ellipsis and a is not type(None)] or [str]
        if args and Ellipsis not in args and len(args) == len(items):
            return tuple(convert(key, i, a) for i, a in zip(items, args, strict=True))
        return tuple(convert(key, i, item_types[0]) for i in items)
    if hint is bool:
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise OverrideError(f"{key}={token}: {key} takes true or false")
    if hint is int:
        try:
            return int(token)
        except ValueError:
            raise OverrideError(f"{key}={token}: {key} takes an integer") from None
    if hint is float:
        try:
            value = float(token)
        except ValueError:
            raise OverrideError(f"{key}={token}: {key} takes a number") from None
        if not math.isfinite(value):
            raise OverrideError(f"{key}={token}: {key} takes a finite number")
        return value
    return token.strip()


def parse_overrides(overrides: list[str]) -> dict[str, list]:
    """``["r=4,8", "seed=range(2)"]`` -> ``{"r": [4, 8], "seed": [0, 1]}`` (keys in the order given; a method
    alias stays a name here). OverrideError naming the key for an unknown key or a value of the wrong type."""
    fields = _fields()
    out: dict[str, list] = {}
    for item in overrides:
        if "=" not in item:
            raise OverrideError(f"{item!r}: an override is key=value (e.g. r=4,8,16); the keys are "
                                + ", ".join(fields))
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            close = [PEFT_NAMES[key]] if key in PEFT_NAMES else difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise OverrideError(f"unknown key {key!r}{hint}; the keys are: {', '.join(fields)}")
        if key in out:
            raise OverrideError(f"{key} is given twice; give every value in one override: {key}=v1,v2")
        if key == "method":
            values = _expand(key, text)
        else:
            values = [convert(key, v) for v in _expand(key, text)]
        if len(set(map(repr, values))) != len(values):
            raise OverrideError(f"{key}={text}: a value is repeated")
        out[key] = values
    return out


def _settings(key: str, value) -> dict:
    if key == "method" and value in METHOD_ALIASES:
        return dict(METHOD_ALIASES[value])
    return {key: value}


def build_configs(overrides: list[str]) -> list:
    """The configs of the sweep: the product of the overrides' values, in the order given (the last key varies
    fastest). Every value is checked first, with the other keys at their first value: OverrideError naming the key
    and its allowed values."""
    from toymodels import lora
    from toymodels.config import FinetuneConfig

    grid = parse_overrides(overrides)
    allowed = allowed_values()
    if "method" in grid:
        for m in grid["method"]:
            if m not in (*lora.VARIANTS, *METHOD_ALIASES):
                raise OverrideError(f"method={m}: method takes {allowed['method']}")
            if m in METHOD_ALIASES and any(k in grid for k in METHOD_ALIASES[m] if k != "method"):
                raise OverrideError(f"method={m} sets {METHOD_ALIASES[m]}; do not give scaling= as well")
    for s in grid.get("scaling", []):
        if isinstance(s, str) and s not in lora.SCALINGS:
            raise OverrideError(f"scaling={s}: scaling takes {allowed['scaling']}")
    first = {}
    for key, values in grid.items():
        first.update(_settings(key, values[0]))
    for key, values in grid.items():  # each value alone (other keys at their defaults, else their first value)
        for v in values:
            exc = _invalid(FinetuneConfig, _settings(key, v)) and _invalid(FinetuneConfig, {**first,
                                                                                          **_settings(key, v)})
            if exc:
                raise OverrideError(f"{key}={v}: {exc} ({key} takes {allowed[key]})")
    exc = _invalid(FinetuneConfig, first)
    if exc:
        text = " ".join(f"{k}={v[0]}" for k, v in grid.items())
        raise OverrideError(f"the settings {text} are not a valid run: {exc}")
    configs = []
    for combo in itertools.product(*grid.values()):
        settings = {}
        for key, v in zip(grid, combo, strict=True):
            settings.update(_settings(key, v))
        try:
            configs.append(FinetuneConfig(**settings))
        except (ValueError, TypeError) as exc:
            text = " ".join(f"{k}={v}" for k, v in zip(grid, combo, strict=True))
            raise OverrideError(f"the combination {text} is not a valid run: {exc}") from None
    return configs


def _invalid(config_class, settings: dict) -> str:
    """The config's validation error for ``settings`` ("" when they make a valid config)."""
    try:
        config_class(**settings)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return ""


# ------------------------------------------------------------------------------------------------- the plan


def _work(cfg, train_steps: int, batch: int, evals: int) -> float:
    macs = sum(a * b for a, b in itertools.pairwise(cfg.widths))
    return macs * (3 * train_steps * batch + evals)


def estimate_seconds(tasks, workers: int) -> float:
    """A rough wall time: each task's work (forward/backward multiply-accumulates) at the per-unit costs measured
    in BENCHMARKS.md, pretrainings once per distinct base, over ``workers`` in parallel."""
    bases, total = {}, 0.0
    for task in tasks:
        for c in task.configs:
            n_eval = (c.n_test or 10_000) + c.n_finetune
            total += _SECONDS_PER_UNIT[task.kind] * _work(c, c.steps, c.batch_size or c.n_finetune,
                                                          len(c.record_steps()) * n_eval)
            bases[c.pretrain_dict().__repr__()] = _SECONDS_PER_UNIT["pretrain"] * _work(
                c, c.pretrain_steps, c.pretrain_batch, 0)
    return (total + sum(bases.values())) / max(1, min(workers, len(tasks) or 1))


def describe_plan(configs, workers: int | None, threads: int) -> str:
    """The --dry-run text: runs, tasks, batched groups (size and what varies), cache hits, a rough time."""
    import torch

    from toymodels import sweep

    tasks = sweep.plan(configs)
    distinct = list(dict.fromkeys(configs))
    torch.set_num_threads(threads)
    cached = [t for t in tasks if sweep.cached_histories(t, threads) is not None]
    hits = sum(len(t.configs) for t in cached)
    w = workers or os.cpu_count() or 1
    todo = [t for t in tasks if t not in cached]
    if w > 1:  # what run_sweep does with the tasks to run: split for idle workers, pretrainings first
        todo = sweep.fill_workers(todo, w)
        tasks = cached + todo
    pre, _ = sweep.pretrain_tasks(todo, threads) if w > 1 else ([], {})
    lines = [f"{len(distinct)} runs ({len(configs) - len(distinct)} duplicates merged) in {len(tasks)} tasks: "
             f"{sum(t.kind == 'batched' for t in tasks)} batched, {sum(t.kind == 'sequential' for t in tasks)} "
             f"through the training loop; {hits} of {len(distinct)} runs already in the run cache"]
    if pre:
        lines.append(f"{len(pre)} pretrainings first, as tasks of their own (their base models are not cached)")
    for i, t in enumerate(tasks, 1):
        varying = [k for k in ("seed", "dropout", "lr", "scaling") if len({getattr(c, k) for c in t.configs}) > 1]
        what = f"varying {', '.join(varying)}" if varying else ""
        state = "cached" if t in cached else "to run"
        lines.append(f"  task {i}: {t.kind}, {len(t.configs)} run{'s' if len(t.configs) != 1 else ''} {what} "
                     f"({state})".replace("  (", " ("))
    est = estimate_seconds(todo, w)
    lines.append(f"estimated time: ~{_human(est)} on {w} worker{'s' if w != 1 else ''} (rough: the per-step "
                 "costs of BENCHMARKS.md's 2-core machine)")
    return "\n".join(lines)


def _human(seconds: float) -> str:
    if seconds < 1:
        return "1 s or less"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    if args.keys:
        defaults = {k: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for k, f in _fields().items()}
        for key, words in allowed_values().items():
            print(f"{key:<18} default {defaults[key]!s:<28} {words}")
        return 0
    try:
        configs = build_configs(args.overrides)
    except OverrideError as exc:
        print(f"lora-theory sweep: error: {exc}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("lora-theory sweep: error: --device cuda: CUDA is not available", file=sys.stderr)
            return 2
    if args.dry_run:
        print(describe_plan(configs, args.workers, args.threads))
        return 0
    from toymodels import sweep
    from toymodels.loop import TrainingDiverged

    print(f"sweep: {len(dict.fromkeys(configs))} runs; results table in {args.out}", flush=True)
    try:
        sweep.run_sweep(configs, executor=args.executor, workers=args.workers, device=args.device,
                        threads=args.threads, progress=not args.no_progress, on_diverge="return", table=args.out)
    except sweep.SweepError as exc:
        print(f"lora-theory sweep: {exc}\nthe table in {args.out} lists them with status 'failed'", file=sys.stderr)
        return 1
    except TrainingDiverged:  # pragma: no cover - on_diverge="return" keeps diverged runs in the table
        raise
    import pyarrow.parquet as pq

    status = pq.read_table(args.out / "runs.parquet", columns=["status"]).column("status").to_pylist()
    counts = ", ".join(f"{status.count(s)} {s}" for s in ("ok", "diverged", "failed") if status.count(s))
    print(f"wrote {args.out / 'runs.parquet'} ({counts}), runs.csv, steps.parquet and steps.csv")
    return 0
