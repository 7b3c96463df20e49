"""The tidy results table of a sweep: one row per run (Parquet and CSV), and the per-step histories in long format.

Written by ``run_sweep(configs, table=DIR)`` and ``lora-theory sweep --out DIR``; read with pandas alone::

    import pandas as pd
    runs = pd.read_parquet("DIR/runs.parquet")     # or pd.read_csv("DIR/runs.csv")
    steps = pd.read_parquet("DIR/steps.parquet")   # long format: one row per (run, metric, step, layer)
    steps.merge(runs[["run_id", "method", "seed"]], on="run_id")

Schema of ``runs`` (one row per distinct run of the sweep, in the order of the configs; :data:`RUN_COLUMNS`):

- every field of :class:`toymodels.config.FinetuneConfig`, one column each, named as the field (``dataset``,
  ``r``, ``alpha``, ``dropout``, ``method``, ``lr``, ``steps``, ``seed``, ...). Numbers stay numbers, ``None``
  is a missing value; tuples (``widths``, ``targets``, ``recorders``, ``lowr``, ``extra``) are JSON text
  (``"[784, 256, 256, 10]"``); ``scaling`` (a name, a number or none) is text. (pandas reads a missing integer
  as NaN in a float column.)
- ``variant``: the adapter's name as PEFT users know it: ``method``, except ``rslora`` for LoRA with the rsLoRA
  scaling (``method="lora"``, ``scaling="rslora"``: PEFT's ``use_rslora=True``);
- ``run_id``: the run's cache key (64 hex digits; the join key of ``steps``); ``status``: ``ok``, ``diverged``
  (the loss became non-finite: ``diverged_step`` says when, the metrics are those recorded before) or
  ``failed`` (the task raised or its worker died after its retries: ``reason`` says why, the metrics are
  missing); ``reason``; ``diverged_step``;
- the summary metrics, missing when the run did not record them: ``final_test_acc``, ``best_test_acc``,
  ``best_test_acc_step`` (the record step of the best, the first one on ties), ``final_test_loss``,
  ``best_test_loss``, ``best_test_loss_step``, ``final_train_loss``, ``final_train_acc``, ``final_batch_loss``
  (the mean of the last 10 steps' mini-batch losses), ``final_norm_A``, ``final_norm_B`` (the Frobenius norm
  of all LoRA A, resp. B matrices together at the last record: sqrt of the sum of the layers' squared norms);
- ``tool_version`` (lora-theory's version) and ``git_commit`` (of the source checkout, when it is one; else
  missing).

Schema of ``steps`` (:data:`STEP_COLUMNS`): ``run_id``, ``metric`` (a history key: ``batch_loss`` at every
training step, ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``, ``norm_A``, ``norm_B``, ... at the
record steps), ``step`` (the number of updates done: 0 is before training; ``batch_loss`` at step t is the loss of
the mini-batch of update t + 1), ``layer`` (the LoRA layer's index for per-layer metrics, else missing) and
``value``. Per-rank arrays (``channel_a``, ...) are left out: too big for a tidy table; the run cache has them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from toymodels import cache as run_cache
from toymodels.config import FinetuneConfig

STATUSES = ("ok", "diverged", "failed")
CONFIG_COLUMNS = tuple(f.name for f in dataclasses.fields(FinetuneConfig))
METRIC_COLUMNS = ("final_test_acc", "best_test_acc", "best_test_acc_step", "final_test_loss", "best_test_loss",
                  "best_test_loss_step", "final_train_loss", "final_train_acc", "final_batch_loss", "final_norm_A",
                  "final_norm_B")
RUN_COLUMNS = (*CONFIG_COLUMNS, "variant", "run_id", "status", "reason", "diverged_step", *METRIC_COLUMNS, "tool_version",
               "git_commit")
STEP_COLUMNS = ("run_id", "metric", "step", "layer", "value")
TABLE_FILES = ("runs.parquet", "runs.csv", "steps.parquet", "steps.csv")
_TEXT_FIELDS = ("scaling",)  # a name, a number or None: one column type (text)


def run_id(cfg: FinetuneConfig) -> str:
    """The run's identity in the tables: its run-cache key (:func:`toymodels.cache.config_key` of
    ``cfg.as_dict()``), so a table row points at its cache entry."""
    return run_cache.config_key(cfg.as_dict())


def variant(cfg: FinetuneConfig) -> str:
    """``cfg.method``, or ``"rslora"`` for LoRA with the rsLoRA scaling (PEFT's ``use_rslora=True``)."""
    return "rslora" if cfg.method == "lora" and cfg.scaling == "rslora" else cfg.method


def config_columns(cfg: FinetuneConfig) -> dict:
    """The config's fields as table cells: tuples as JSON text, ``scaling`` as text, the rest as they are."""
    out = {}
    for name in CONFIG_COLUMNS:
        v = getattr(cfg, name)
        if isinstance(v, tuple):
            v = json.dumps(list(v))
        elif name in _TEXT_FIELDS and v is not None:
            v = str(v)
        out[name] = v
    return out


def _last(hist: Mapping[str, np.ndarray], key: str) -> float | None:
    v = hist.get(key)
    return float(v[-1]) if v is not None and len(v) else None


def _best(hist: Mapping[str, np.ndarray], key: str, largest: bool) -> tuple[float | None, int | None]:
    v = hist.get(key)
    if v is None or not len(v) or not np.any(np.isfinite(v)):
        return None, None
    vals = np.where(np.isfinite(v), v, -np.inf if largest else np.inf)
    i = int(np.argmax(vals) if largest else np.argmin(vals))
    return float(v[i]), int(hist["step"][i])


def _total_norm(hist: Mapping[str, np.ndarray], key: str) -> float | None:
    v = hist.get(key)
    if v is None or not len(v):
        return None
    return float(np.sqrt(np.sum(np.square(np.asarray(v[-1], dtype=np.float64)))))


def summary_metrics(hist: Mapping[str, np.ndarray]) -> dict:
    """The summary metrics of one history (:data:`METRIC_COLUMNS`; None where not recorded)."""
    best_acc, best_acc_step = _best(hist, "test_acc", largest=True)
    best_loss, best_loss_step = _best(hist, "test_loss", largest=False)
    batch = hist.get("batch_loss")
    return {
        "final_test_acc": _last(hist, "test_acc"), "best_test_acc": best_acc, "best_test_acc_step": best_acc_step,
        "final_test_loss": _last(hist, "test_loss"), "best_test_loss": best_loss,
        "best_test_loss_step": best_loss_step, "final_train_loss": _last(hist, "train_loss"),
        "final_train_acc": _last(hist, "train_acc"),
        "final_batch_loss": float(np.mean(batch[-10:])) if batch is not None and len(batch) else None,
        "final_norm_A": _total_norm(hist, "norm_A"), "final_norm_B": _total_norm(hist, "norm_B"),
    }


@functools.cache
def provenance() -> dict:
    """``tool_version`` (the installed lora-theory's version) and ``git_commit`` (HEAD of the source checkout
    this package lies in, when it is a git checkout; None otherwise)."""
    from importlib import metadata

    try:
        version = metadata.version("lora-theory")
    except metadata.PackageNotFoundError:
        version = None
    commit = None
    root = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        if res.returncode == 0:
            commit = res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"tool_version": version, "git_commit": commit}


