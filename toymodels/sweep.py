"""Sweeps of many fine-tuning runs: routed to the batched engine or the loop, run in parallel processes, on Ray
or on SLURM, with the run cache as the join point. The public entry is :func:`run_sweep` (also ``toymodels.run_sweep``),
which delegates to :func:`run_sweep` here.

How a sweep runs:

1. **Plan** (:func:`plan`, a deterministic function of the list of configs, never of the worker count): the
   distinct configs that :func:`toymodels.batched.check_batchable` accepts are grouped by everything but
   (seed, dropout, lr, scaling); a group of two or more becomes batched tasks of at most ``max_batch`` runs
   (the group sorted by :func:`toymodels.batched.canonical_batch`, cut into consecutive chunks of nearly equal
   size, so the runs of a seed stay together), each trained by :func:`toymodels.batched.finetune_many`; every
   other config is a sequential task (:func:`toymodels.loop.finetune`).
2. **Cache probe** in the calling process: tasks whose runs are all cached are loaded, not sent anywhere (a
   rerun of a finished sweep starts no worker).
3. **Schedule** (on more than one worker): batched tasks are split at seed boundaries while workers would idle
   (:func:`fill_workers`); each base model not cached yet becomes a ``pretrain`` task of its own
   (:func:`pretrain_tasks`), and each fine-tuning task starts as soon as the bases *it* needs are cached (not
   after every pretraining), in the plan's order, pretrainings first.
4. **Execute** the tasks (:func:`run_task`) on ``executor``: "local" (``workers`` of them, default one per CPU
   core: the calling process itself, which runs one task at a time in a thread (:data:`CALLER_RUNS_TASKS`; it
   has torch imported, so its first task starts at once), and ``workers - 1`` worker processes (fresh
   interpreters); ``workers=1``, or a single task, runs in-process; a sweep that finishes cleanly keeps its idle
   workers for the next sweep of the process if that one has the same ``threads`` and environment (variables but
   ``$LORA_THEORY_CACHE``, which travels with each task; working directory, sys.path; else a fresh pool), so a
   program that runs many sweeps (the figures, the tests) starts its workers once; :func:`shutdown_workers`, also
   called at exit, stops them), "ray" (the cluster at ``$RAY_ADDRESS``, else a local one started with
   ``ray.init(num_cpus=workers)``), "slurm" (submitit's ``AutoExecutor``; ``executor_options`` holds
   ``folder``, ``cluster`` ("slurm", "local", "debug") and any ``update_parameters`` keyword), or any
   ``concurrent.futures.Executor`` (a process pool runs tasks in parallel; a thread pool runs them one at a
   time, :func:`run_task` holds a per-process lock: the thread counts are process-wide, and callbacks and the
   loop seed torch's global RNG, which the threads of a process share).
   Each worker writes each finished run to the run cache itself (atomic rename,
   :func:`toymodels.cache.atomic_write`), so the cache must be a file system every worker sees
   (``$LORA_THEORY_CACHE``; its path is sent with each task). Two sweeps, or two workers, finishing the same
   run write the same bytes under the same name: the last rename wins and no reader sees a partial file.
5. **Join**: histories come back in the order of ``configs``; a diverged run is cached with its
   ``diverged_step`` and raised (``on_diverge="raise"``) only after every other run is done.

Custom callbacks (``callbacks=``, :class:`toymodels.callback_base.Callback`): one sequence applied to every config, a
callable ``cfg -> sequence``, or a list aligned with ``configs`` (one sequence per config; see
:func:`resolve_callbacks`). A run with custom callbacks always goes through the loop,
``finetune(cfg, callbacks=...)`` (never the batched engine), in a sequential task of its own, and is cached
exactly as that call caches it (:func:`toymodels.loop.run_key`: the config plus the callbacks' keys), so a
sweep and a direct ``finetune`` call share one entry, bit for bit, and the callbacks' results come back in the
run's history. Every run gets its own copy of its callbacks (a pickle round trip, in-process as in a worker),
so a callback object shared by many configs never carries state from one run to the next, whatever the
executor. Callbacks therefore must pickle (classes defined at a module's top level; for the local worker
processes, in an importable module, not ``__main__``): run_sweep raises ValueError naming the callback
otherwise, before any run starts. Two entries of ``configs`` are the same run when their configs are equal and
their callbacks have the same keys (:meth:`toymodels.callback_base.Callback.full_key`).

Bit-for-bit equality whatever the executor and the worker count: each run's randomness comes from its own seed
(the engines' streams), every task runs with the same torch thread count ``threads`` (default 1; recorded in the
cache key by :meth:`FinetuneConfig.as_dict`) and as many numpy BLAS threads (what a callback's numpy sums
depend on; a direct ``finetune`` call in a process with multi-threaded BLAS can differ from it in the last
bits of such a callback's results, not in the training), and the batched engine's numbers depend only on its
batch's set of configs (:func:`toymodels.batched.canonical_batch`), which the plan fixes. tests/toymodels/test_sweep.py checks
``np.array_equal`` on every history array across in-process, local processes, Ray and submitit.

Failures: in-process (``workers=1``) an exception propagates as it is, with a note naming the config. Elsewhere
a task whose worker dies (killed, out of memory, ``os._exit``) or that raises (also in the caller's thread) is
retried ``retries`` times (default 1) on a fresh worker; if it still fails, the sweep finishes every other task
(cached) and raises :class:`SweepError`, which names each failed config and why. A killed worker loses only the
task it was running (one run, or one batch of at most ``max_batch`` runs). Ctrl-C stops the workers and the
caller's task, and prints how many runs are cached and that the same command resumes; it raises
:class:`SweepInterrupted` (a ``KeyboardInterrupt``).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import dataclasses
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections

import numpy as np
import torch

from analysis.inputs import positive_int
from toymodels import batched as batched_engine
from toymodels import cache as run_cache
from toymodels import loop as loop_engine
from toymodels import setup
from toymodels.callback_base import Callback
from toymodels.config import FinetuneConfig

EXECUTORS = ("local", "ray", "slurm")
KINDS = ("batched", "sequential", "pretrain")
#: test hook: a local worker process (never the calling process) running a task that holds the config whose
#: sequential cache key (``config_key(cfg.as_dict())``) is this variable's value exits at once with code 3
KILL_HOOK = "LORA_THEORY_SWEEP_TEST_EXIT"
_IN_WORKER = False


@dataclass(frozen=True)
class Task:
    """A unit of work: ``configs`` trained together by the batched engine, or one config by the loop (with its
    custom ``callbacks``, one sequence per config, when it has any; ``callback_keys`` names them in equality
    and hashing: :func:`callbacks_key`), or (``kind="pretrain"``) the pretrained base model of one config,
    written to the run cache for the fine-tuning tasks that need it (:func:`fill_workers`)."""

    kind: str
    configs: tuple[FinetuneConfig, ...]
    callbacks: tuple[tuple[Callback, ...], ...] = field(default=(), compare=False, repr=False)
    callback_keys: tuple[str, ...] = ()

    def runs(self) -> list[tuple[FinetuneConfig, str]]:
        """The identity of each run of the task: (config, :func:`callbacks_key` of its callbacks)."""
        return list(zip(self.configs, self.callback_keys or ("",) * len(self.configs), strict=True))

    def callbacks_of(self, i: int) -> tuple[Callback, ...]:
        return self.callbacks[i] if self.callbacks else ()


class SweepError(RuntimeError):
    """Some tasks of a sweep failed after their retries; ``failures`` lists (config, reason) per failed run.
    Every other run finished and is cached: rerunning the sweep recomputes only the failed ones."""

    def __init__(self, failures: list[tuple[FinetuneConfig, str]], total: int):
        self.failures = failures
        lines = [f"{len(failures)} of {total} runs failed (the others are cached; a rerun retries only these):"]
        for cfg, why in failures:
            lines.append(f"  - {_short(cfg)}: {why.strip().splitlines()[-1] if why.strip() else why}")
        super().__init__("\n".join(lines))


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the workers were stopped; ``cached`` of ``total`` runs are in the cache."""

    def __init__(self, cached: int, total: int):
        super().__init__(f"sweep interrupted: {cached} of {total} runs are cached; run it again to resume")
        self.cached, self.total = cached, total


