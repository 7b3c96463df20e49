"""Sweeps fill the workers (issue 18 item 1): pretrainings are tasks of their own that run before the fine-tuning
that needs them, batched groups are split at seed boundaries when workers would idle, and the results are the same
bits for any worker count (the batched engine's numbers do not depend on which runs share its batch)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest

from toymodels import FinetuneConfig, batched, sweep

TINY = dict(dataset="synthetic", widths=(16, 32, 32, 4), n_pretrain=256, pretrain_steps=20, n_finetune=64,
            n_test=64, steps=25, record_every=5)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))
    return tmp_path / "runs"


def grid(seeds=6, rates=(0.0, 0.1), **changes):
    return [FinetuneConfig(seed=s, dropout=p, **{**TINY, **changes}) for s in range(seeds) for p in rates]


def same_bits(a, b) -> bool:
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k], equal_nan=True) for k in x)
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("changes", [{}, {"placement": "bottleneck", "optimizer": "sgd", "lr": 0.05},
                                     {"recorders": ("loss", "norms", "rows", "grads")}])
def test_batched_numbers_do_not_depend_on_the_other_seeds(changes, cache_dir):
    """What makes the split safe: every run of a batch of 12 (6 seeds x 2 dropout rates) has the same bits when
    trained in two batches of 6 or in uneven batches (4 + 8) cut at seed boundaries (each seed keeps its 2 runs)."""
    configs = grid(**changes)
    whole = batched.finetune_many(configs, use_cache=False)
    halves = batched.finetune_many(configs[:6], use_cache=False) + batched.finetune_many(configs[6:], use_cache=False)
    uneven = batched.finetune_many(configs[:4], use_cache=False) + batched.finetune_many(configs[4:], use_cache=False)
    assert same_bits(whole, halves) and same_bits(whole, uneven)


def test_a_task_with_unequal_runs_per_seed_is_never_split(cache_dir):
    """With unequal counts the engine trains every run as its own block, whose sums can differ in the last bits
    from a seed block (here with bottleneck dropout: that is why such a task keeps its batch)."""
    cfg = grid(placement="bottleneck")
    ragged = cfg[:3] + cfg[4:6] + cfg[8:10]  # seed 0 twice, seed 1 once, seeds 2 and 4 twice
    (task,) = sweep.plan(ragged)
    assert sweep.fill_workers([task], 4) == [task]
    per_run = batched.finetune_many(cfg[:3], use_cache=False)  # seed 0 x2, seed 1 x1: per-run blocks
    seed_blocks = batched.finetune_many(cfg[:2], use_cache=False)  # seed 0 x2: one block of 2
    assert not same_bits(per_run[:2], seed_blocks)  # the reason (if this ever holds, splitting could be freer)


def test_fill_workers_splits_at_seed_boundaries_only_when_workers_idle():
    tasks = sweep.plan(grid())
    assert [(t.kind, len(t.configs)) for t in tasks] == [("batched", 12)]
    assert sweep.fill_workers(tasks, 1) == tasks
    two = sweep.fill_workers(tasks, 2)
    assert [len(t.configs) for t in two] == [6, 6]
    seeds = [{c.seed for c in t.configs} for t in two]
    assert seeds == [{0, 1, 2}, {3, 4, 5}]  # a seed's runs stay together
    assert {c for t in two for c in t.configs} == set(tasks[0].configs) and sum(len(t.configs) for t in two) == 12
    four = sweep.fill_workers(tasks, 4)
    assert len(four) == 4 and all(len({c.seed for c in t.configs}) >= 1 for t in four)
    assert len(sweep.fill_workers(tasks, 64)) == 6  # down to one seed (2 runs) per task, never below
    one_seed = sweep.plan(grid(seeds=1, rates=(0.0, 0.1, 0.2, 0.3)))
    assert sweep.fill_workers(one_seed, 2) == one_seed  # one seed: nothing to split


class _Recording(cf.ThreadPoolExecutor):
    """A thread pool that records, at each submission, the task and which pretrain tasks had finished."""

    def __init__(self, workers):
        super().__init__(workers)
        self.log, self.finished, self.lock = [], set(), threading.Lock()

    def submit(self, fn, task, **kwargs):
        with self.lock:
            self.log.append((task, frozenset(self.finished)))
        fut = super().submit(fn, task, **kwargs)
        if task.kind == "pretrain":
            fut.add_done_callback(lambda f, s=task.configs[0].seed: self._done(s))
        return fut

    def _done(self, seed):
        with self.lock:
            self.finished.add(seed)


def test_pretrainings_run_first_as_their_own_tasks_and_results_match_one_worker(cache_dir, tmp_path, monkeypatch):
    configs = grid()
    with _Recording(2) as pool:
        hists = sweep.run_sweep(configs, executor=pool, workers=2, progress=False)
    kinds = [t.kind for t, _ in pool.log]
    assert kinds == ["pretrain"] * 6 + ["batched", "batched"]
    for task, finished in pool.log:
        if task.kind == "batched":  # started only once the bases of its seeds were pretrained
            assert {c.seed for c in task.configs} <= finished
    # the same bits as one worker in-process on an empty cache (no split, no pretrain tasks)
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "other"))
    assert same_bits(hists, sweep.run_sweep(configs, workers=1, progress=False))
    # and a sweep on one worker over the first cache finds the split runs (nothing recomputed)
    monkeypatch.setenv("LORA_THEORY_CACHE", str(cache_dir))
    (task,) = sweep.plan(configs)
    by_config = dict(zip(configs, hists, strict=True))
    assert same_bits(sweep.cached_histories(task, 1), [by_config[c] for c in task.configs])


def test_local_workers_same_bits_as_in_process(cache_dir, tmp_path, monkeypatch):
    configs = grid(seeds=4)
    two = sweep.run_sweep(configs, workers=2, progress=False)
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "other"))
    assert same_bits(two, sweep.run_sweep(configs, workers=1, progress=False))


class _Reversed(cf.ThreadPoolExecutor):
    """A thread pool of 3 whose tasks sleep 0.6, 0.3, 0.9 s (cycling) before they run: they finish in another
    order than they were submitted in."""

    def __init__(self):
        super().__init__(3)
        self.submitted, self.finished, self.lock = [], [], threading.Lock()

    def submit(self, fn, task, **kwargs):
        with self.lock:
            self.submitted.append(task)
            delay = 0.3 * (3 - len(self.submitted) % 3)

        def slow():
            time.sleep(delay)
            out = fn(task, **kwargs)
            with self.lock:
                self.finished.append(task)
            return out

        return super().submit(slow)


def test_results_do_not_depend_on_the_order_tasks_finish_in(cache_dir, tmp_path, monkeypatch):
    """Tasks finishing in another order than they started (each fine-tuning task waits only for its own bases):
    the same bits as one worker in-process."""
    configs = grid(seeds=6, rates=(0.0, 0.1, 0.2))
    with _Reversed() as pool:
        hists = sweep.run_sweep(configs, executor=pool, workers=3, progress=False)
    assert pool.finished != pool.submitted and len(pool.finished) == len(pool.submitted) == 6 + 3
    pre = {t.configs[0].seed: i for i, t in enumerate(pool.finished) if t.kind == "pretrain"}
    for i, task in enumerate(pool.finished):  # each fine-tuning task after its own bases, not after all of them
        if task.kind == "batched":
            assert all(pre[c.seed] < i for c in task.configs)
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "other"))
    assert same_bits(hists, sweep.run_sweep(configs, workers=1, progress=False))


@pytest.mark.parametrize("caller_runs_tasks", [True, False])
def test_local_workers_with_and_without_the_caller_same_bits(caller_runs_tasks, cache_dir, tmp_path, monkeypatch):
    """workers=3 on the local pool: the calling process and 2 worker processes (or 3 processes): 6 pretrainings and
    3 fine-tuning tasks finishing in whatever order the processes give, the same bits as in-process."""
    monkeypatch.setattr(sweep, "CALLER_RUNS_TASKS", caller_runs_tasks)
    sweep.shutdown_workers()  # count this sweep's processes only
    configs = grid(seeds=6)
    three = sweep.run_sweep(configs, workers=3, progress=False)
    assert len(sweep._POOLS[1][0].workers) == (2 if caller_runs_tasks else 3)
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "other"))
    assert same_bits(three, sweep.run_sweep(configs, workers=1, progress=False))