def run_row(cfg: FinetuneConfig, hist: Mapping[str, np.ndarray] | None, failure: str | None = None) -> dict:
    """One row of the runs table: ``hist`` is the run's history, or None with ``failure`` the reason."""
    row = {**config_columns(cfg), "variant": variant(cfg), "run_id": run_id(cfg)}
    if hist is None:
        row.update(status="failed", reason=failure or "failed", diverged_step=None,
                   **dict.fromkeys(METRIC_COLUMNS))
    else:
        diverged = "diverged_step" in hist
        row.update(status="diverged" if diverged else "ok",
                   reason=f"the loss became non-finite at step {int(hist['diverged_step'][0])}" if diverged else None,
                   diverged_step=int(hist["diverged_step"][0]) if diverged else None, **summary_metrics(hist))
    row.update(provenance())
    return row


def step_rows(rid: str, hist: Mapping[str, np.ndarray]) -> Iterable[tuple]:
    """The long-format rows (run_id, metric, step, layer, value) of one history (scalars and per-layer arrays)."""
    record_steps = np.asarray(hist.get("step", []), dtype=np.int64)
    for key, v in hist.items():
        if key in ("step", "diverged_step"):
            continue
        v = np.asarray(v)
        if key == "batch_loss":
            for t, x in enumerate(v.tolist()):
                yield rid, key, t, None, float(x)
        elif v.ndim == 1 and len(v) == len(record_steps):
            for s, x in zip(record_steps.tolist(), v.tolist(), strict=True):
                yield rid, key, s, None, float(x)
        elif v.ndim == 2 and len(v) == len(record_steps):
            for s, row in zip(record_steps.tolist(), v.tolist(), strict=True):
                for layer, x in enumerate(row):
                    yield rid, key, s, layer, float(x)