# ------------------------------------------------------------------------------------------------- planning


def plan(configs: Sequence[FinetuneConfig], *, batched: bool = True, max_batch: int = 16,
         callbacks: Sequence[Callback] | Callable | Sequence[Sequence[Callback]] | None = None) -> list[Task]:
    """The tasks of a sweep (each distinct run in exactly one task): a deterministic function of the list
    of configs (and of their callbacks' keys). Batchable configs without custom callbacks sharing every field
    but seed/dropout/lr/scaling, two or more of them, form batched tasks of at most ``max_batch`` runs; the rest
    (every run with custom callbacks among them) are sequential tasks of one run. Batched tasks come first
    (largest first: better load balance), then the sequential ones in the order of ``configs``. ``callbacks``:
    as :func:`run_sweep`'s."""
    max_batch = positive_int("max_batch", max_batch)
    configs = list(configs)
    per_run = resolve_callbacks(callbacks, configs)
    runs: dict[tuple[FinetuneConfig, str], tuple[Callback, ...]] = {}
    for c, cbs in zip(configs, per_run, strict=True):
        runs.setdefault((c, callbacks_key(cbs)), cbs)
    unique = [c for (c, key) in runs if not key]
    groups: dict[str, list[FinetuneConfig]] = {}
    alone: list[FinetuneConfig] = []
    for c in unique:
        if batched and _batchable(c):
            groups.setdefault(_batch_signature(c), []).append(c)
        else:
            alone.append(c)
    tasks = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members = batched_engine.canonical_batch(members)
        n_chunks = math.ceil(len(members) / max_batch)
        bounds = [round(i * len(members) / n_chunks) for i in range(n_chunks + 1)]
        tasks += [Task("batched", tuple(members[a:b])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    tasks.sort(key=lambda t: -len(t.configs))  # stable: ties keep the plan's order
    single = {c for members in groups.values() if len(members) < 2 for c in members}
    loop = set(alone) | single
    for (c, key), cbs in runs.items():
        if key:
            tasks.append(Task("sequential", (c,), callbacks=(cbs,), callback_keys=(key,)))
        elif c in loop:
            tasks.append(Task("sequential", (c,)))
    return tasks


#: a batched task is split for idle workers only into parts of at least this many runs: below it, the batched
#: engine's cost per run rises (fixed per-step costs shared by fewer runs; BENCHMARKS.md, "filling the workers")
MIN_SPLIT_RUNS = 2


def split_task(task: Task, parts: int) -> list[Task]:
    """A batched task cut into ``parts`` batched tasks at seed boundaries (the runs of a seed stay together: the
    engine holds data and base weights per seed), nearly equal in seeds, in the canonical order; a part of one run
    keeps its seeds' runs per seed, hence the engine's per-seed blocks and the bits of every run."""
    batch = batched_engine.canonical_batch(task.configs)
    seeds = list(dict.fromkeys(c.seed for c in batch))
    parts = max(1, min(parts, len(seeds)))
    bounds = [round(i * len(seeds) / parts) for i in range(parts + 1)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        chosen = set(seeds[a:b])
        out.append(Task("batched", tuple(c for c in batch if c.seed in chosen)))
    return out


def fill_workers(tasks: Sequence[Task], workers: int) -> list[Task]:
    """The fine-tuning tasks still to run, reshaped so that ``workers`` workers all have work: while there are
    fewer tasks than workers, the largest batched task that can be split (:func:`_splittable`) is split in two at
    a seed boundary (:func:`split_task`). A function of the tasks and the worker count; the results are the same
    bits whatever the split (the batched engine's numbers for a run depend on how many runs its seed has in the
    batch, which a split at seed boundaries keeps, not on the other seeds: tests/toymodels/test_sweep_fill.py),
    and a split task's runs are found in the cache by a later sweep with any worker count
    (:func:`cached_histories`)."""
    tasks = list(tasks)
    while len(tasks) < workers:
        candidates = [t for t in tasks if t.kind == "batched" and _splittable(t)]
        if not candidates:
            break
        big = max(candidates, key=lambda t: len(t.configs))
        i = tasks.index(big)
        tasks[i:i + 1] = split_task(big, 2)
    return tasks


def _splittable(task: Task) -> bool:
    """At least 2 seeds, ``2 * MIN_SPLIT_RUNS`` runs, and the same number of runs for every seed: the engine then
    trains each seed as one block of m runs, and so does every part (a batch with unequal counts trains each run as
    its own block, whose float sums can differ in the last bits: such a task is never split)."""
    counts = {}
    for c in task.configs:
        counts[c.seed] = counts.get(c.seed, 0) + 1
    return len(counts) >= 2 and len(task.configs) >= 2 * MIN_SPLIT_RUNS and len(set(counts.values())) == 1


def pretrain_tasks(tasks: Sequence[Task], threads: int) -> tuple[list[Task], dict[Task, set[str]]]:
    """One ``pretrain`` task per distinct base model the tasks need that is not cached yet (so that they train in
    parallel before the fine-tuning that needs them), and, per task, the bases it waits for."""
    bases: dict[str, FinetuneConfig] = {}
    needs: dict[Task, set[str]] = {}
    for t in tasks:
        keys = set()
        for c in t.configs:
            key = _base_key(c, threads)
            if key not in bases and not pretrained_cached(c, threads):
                bases[key] = c
            if key in bases:
                keys.add(key)
        needs[t] = keys
    pre = [Task("pretrain", (c,)) for c in bases.values()]
    return pre, needs


def resolve_callbacks(callbacks, configs: Sequence[FinetuneConfig]) -> list[tuple[Callback, ...]]:
    """One tuple of custom callbacks per config, from ``callbacks``:

    - ``None`` or an empty sequence: none;
    - a sequence of :class:`~toymodels.callback_base.Callback` objects: the same callbacks for every config (each run
      gets its own copy);
    - a callable ``cfg -> sequence of Callback``: called once per entry of ``configs``;
    - a list of sequences of Callback objects, one per config (``len(callbacks) == len(configs)``; an empty
      sequence: none for that config).

    ValueError (naming ``callbacks``) for anything else."""
    configs = list(configs)
    if callbacks is None:
        return [()] * len(configs)
    if callable(callbacks) and not isinstance(callbacks, Callback):
        out = [_as_callbacks(callbacks(c), f"callbacks({_short(c)})") for c in configs]
    elif isinstance(callbacks, Callback):
        raise ValueError(f"callbacks must be a sequence of Callback objects (or a callable, or one sequence per "
                         f"config), got a single {type(callbacks).__name__}: wrap it in a list")
    elif isinstance(callbacks, Sequence) and not isinstance(callbacks, str | bytes):
        items = list(callbacks)
        if all(isinstance(cb, Callback) for cb in items):
            out = [tuple(items)] * len(configs)
        elif all(isinstance(cb, Sequence) and not isinstance(cb, str | bytes) for cb in items):
            if len(items) != len(configs):
                raise ValueError(f"callbacks, as one sequence per config, must have len(configs) = {len(configs)} "
                                 f"entries, got {len(items)}")
            out = [_as_callbacks(cbs, f"callbacks[{i}]") for i, cbs in enumerate(items)]
        else:
            raise ValueError("callbacks must be a sequence of Callback objects, a callable cfg -> sequence, or one "
                             "sequence of Callback objects per config; got a mix: "
                             + ", ".join(sorted({type(cb).__name__ for cb in items})))
    else:
        raise ValueError(f"callbacks must be a sequence of Callback objects, a callable or one sequence per "
                         f"config, got {type(callbacks).__name__}")
    return out


def _as_callbacks(value, where: str) -> tuple[Callback, ...]:
    if isinstance(value, Callback) or not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ValueError(f"{where} must be a sequence of Callback objects, got {type(value).__name__}")
    for cb in value:
        if not isinstance(cb, Callback):
            raise ValueError(f"{where} must hold Callback objects, got {type(cb).__name__}")
    return tuple(value)


def callbacks_key(callbacks: Sequence[Callback]) -> str:
    """What identifies a run's custom callbacks: "" for none, else the digest of their
    :meth:`~toymodels.callback_base.Callback.full_key` list (the part of :func:`toymodels.loop.run_key` they add)."""
    if not callbacks:
        return ""
    return run_cache.config_key({"callbacks": [cb.full_key() for cb in callbacks]})


def _check_picklable(per_run: list[tuple[Callback, ...]], own_workers: bool) -> None:
    """ValueError naming the first callback that cannot travel to a worker (checked before any run starts)."""
    seen: set[int] = set()
    for cbs in per_run:
        for cb in cbs:
            if id(cb) in seen:
                continue
            seen.add(id(cb))
            name = f"{type(cb).__module__}.{type(cb).__qualname__}"
            try:
                pickle.loads(pickle.dumps(cb))
            except Exception as exc:  # noqa: BLE001  (PicklingError, AttributeError, TypeError, ...)
                raise ValueError(f"callbacks must pickle (each run gets a copy; workers receive them pickled): "
                                 f"{name} does not ({type(exc).__name__}: {exc}); define the class at the top "
                                 "level of a module and keep no lambdas, open files or locks in it") from exc
            if own_workers and type(cb).__module__ == "__main__":
                raise ValueError(f"callbacks must be importable by the worker processes: {name} is defined in "
                                 "__main__ (a script or a notebook); move it to a module, or pass workers=1 "
                                 "(in-process)")


def _fresh(callbacks: Sequence[Callback]) -> list[Callback]:
    """A copy of the callbacks for one run (the same pickle round trip a worker's copy went through)."""
    return [pickle.loads(pickle.dumps(cb)) for cb in callbacks]


def _batchable(cfg: FinetuneConfig) -> bool:
    try:
        batched_engine.check_batchable([cfg])
    except ValueError:
        return False
    return True


def _batch_signature(cfg: FinetuneConfig) -> str:
    fixed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in batched_engine.VARYING}
    return run_cache.config_key(fixed)


def _short(cfg: FinetuneConfig) -> str:
    """The fields of a config that differ from the defaults (what names it in a report)."""
    default = FinetuneConfig()
    diff = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(default, f.name)]
    return "FinetuneConfig(" + ", ".join(diff) + ")"


# ------------------------------------------------------------------------------------------------ execution


@contextlib.contextmanager
def _pinned_threads(threads: int):
    """torch's CPU threads and numpy's BLAS threads (a callback's ``np.linalg.norm`` / ``@`` sum in another order
    with another thread count) set to ``threads`` for the block: in-process as in the workers (started with
    ``OMP_NUM_THREADS=threads``), so a task's bits do not depend on where it runs or on the machine's cores."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


_TASK_LOCK = threading.RLock()  # see run_task


def run_task(task: Task, *, device: str | None = None, use_cache: bool = True, threads: int = 1,
             cache_root: str | None = None) -> list[dict[str, np.ndarray]]:
    """Train (or load) the runs of one task with ``threads`` torch threads; each finished run is written to the
    run cache at ``cache_root`` (default: this process's) by this process. Diverged runs are returned (cached
    with ``diverged_step``), never raised. This is what every executor calls."""
    if cache_root is not None and str(run_cache.cache_root()) != cache_root:
        os.environ["LORA_THEORY_CACHE"] = cache_root
    if _IN_WORKER and os.environ.get(KILL_HOOK):
        keys = {run_cache.config_key(c.as_dict()) for c in task.configs}
        if os.environ[KILL_HOOK] in keys:
            os._exit(3)
    # One task at a time per process: the thread counts are process-wide, and the loop seeds torch's global RNG
    # (per run; callbacks fork it), so tasks sharing a process (a thread-pool executor) would interleave their
    # draws; in a worker process of its own the lock is never contended.
    with _TASK_LOCK, _pinned_threads(threads):
        if task.kind == "pretrain":
            for c in task.configs:
                setup.pretrain(c, device)
            return []
        if task.kind == "batched":
            return batched_engine.finetune_many(list(task.configs), device, use_cache=use_cache,
                                                on_diverge="return")
        return [loop_engine.finetune(c, callbacks=_fresh(task.callbacks_of(i)), device=device, use_cache=use_cache,
                               on_diverge="return") for i, c in enumerate(task.configs)]


def cached_histories(task: Task, threads: int) -> list[dict[str, np.ndarray]] | None:
    """The task's histories if every run is cached (read in this process, nothing trained), else None. A batched
    task also counts as cached when an earlier sweep computed it split at seed boundaries (:func:`split_task`:
    a sweep on more workers), in any number of parts."""
    hit = _cached_as_is(task, threads)
    if hit is not None or task.kind != "batched":
        return hit
    order = {c: i for i, c in enumerate(task.configs)}
    for parts in range(2, len({c.seed for c in task.configs}) + 1):
        found: dict[FinetuneConfig, dict] = {}
        for sub in split_task(task, parts):
            hits = _cached_as_is(sub, threads)
            if hits is None:
                break
            found.update(zip(sub.configs, hits, strict=True))
        else:
            return [found[c] for c in sorted(found, key=order.__getitem__)]
    return None


def _base_key(cfg: FinetuneConfig, threads: int) -> str:
    with _pinned_threads(threads):
        return run_cache.config_key(cfg.pretrain_dict())


def pretrained_cached(cfg: FinetuneConfig, threads: int) -> bool:
    """Whether the pretrained base model of ``cfg`` is in the run cache (the key of :func:`toymodels.setup.pretrain`
    at ``threads`` torch threads)."""
    return (run_cache.cache_root() / "pretrain" / f"{_base_key(cfg, threads)}.npz").exists()


def _cached_as_is(task: Task, threads: int) -> list[dict[str, np.ndarray]] | None:
    with _pinned_threads(threads):
        if task.kind == "batched":
            batch = batched_engine.canonical_batch(task.configs)
            entries = [batched_engine.cache_entry(c, batch) for c in task.configs]
        else:
            entries = [("finetune", loop_engine.run_key(c, task.callbacks_of(i)))  # finetune's own key
                       for i, c in enumerate(task.configs)]
    out = []
    for namespace, key_dict in entries:
        hit = run_cache.load(run_cache.cache_root() / namespace / f"{run_cache.config_key(key_dict)}.npz")
        if hit is None:
            return None
        out.append(hit)
    return out


# --------------------------------------------------------------------------------------------------- backends


class _Failed:
    def __init__(self, reason: str, retry: bool = True):
        self.reason, self.retry = reason, retry


def _worker_main(fd: int, threads: int) -> None:
    """A local worker (``python -c``, started by :class:`_LocalPool`): receives (id, task, kwargs) on the socket
    ``fd``, sends back ("done", id, histories) or ("error", id, reason)."""
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    torch.set_num_threads(threads)
    conn = Connection(fd)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        ident, task, kwargs = msg
        try:
            conn.send(("done", ident, run_task(task, **kwargs)))
        except Exception as exc:  # noqa: BLE001  (reported to the parent, by config)
            conn.send(("error", ident, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class _LocalPool:
    """``workers`` worker processes (fresh interpreters: ``python -c``, so a caller's script is never re-imported,
    unlike multiprocessing's spawn), one task each at a time over a socket pair. A worker that dies fails only
    the task it held and is replaced (unlike ProcessPoolExecutor, where one death breaks the whole pool)."""

    def __init__(self, workers: int, threads: int):
        self.threads = threads
        self.capacity = workers
        self.idle: list = []
        self.busy: dict = {}  # handle -> (process, conn)
        self.results: dict = {}
        self.workers: list = []

    def _start(self):
        ours, theirs = socket.socketpair()
        code = f"from toymodels.sweep import _worker_main; _worker_main({theirs.fileno()}, {self.threads})"
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),), env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        worker = (proc, Connection(ours.detach()))
        self.workers.append(worker)
        return worker

    def submit(self, task: Task, kwargs: dict):
        worker = self.idle.pop() if self.idle else self._start()
        handle = _Handle()
        try:
            worker[1].send((id(handle), task, kwargs))
        except OSError as exc:
            self.results[handle] = _Failed(f"worker unreachable: {exc}")
            self._retire(worker)
            return handle
        self.busy[handle] = worker
        return handle

    def _retire(self, worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        proc, conn = worker
        with contextlib.suppress(Exception):
            conn.close()
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def wait(self, handles, timeout: float, also=()):
        """The handles done, waiting up to ``timeout`` seconds for one (or for a file descriptor in ``also`` to
        become readable)."""
        done = [h for h in handles if h in self.results]
        if done:
            return done
        waiting = {h: w for h, w in self.busy.items() if h in handles}
        ready = set(wait_connections([w[1] for w in waiting.values()] + list(also), timeout=timeout))
        for h, (proc, conn) in waiting.items():
            if conn not in ready:
                continue
            try:
                status, _, payload = conn.recv()
            except (EOFError, OSError):  # the socket closed: the worker died
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                self.results[h] = _Failed(f"worker process died (exit code {proc.returncode})")
                self._retire(self.busy.pop(h))
                continue
            self.results[h] = payload if status == "done" else _Failed(payload)
            self.idle.append(self.busy.pop(h))
        return [h for h in handles if h in self.results]

    def result(self, handle):
        return self.results.pop(handle)

    def prune(self) -> None:
        """Retire the idle workers that died since their last task (killed between two sweeps)."""
        for worker in [w for w in self.idle if w[0].poll() is not None]:
            self._retire(worker)

    def close(self, cancel: bool = False) -> None:
        for proc, conn in self.workers:
            if not cancel and proc.poll() is None:
                with contextlib.suppress(Exception):
                    conn.send(None)
        for worker in list(self.workers):
            proc = worker[0]
            if not cancel:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            self._retire(worker)
        self.workers, self.idle, self.busy = [], [], {}


#: threads -> (pool, the environment it was started in): idle local workers kept between sweeps
_POOLS: dict[int, tuple[_LocalPool, tuple]] = {}
# not part of the environment a pool is kept for: PYTEST_CURRENT_TEST changes at every test and means nothing to a
# worker; the run cache's path is sent with every task (run_task), so a pool serves sweeps on any cache; torch
# itself sets TORCHINDUCTOR_CACHE_DIR the first time a process imports its compiler stack (torch.optim does), which
# would replace the workers of the first sweep for nothing (they compile nothing)
_ENV_IGNORED = ("PYTEST_CURRENT_TEST", "LORA_THEORY_CACHE", "TORCHINDUCTOR_CACHE_DIR")


def _environment() -> tuple:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_IGNORED}
    return env, os.getcwd(), sys.executable, tuple(sys.path)


def _local_pool(workers: int, threads: int) -> _LocalPool:
    """The idle pool of an earlier sweep with the same ``threads``, if it was started in the same environment
    (variables, working directory, interpreter, sys.path: what a worker's imports and data paths depend on),
    else a fresh one (the old one is stopped)."""
    env = _environment()
    held = _POOLS.pop(threads, None)
    if held is not None:
        pool, started_in = held
        if started_in == env:
            pool.prune()
            pool.capacity = workers
            return pool
        pool.close()
    pool = _LocalPool(workers, threads)
    pool.started_in = env
    return pool


def _keep_pool(pool: _LocalPool) -> None:
    """Keep the workers of a sweep that finished cleanly for the next sweep of this process."""
    old = _POOLS.pop(pool.threads, None)
    if old is not None and old[0] is not pool:
        old[0].close()
    _POOLS[pool.threads] = (pool, pool.started_in)


def shutdown_workers() -> None:
    """Stop the idle local worker processes that :func:`run_sweep` keeps between sweeps (also done at exit)."""
    while _POOLS:
        _, (pool, _) = _POOLS.popitem()
        pool.close()


atexit.register(shutdown_workers)


class _Handle:
    """A task in flight on the local pool (hashable by identity)."""


#: whether the calling process runs tasks of a local sweep itself, as one of its ``workers`` (then ``workers=N``
#: starts N - 1 worker processes): the caller has torch imported and its first task starts at once, while a fresh
#: worker process first spends ~3 s of CPU (interpreter, ``import torch``, torch's compiler stack on the first
#: ``torch.optim`` use, the data), which on a laptop's few cores is time taken from the runs (BENCHMARKS.md, issue
#: 18). False: ``workers=N`` starts N worker processes and the caller only coordinates.
CALLER_RUNS_TASKS = True


class _CallerStopped(BaseException):
    """Raised in the caller's task thread to stop its task (Ctrl-C or an error in the sweep)."""


class _WithCaller:
    """A local pool plus the calling process as one more worker (:data:`CALLER_RUNS_TASKS`): the caller runs one
    task at a time in a thread of its own through :func:`run_task` (the same pinned thread counts as a worker
    process, hence the same bits; the coordinating thread meanwhile only waits and collects results, and touches
    no thread count). A task the test hook :data:`KILL_HOOK` names always goes to a worker process. Stopping the
    sweep (Ctrl-C) stops the caller's task at its next Python statement."""

    def __init__(self, pool: _LocalPool, tasks: Sequence[Task], threads: int):
        self.pool = pool
        self.capacity = pool.capacity + 1
        self.mine: set = set()  # handles of the pool's tasks in flight
        self.handle: _Handle | None = None  # the caller's task in flight
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        # the caller's thread writes a byte here when its task ends: the coordinating thread sleeps in one wait on
        # the workers' sockets and this pipe, never polls (on a busy machine, each wake-up of the coordinating
        # thread would take the GIL from the caller's task, which then waits for the OS to run it again)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.outcome = None
        hook = os.environ.get(KILL_HOOK)
        with _pinned_threads(threads):  # the hook's key is the config's key at ``threads`` threads
            self.hooked = {t for t in tasks if hook and hook in {run_cache.config_key(c.as_dict())
                                                                 for c in t.configs}}

    def _caller_free(self, task: Task) -> bool:
        return self.handle is None and task not in self.hooked

    def accepts(self, task: Task) -> bool:
        return self._caller_free(task) or len(self.mine) < self.pool.capacity

    def submit(self, task: Task, kwargs: dict):
        if not self._caller_free(task):
            handle = self.pool.submit(task, kwargs)
            self.mine.add(handle)
            return handle
        self.handle = handle = _Handle()
        self.done.clear()

        def work():
            try:
                try:
                    outcome = run_task(task, **kwargs)
                except _CallerStopped:
                    outcome = _Failed("stopped")
                except Exception as exc:  # noqa: BLE001  (reported like a worker's error, by config)
                    outcome = _Failed(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                self.outcome = outcome
                self.done.set()
                os.write(self.wake_w, b"x")
            except (_CallerStopped, OSError):
                pass

        self.thread = threading.Thread(target=work, name="lora-theory-sweep-caller", daemon=True)
        self.thread.start()
        return handle

    def wait(self, handles, timeout: float):
        mine = self.handle is not None and self.handle in handles
        theirs = [h for h in handles if h is not self.handle]
        if not (mine and self.done.is_set()):
            if theirs:
                self.pool.wait(theirs, timeout, also=(self.wake_r,) if mine else ())
            elif mine:
                self.done.wait(timeout)
        done = [self.handle] if mine and self.done.is_set() else []
        return done + (self.pool.wait(theirs, 0) if theirs else [])

    def result(self, handle):
        if handle is self.handle:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 64)
            outcome, self.outcome, self.handle, self.thread = self.outcome, None, None, None
            return outcome
        self.mine.discard(handle)
        return self.pool.result(handle)

    def cancel(self, handles) -> None:
        thread = self.thread
        if thread is not None and thread.is_alive():
            import ctypes

            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_CallerStopped))
            thread.join(timeout=30)

    def close(self, cancel: bool = False) -> None:
        self.pool.close(cancel=cancel)
        self.release()

    def release(self) -> None:
        """Close the wake-up pipe (the sweep is over; kept open while a stopped task's thread still runs: its
        descriptor numbers must not be reused under it)."""
        if self.thread is not None and self.thread.is_alive():
            return
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _FuturesBackend:
    """Any ``concurrent.futures.Executor`` (the caller's; not shut down here)."""

    def __init__(self, executor: cf.Executor, workers: int | None):
        self.executor = executor
        self.capacity = workers or getattr(executor, "_max_workers", None) or os.cpu_count() or 1

    def submit(self, task: Task, kwargs: dict):
        return self.executor.submit(run_task, task, **kwargs)

    def wait(self, handles, timeout: float):
        return list(cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED).done)

    def result(self, handle):
        try:
            return handle.result()
        except Exception as exc:  # noqa: BLE001
            return _Failed(f"{type(exc).__name__}: {exc}")

    def close(self, cancel: bool = False) -> None:
        pass


class _RayBackend:
    """Ray tasks on the cluster at ``$RAY_ADDRESS``, an already initialised one, or a local one started here
    (``ray.init(num_cpus=workers)``, kept for the rest of the process: later sweeps reuse it)."""

    def __init__(self, workers: int | None, threads: int, options: dict):
        import ray

        self.ray = ray
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(address=os.environ["RAY_ADDRESS"], **options)
            else:
                ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, **options)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = workers or max(1, cpus // threads)
        self.remote = ray.remote(num_cpus=threads, max_retries=0)(run_task)  # retries are the sweep's

    def submit(self, task: Task, kwargs: dict):
        return self.remote.remote(task, **kwargs)

    def wait(self, handles, timeout: float):
        ready, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        return ready

    def result(self, handle):
        try:
            return self.ray.get(handle)
        except Exception as exc:  # noqa: BLE001  (RayTaskError, WorkerCrashedError, ...)
            return _Failed(f"{type(exc).__name__}: {exc}")

    def close(self, cancel: bool = False) -> None:
        pass

    def cancel(self, handles) -> None:
        for h in handles:
            with contextlib.suppress(Exception):
                self.ray.cancel(h, force=True)


class _SubmititBackend:
    """One submitit job per task (``AutoExecutor``: SLURM where available, or ``cluster="local"|"debug"``)."""

    def __init__(self, workers: int | None, threads: int, options: dict):
        import submitit

        options = dict(options)
        folder = options.pop("folder", None) or str(run_cache.cache_root() / "submitit" / "%j")
        cluster = options.pop("cluster", None)
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        params = {"timeout_min": 60, "cpus_per_task": threads}
        if self.executor.cluster == "slurm":
            params["slurm_array_parallelism"] = workers or 256
        params.update(options)
        self.executor.update_parameters(**params)
        self.capacity = workers or (os.cpu_count() or 1 if self.executor.cluster != "slurm" else 256)

    def submit(self, task: Task, kwargs: dict):
        return self.executor.submit(run_task, task, **kwargs)

    def wait(self, handles, timeout: float):
        end = time.monotonic() + timeout
        while True:
            done = [h for h in handles if h.done()]
            if done or time.monotonic() >= end:
                return done
            time.sleep(0.05)

    def result(self, handle):
        try:
            return handle.result()
        except Exception as exc:  # noqa: BLE001  (FailedJobError, UncompletedJobError: the job's stderr)
            return _Failed(f"{type(exc).__name__}: {exc}")

    def close(self, cancel: bool = False) -> None:
        pass

    def cancel(self, handles) -> None:
        for h in handles:
            with contextlib.suppress(Exception):
                h.cancel(check=False)


# ----------------------------------------------------------------------------------------------------- sweep


def run_sweep(configs: Sequence[FinetuneConfig], *, executor: str | cf.Executor = "local",
              workers: int | None = None, device: str | torch.device | None = None, progress: bool | None = None,
              use_cache: bool = True, on_diverge: str = "raise", batched: bool = True, max_batch: int = 16,
              threads: int = 1, retries: int = 1, executor_options: dict | None = None,
              callbacks: Sequence[Callback] | Callable | Sequence[Sequence[Callback]] | None = None,
              table: str | os.PathLike | None = None) -> list[dict[str, np.ndarray]]:
    """Run many configurations; one history per config, in order (see the module docstring for the whole story).

    ``executor``: "local", "ray", "slurm" or a ``concurrent.futures.Executor``; ``workers``: parallel tasks
    (None: one per CPU core locally, every CPU of a Ray cluster; 1: in-process for "local"). ``batched``: route
    batchable groups to the batched engine (False: every run through the loop). ``threads``: torch threads per
    task (part of each run's cache key). ``retries``: new attempts for a failed task. ``executor_options``:
    keywords of ``ray.init`` ("ray") or ``folder`` / ``cluster`` / ``update_parameters`` keywords ("slurm").
    ``callbacks``: custom :class:`toymodels.callback_base.Callback` objects for the runs, as one sequence for every
    config, a callable ``cfg -> sequence``, or one sequence per config (:func:`resolve_callbacks`); a run with
    callbacks goes through ``finetune(cfg, callbacks=...)`` and its history holds their results, the same bits
    and the same cache entry as that direct call. They must pickle (ValueError naming the callback otherwise).
    ``table``: a directory to write the tidy results table into (:mod:`toymodels.results`: ``runs.parquet`` /
    ``runs.csv``, one row per distinct config with its status and summary metrics, and the per-step histories
    ``steps.parquet`` / ``steps.csv``), also when runs diverged or failed (written before the error is raised).
    """
    configs = list(configs)
    for c in configs:
        if not isinstance(c, FinetuneConfig):
            raise ValueError(f"configs must be FinetuneConfig objects, got {type(c).__name__}")
    if on_diverge not in ("raise", "return"):
        raise ValueError(f"on_diverge must be 'raise' or 'return', got {on_diverge!r}")
    if not isinstance(executor, cf.Executor) and executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS} or a concurrent.futures.Executor, got {executor!r}")
    if workers is not None:
        workers = positive_int("workers", workers)
    threads = positive_int("threads", threads)
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
    per_run = resolve_callbacks(callbacks, configs)
    _check_picklable(per_run, own_workers=executor == "local" and workers != 1)
    ids = [(c, callbacks_key(cbs)) for c, cbs in zip(configs, per_run, strict=True)]
    tasks = plan(configs, batched=batched, max_batch=max_batch, callbacks=per_run)
    total = sum(len(t.configs) for t in tasks)
    found: dict[tuple[FinetuneConfig, str], dict[str, np.ndarray]] = {}
    pending: list[Task] = []
    for t in tasks:
        hit = cached_histories(t, threads) if use_cache else None
        if hit is None:
            pending.append(t)
        else:
            found.update(zip(t.runs(), hit, strict=True))
    kwargs = dict(device=None if device is None else str(device), use_cache=use_cache, threads=threads,
                  cache_root=str(run_cache.cache_root().resolve()))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - sum(len(t.configs) for t in pending), desc="runs", unit="run",
               disable=None if progress is None else not progress, leave=False)
    failures: list[tuple[FinetuneConfig, str]] = []
    try:
        if pending:
            wanted = workers or os.cpu_count() or 1
            if wanted > 1 and not (executor == "local" and len(pending) == 1 and len(pending[0].configs) == 1):
                pending = fill_workers(pending, wanted)  # split batched tasks so that no worker idles
            pre, needs = pretrain_tasks(pending, threads) if use_cache and wanted > 1 else ([], {})
            local_workers = min(wanted, max(len(pending), len(pre)))
            if executor == "local" and local_workers == 1:
                _run_in_process(pending, kwargs, found, failures, bar)
            else:
                _run_distributed(pre + pending, needs, kwargs, found, failures, bar, executor, workers, threads,
                                 retries, local_workers, executor_options or {})
    except KeyboardInterrupt:
        bar.close()
        cached = len(found) if use_cache else 0
        print(f"\nsweep interrupted: workers stopped; {cached} of {total} runs are cached"
              + ("; run the same command again to resume (cached runs are not recomputed)" if use_cache else ""),
              file=sys.stderr, flush=True)
        raise SweepInterrupted(cached, total) from None
    bar.close()
    if table is not None:
        from toymodels import results

        by_config = {c: found[(c, key)] for c, key in ids if (c, key) in found}
        results.write_tables(table, *results.tables(configs, by_config, dict(failures)))
    if failures:
        raise SweepError(failures, total)
    out, given = [], set()
    for run in ids:  # a run listed twice gets its own copy
        hist = found[run]
        out.append({k: v.copy() for k, v in hist.items()} if id(hist) in given else hist)
        given.add(id(hist))
    if on_diverge == "raise":
        for c, hist in zip(configs, out, strict=True):
            if "diverged_step" in hist:
                raise loop_engine.TrainingDiverged(int(hist["diverged_step"][0]), c)
    return out