def tables(configs: Sequence[FinetuneConfig], histories: Mapping[FinetuneConfig, Mapping[str, np.ndarray]],
           failures: Mapping[FinetuneConfig, str] | None = None) -> tuple[list[dict], list[tuple]]:
    """(runs rows, steps rows) of a sweep: one run row per distinct config of ``configs`` (in order), from its
    history in ``histories`` or its reason in ``failures``."""
    failures = failures or {}
    runs, steps, seen = [], [], set()
    for cfg in configs:
        if cfg in seen:
            continue
        seen.add(cfg)
        hist = histories.get(cfg)
        row = run_row(cfg, hist, failures.get(cfg, "no result"))
        runs.append(row)
        if hist is not None:
            steps.extend(step_rows(row["run_id"], hist))
    return runs, steps


def write_tables(directory: str | Path, runs: list[dict], steps: list[tuple]) -> list[Path]:
    """Write ``runs.parquet``, ``runs.csv``, ``steps.parquet``, ``steps.csv`` into ``directory`` (created; each
    file written atomically). Returns the paths. Needs pyarrow (``pip install pyarrow``)."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency of the tables extra
        raise ImportError("writing the results table needs pyarrow: pip install pyarrow") from exc
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    run_table = pa.Table.from_pylist([{c: r.get(c) for c in RUN_COLUMNS} for r in runs],
                                     schema=_run_schema(pa, runs))
    cols = list(zip(*steps, strict=True)) if steps else [[] for _ in STEP_COLUMNS]
    step_table = pa.table({name: pa.array(list(col), type=typ) for name, col, typ in zip(
        STEP_COLUMNS, cols, (pa.string(), pa.string(), pa.int64(), pa.int64(), pa.float64()), strict=True)})
    paths = []
    for table, stem in ((run_table, "runs"), (step_table, "steps")):
        for suffix in ("parquet", "csv"):
            path = directory / f"{stem}.{suffix}"
            run_cache.atomic_write(path, (lambda f, t=table: pq.write_table(t, f)) if suffix == "parquet"
                                   else (lambda f, t=table: pa_csv.write_csv(t, f)))
            paths.append(path)
    return paths


def _run_schema(pa, runs: list[dict]):
    """The runs table's column types, from the config fields' declared types (so an all-missing column keeps its
    type): int -> int64, float -> float64, bool -> bool, the rest (text, tuples as JSON) -> string."""
    import typing

    hints = typing.get_type_hints(FinetuneConfig)
    ints = {"diverged_step", "best_test_acc_step", "best_test_loss_step"}
    fields = []
    for name in RUN_COLUMNS:
        if name in CONFIG_COLUMNS and name not in _TEXT_FIELDS:
            base = [a for a in (typing.get_args(hints[name]) or (hints[name],)) if a is not type(None)]
            typ = {int: pa.int64(), float: pa.float64(), bool: pa.bool_()}.get(base[0], pa.string()) \
                if len(base) == 1 else pa.string()
        elif name in ints:
            typ = pa.int64()
        elif name in METRIC_COLUMNS:
            typ = pa.float64()
        else:
            typ = pa.string()
        fields.append(pa.field(name, typ))
    return pa.schema(fields)