def _run_in_process(pending, kwargs, found, failures, bar) -> None:
    """The tasks one after another in this process. An exception propagates as it is (as the loop over
    ``finetune`` always did: a caller may catch its type), with a note naming the config; the runs finished
    before it are cached."""
    for task in pending:
        try:
            hists = run_task(task, **kwargs)
        except Exception as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(f"while running {_name(task, 0)}"
                             + (f" and {len(task.configs) - 1} more in its batch" if len(task.configs) > 1 else ""))
            raise
        found.update(zip(task.runs(), hists, strict=True))
        bar.update(len(task.configs))


def _with_callbacks(task: Task, i: int) -> str:
    cbs = task.callbacks_of(i)
    return f" (with callbacks [{', '.join(type(cb).__qualname__ for cb in cbs)}])" if cbs else ""


def _name(task: Task, i: int) -> str:
    """The config (and custom callbacks) of a task's run i, as a report names it."""
    return _short(task.configs[i]) + _with_callbacks(task, i)


def _run_distributed(pending, needs, kwargs, found, failures, bar, executor, workers, threads, retries,
                     local_workers, options) -> None:
    """The tasks on the workers of ``executor``; a task starts once the ``pretrain`` tasks of the bases it
    ``needs`` are done (those come first in ``pending``)."""
    if isinstance(executor, cf.Executor):
        backend = _FuturesBackend(executor, workers)
    elif executor == "local" and CALLER_RUNS_TASKS:
        backend = _WithCaller(_local_pool(local_workers - 1, threads), pending, threads)
    elif executor == "local":
        backend = _local_pool(local_workers, threads)
    elif executor == "ray":
        backend = _RayBackend(workers, threads, options)
    else:
        backend = _SubmititBackend(workers, threads, options)
    queue = list(pending)
    attempts: dict[Task, int] = {}
    running: dict = {}  # handle -> task
    waiting_for = {t: set(needs.get(t, ())) for t in queue}
    base_of = {t: _base_key(t.configs[0], threads) for t in queue if t.kind == "pretrain"}
    try:
        while queue or running:
            while len(running) < backend.capacity:
                task = next((t for t in queue if not waiting_for.get(t) and _accepts(backend, t)), None)
                if task is None:
                    break
                queue.remove(task)
                attempts[task] = attempts.get(task, 0) + 1
                running[backend.submit(task, kwargs)] = task
            for handle in backend.wait(list(running), timeout=0.5):
                task = running.pop(handle)
                res = backend.result(handle)
                if task.kind == "pretrain":
                    if isinstance(res, _Failed) and attempts[task] <= retries:
                        queue.insert(0, task)
                        continue
                    # done, or failed for good: the tasks waiting for it go on (they pretrain it themselves)
                    for t in waiting_for:
                        waiting_for[t].discard(base_of[task])
                    continue
                if isinstance(res, _Failed):
                    if attempts[task] <= retries:
                        queue.append(task)
                    else:
                        failures.extend((c, res.reason.rstrip() + _with_callbacks(task, i))
                                        for i, c in enumerate(task.configs))
                    continue
                found.update(zip(task.runs(), res, strict=True))
                bar.update(len(task.configs))
    except BaseException:
        if hasattr(backend, "cancel"):
            backend.cancel(list(running))
        backend.close(cancel=True)
        raise
    if isinstance(backend, _WithCaller):
        backend.release()
        _keep_pool(backend.pool)
    elif isinstance(backend, _LocalPool):
        _keep_pool(backend)
    else:
        backend.close()


def _accepts(backend, task: Task) -> bool:
    return backend.accepts(task) if hasattr(backend, "accepts") else True
