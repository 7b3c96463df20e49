"""toymodels.sweep / sweep.run_sweep with the real engines (no mocks): the plan is deterministic, every executor
(in-process, local worker processes, a ProcessPoolExecutor, a local Ray cluster, submitit's local executor)
gives the in-process histories bit for bit, a killed worker loses only its run and a rerun resumes, two sweeps
share one cache concurrently, a corrupt entry is recomputed, divergence and bad input are handled as documented;
runs with custom callbacks go through finetune (same cache entry and bits as a direct call) on every executor.

Synthetic data, tiny widths, a few steps: the time goes into starting processes (Ray ~10 s, once per module)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from toymodels import batched, callback_base, config, loop, sweep
from toymodels import cache as run_cache
from toymodels.callbacks import WeightSnapshots

TINY = dict(dataset="synthetic", widths=(8, 16, 16, 4), n_pretrain=64, n_finetune=32, n_test=64,
            pretrain_steps=5, steps=6, batch_size=8, record_every=3)


def cfg(**changes) -> config.FinetuneConfig:
    return config.FinetuneConfig(**{**TINY, **changes})


# a batched group (2 seeds x 2 dropout rates), two runs the batched engine cannot take (loop), one duplicate
CONFIGS = ([cfg(seed=s, dropout=p) for s in (0, 1) for p in (0.0, 0.3)]
           + [cfg(method="dora", seed=0), cfg(recorders=("loss", "moments"), seed=1)])
SWEEP = CONFIGS + [CONFIGS[0]]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process sweep (workers=1): the oracle of every executor."""
    root = tmp_path_factory.mktemp("reference")
    mp_env = os.environ.get("LORA_THEORY_CACHE")
    os.environ["LORA_THEORY_CACHE"] = str(root)
    try:
        return sweep.run_sweep(SWEEP, workers=1, progress=False)
    finally:
        if mp_env is None:
            del os.environ["LORA_THEORY_CACHE"]
        else:
            os.environ["LORA_THEORY_CACHE"] = mp_env


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def assert_bitwise_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for key in w:
            assert g[key].dtype == w[key].dtype and np.array_equal(g[key], w[key], equal_nan=True), key


def entries(root) -> dict[str, int]:
    """Cached run files -> mtime (ns)."""
    return {str(p): p.stat().st_mtime_ns for ns in ("finetune", batched.NAMESPACE) for p in (root / ns).glob("*.npz")}


# ------------------------------------------------------------------------------------------------------ plan


def test_plan_routes_and_chunks_deterministically():
    tasks = sweep.plan(SWEEP)
    assert [(t.kind, len(t.configs)) for t in tasks] == [("batched", 4), ("sequential", 1), ("sequential", 1)]
    assert {c for t in tasks for c in t.configs} == set(CONFIGS)  # each distinct config once
    assert sweep.plan(list(reversed(SWEEP)))[0] == tasks[0]  # a batch is a set: canonical order
    assert all(t.kind == "sequential" for t in sweep.plan(SWEEP, batched=False))
    grid = [cfg(seed=s, dropout=p) for p in (0.0, 0.1, 0.2) for s in range(5)]  # 15 runs, 5 seeds
    chunks = sweep.plan(grid, max_batch=4)
    assert sorted(len(t.configs) for t in chunks) == [3, 4, 4, 4]
    in_order = sorted(chunks, key=lambda t: batched.canonical_batch(grid).index(t.configs[0]))
    assert [c for t in in_order for c in t.configs] == batched.canonical_batch(grid)  # consecutive: seeds together
    lone = sweep.plan([cfg(), cfg(method="dora")])  # a batchable config alone goes to the loop
    assert [t.kind for t in lone] == ["sequential", "sequential"]


# ---------------------------------------------------------------------------------------- bit-for-bit equality


def test_reference_matches_the_engines(reference):
    """The in-process sweep is what each engine gives for its task: the batched group's runs equal
    finetune_many on the group, the rest equal finetune (and the duplicate is a copy)."""
    group = CONFIGS[:4]
    want = batched.finetune_many(group, use_cache=False)
    assert_bitwise_equal(reference[:4], want)
    assert_bitwise_equal(reference[4:6], [loop.finetune(c, use_cache=False) for c in CONFIGS[4:]])
    assert_bitwise_equal([reference[-1]], [reference[0]])
    assert reference[-1] is not reference[0]  # a copy: mutating one leaves the other


def test_local_workers_bitwise(reference, cache_dir):
    got = sweep.run_sweep(SWEEP, workers=2, progress=False)
    assert_bitwise_equal(got, reference)
    assert len(entries(cache_dir)) == len(CONFIGS)  # each run written by the worker that ran it
    assert_bitwise_equal(sweep.run_sweep(SWEEP, workers=2, progress=False), reference)  # from the cache


def test_executor_instance_bitwise(reference, cache_dir):
    """Any concurrent.futures.Executor (a thread pool here: cheap to start; every task pins 1 thread)."""
    with cf.ThreadPoolExecutor(2) as pool:
        got = sweep.run_sweep(SWEEP, executor=pool, progress=False)
    assert_bitwise_equal(got, reference)


def test_ray_bitwise(reference, cache_dir, ray_cluster):
    got = sweep.run_sweep(SWEEP, executor="ray", workers=2, progress=False)
    assert_bitwise_equal(got, reference)
    assert len(entries(cache_dir)) == len(CONFIGS)


def test_submitit_local_bitwise(reference, cache_dir, tmp_path):
    pytest.importorskip("submitit")
    got = sweep.run_sweep(SWEEP, executor="slurm", workers=2, progress=False,
                          executor_options={"cluster": "local", "folder": str(tmp_path / "jobs"), "timeout_min": 5})
    assert_bitwise_equal(got, reference)
    assert len(entries(cache_dir)) == len(CONFIGS)


# ------------------------------------------------------------------------------------------ failures, resume


def test_killed_worker_loses_only_its_run_and_a_rerun_resumes(reference, cache_dir, monkeypatch):
    victim = CONFIGS[4]  # a sequential task
    with sweep._pinned_threads(1):
        monkeypatch.setenv(sweep.KILL_HOOK, run_cache.config_key(victim.as_dict()))
    with pytest.raises(sweep.SweepError) as info:
        sweep.run_sweep(SWEEP, workers=2, progress=False, retries=1)
    assert [c for c, _ in info.value.failures] == [victim]
    assert "worker process died (exit code 3)" in info.value.failures[0][1]
    assert "method='dora'" in str(info.value)  # the report names the config
    survived = entries(cache_dir)
    assert len(survived) == len(CONFIGS) - 1
    monkeypatch.delenv(sweep.KILL_HOOK)
    got = sweep.run_sweep(SWEEP, workers=2, progress=False)
    assert_bitwise_equal(got, reference)
    after = entries(cache_dir)
    assert len(after) == len(CONFIGS) and all(after[p] == t for p, t in survived.items())  # not recomputed


def test_two_sweeps_share_one_cache_concurrently(reference, cache_dir, tmp_path):
    """Two processes run the same sweep into one cache at the same time (each with 2 workers): both finish with
    the reference numbers and every entry in the cache is whole (checksum)."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_sweep import SWEEP
        from toymodels import callback_base, config, loop, sweep
        hists = sweep.run_sweep(SWEEP, workers=2, progress=False)
        np.savez(sys.argv[1], **{{f"{{i}}/{{k}}": v for i, h in enumerate(hists) for k, v in h.items()}})
    """)
    outs = [tmp_path / f"out{i}.npz" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(o)], env={**os.environ}) for o in outs]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for out in outs:
        with np.load(out) as data:
            got = [{k.split("/", 1)[1]: data[k] for k in data.files if k.split("/")[0] == str(i)}
                   for i in range(len(SWEEP))]
        assert_bitwise_equal(got, reference)
    files = list(entries(cache_dir))
    assert len(files) == len(CONFIGS) and all(run_cache.load(Path(f)) for f in files)
    assert not list(cache_dir.rglob("*.tmp"))


def test_corrupt_entry_is_recomputed(reference, cache_dir):
    sweep.run_sweep(SWEEP, workers=1, progress=False)
    victim = max(entries(cache_dir))  # any one entry
    path = Path(victim)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="recomputing"):
        got = sweep.run_sweep(SWEEP, workers=1, progress=False)
    assert_bitwise_equal(got, reference)
    assert run_cache.load(path) is not None


def test_divergence_is_cached_then_raised(cache_dir):
    good = cfg(optimizer="sgd", lr=0.05, method="dora")
    bad = good.replace(lr=1e8)  # non-finite loss at step 3
    with pytest.raises(loop.TrainingDiverged) as info:
        sweep.run_sweep([good, bad, good.replace(seed=3)], workers=1, progress=False)
    assert info.value.cfg == bad
    assert len(entries(cache_dir)) == 3  # every run finished and cached before the raise
    hists = sweep.run_sweep([good, bad], workers=1, progress=False, on_diverge="return")
    assert "diverged_step" in hists[1] and "diverged_step" not in hists[0]


def test_interrupt_stops_workers_and_says_how_to_resume(cache_dir, tmp_path):
    """SIGINT (Ctrl-C) to a process running a sweep on 2 workers (the caller and a worker process): it stops both,
    prints how many runs are cached and that a rerun resumes, and shows no traceback (the script catches
    SweepInterrupted)."""
    script = textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)
        from toymodels import callback_base, config, loop, sweep
        base = config.FinetuneConfig(dataset="synthetic", widths=(8, 16, 16, 4), n_pretrain=64, n_finetune=32,
                                    n_test=64, pretrain_steps=5, steps=200000, batch_size=8, method="dora")
        print("started", flush=True)
        try:
            sweep.run_sweep([base.replace(seed=s) for s in range(4)], workers=2, progress=False)
        except sweep.SweepInterrupted as exc:
            import threading  # the calling process's own task (sweep.CALLER_RUNS_TASKS) was stopped too
            caller_busy = any(t.name == "lora-theory-sweep-caller" for t in threading.enumerate())
            sys.exit(130 if exc.total == 4 and not caller_busy else 1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(4)  # let the workers start training
    proc.send_signal(2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "0 of 4 runs are cached" in err and "again to resume" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(executor="mpi"), "executor"),
        (dict(workers=0), "workers"),
        (dict(threads=0), "threads"),
        (dict(retries=-1), "retries"),
        (dict(on_diverge="ignore"), "on_diverge"),
        (dict(max_batch=0), "max_batch"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(CONFIGS, progress=False, **kwargs)
    with pytest.raises(ValueError, match="configs"):
        sweep.run_sweep(["not a config"])


def test_threads_are_pinned_per_task(cache_dir):
    """The caller's torch thread count does not leak into the runs (the cache key holds the task's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hist = sweep.run_sweep([CONFIGS[4]], workers=1, progress=False)[0]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with sweep._pinned_threads(1):
        key = run_cache.config_key(CONFIGS[4].as_dict())
    assert (cache_dir / "finetune" / f"{key}.npz").exists()
    np.testing.assert_array_equal(run_cache.load(cache_dir / "finetune" / f"{key}.npz")["batch_loss"],
                                  hist["batch_loss"])


# ------------------------------------------------------------------------------------------ custom callbacks


class BTrace(callback_base.Callback):
    """A custom callback (module level: it pickles): ``scale`` x sum |B| over the LoRA layers after every step,
    and the number of steps it saw (it would count the previous run's steps too if a run reused its state)."""

    version = 1

    def __init__(self, scale: float):
        self.scale = float(scale)
        self.trace: list[float] = []

    def key(self) -> dict:
        return {"scale": self.scale}

    def reset(self) -> None:
        self.trace = []

    def on_step_end(self, state) -> None:
        self.trace.append(self.scale * sum(float(m.lora_B.detach().abs().sum()) for m in state.layers))

    def result(self) -> dict:
        return {"b_trace": np.asarray(self.trace), "b_trace_count": np.asarray([len(self.trace)])}


class NumpyNorm(callback_base.Callback):
    """A custom callback computing with numpy's BLAS (a long dot product: its last bits depend on BLAS's thread
    count, which the sweep pins like torch's): the norm of layers.0's A tiled to 2^18 entries plus fixed noise,
    at the end."""

    def reset(self) -> None:
        self.value = None

    def on_train_end(self, state) -> None:
        a = state.layers[0].lora_A.detach().double().cpu().numpy().ravel()
        v = np.tile(a, 2**18 // a.size + 1)[: 2**18] + np.random.default_rng(0).standard_normal(2**18)
        self.value = float(np.sqrt(v @ v))

    def result(self) -> dict:
        return {"numpy_norm": np.asarray([self.value])}


SHARED = BTrace(2.0)  # one object for several runs: each run must get its own copy
# CONFIGS[0] and [2] without callbacks (a batched pair), three loop runs with callbacks, CONFIGS[0] twice
CB_SWEEP = [CONFIGS[0], CONFIGS[1], CONFIGS[4], CONFIGS[0], CONFIGS[2], CONFIGS[1]]
CB_PER_RUN = [[SHARED, WeightSnapshots((0, 6))], [SHARED], [BTrace(0.5), NumpyNorm()], [], [], [SHARED]]


@pytest.fixture(scope="module")
def cb_reference():
    """What direct calls give: finetune(cfg, callbacks=...) for the runs with callbacks, finetune_many for the
    batched pair (no cache), with 1 torch and 1 BLAS thread (what the sweep's tasks run with)."""
    pair = batched.finetune_many([CONFIGS[0], CONFIGS[2]], use_cache=False)
    with sweep._pinned_threads(1):
        direct = [loop.finetune(c, callbacks=[pickle.loads(pickle.dumps(cb)) for cb in cbs], use_cache=False)
                  for c, cbs in zip(CB_SWEEP[:3], CB_PER_RUN[:3], strict=True)]
    return direct + [pair[0], pair[1], direct[1]]


@pytest.fixture
def importable(monkeypatch):
    """Worker processes import this module by name (tests.toymodels.test_sweep), wherever pytest was started."""
    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_callback_forms_and_plan():
    """The three forms give the same runs; runs with callbacks are loop tasks of their own, the rest as before;
    a config with and without callbacks is two runs."""
    cfgs = CONFIGS[:4]
    shared = sweep.resolve_callbacks([SHARED], cfgs)
    assert shared == [(SHARED,)] * 4
    assert sweep.resolve_callbacks(lambda c: [SHARED] if c.dropout else [], cfgs) == [(), (SHARED,), (), (SHARED,)]
    assert sweep.resolve_callbacks([[SHARED], [], [SHARED], ()], cfgs) == [(SHARED,), (), (SHARED,), ()]
    assert sweep.resolve_callbacks(None, cfgs) == sweep.resolve_callbacks([], cfgs) == [()] * 4
    tasks = sweep.plan(CB_SWEEP, callbacks=CB_PER_RUN)
    assert [(t.kind, len(t.configs), bool(t.callbacks)) for t in tasks] == [
        ("batched", 2, False), ("sequential", 1, True), ("sequential", 1, True), ("sequential", 1, True)]
    assert [t.configs[0] for t in tasks[1:]] == CB_SWEEP[:3]  # in the order of configs; the repeat once
    assert sweep.plan(CB_SWEEP, callbacks=CB_PER_RUN) == tasks  # deterministic
    assert sweep.callbacks_key([BTrace(2.0)]) == sweep.callbacks_key([SHARED]) != sweep.callbacks_key([BTrace(3)])


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (SHARED, "single BTrace"),
        ([SHARED, [SHARED]], "a mix"),
        ([[SHARED]] * 3, "len\\(configs\\) = 4"),
        ([["x"], [], [], []], "callbacks\\[0\\] must hold Callback"),
        (lambda c: SHARED, "must be a sequence"),
        ("BTrace", "callbacks must be"),
    ],
)
def test_bad_callbacks(callbacks, match):
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(CONFIGS[:4], workers=1, progress=False, callbacks=callbacks)


def test_callbacks_in_process_equal_direct_finetune_and_share_its_cache_entry(cb_reference, cache_dir):
    got = sweep.run_sweep(CB_SWEEP, workers=1, progress=False, callbacks=CB_PER_RUN)
    assert_bitwise_equal(got, cb_reference)
    assert "b_trace" in got[0] and "snapshot_A0" in got[0] and "snapshot_A0" not in got[1]
    assert [int(h["b_trace_count"][0]) for h in got[:3]] == [CONFIGS[0].steps] * 3  # no state carried over
    assert SHARED.trace == []  # the caller's object is not the one that ran
    with sweep._pinned_threads(1):
        keys = [run_cache.config_key(loop.run_key(c, cbs)) for c, cbs in zip(CB_SWEEP[:3], CB_PER_RUN[:3],
                                                                               strict=True)]
    before = entries(cache_dir)
    assert all(str(cache_dir / "finetune" / f"{k}.npz") in before for k in keys)  # finetune's own entries
    again = [loop.finetune(c, callbacks=cbs) for c, cbs in zip(CB_SWEEP[:3], CB_PER_RUN[:3], strict=True)]
    assert_bitwise_equal(again, cb_reference[:3])
    assert entries(cache_dir) == before  # loaded, not retrained


def test_callbacks_local_workers_bitwise(cb_reference, cache_dir, importable):
    got = sweep.run_sweep(CB_SWEEP, workers=2, progress=False, callbacks=CB_PER_RUN)
    assert_bitwise_equal(got, cb_reference)
    assert len(entries(cache_dir)) == 5  # 3 runs with callbacks + the batched pair, each written once


def test_callbacks_thread_pool_bitwise(cb_reference, cache_dir):
    """Threads share the caller's callback objects: each run still gets its own copy (the runs without numpy
    BLAS: threads share one process's BLAS setting)."""
    with cf.ThreadPoolExecutor(2) as pool:
        got = sweep.run_sweep(CB_SWEEP, executor=pool, progress=False, callbacks=CB_PER_RUN, batched=False)
    assert_bitwise_equal([got[0], got[1], got[5]], [cb_reference[0], cb_reference[1], cb_reference[5]])


def test_callbacks_ray_bitwise(cb_reference, cache_dir, ray_cluster):
    got = sweep.run_sweep(CB_SWEEP, executor="ray", workers=2, progress=False, callbacks=CB_PER_RUN)
    assert_bitwise_equal(got, cb_reference)


def test_unpicklable_callback_is_named(cache_dir, monkeypatch):
    class LocalProbe(BTrace):  # defined in a function: pickle cannot find it by name
        pass

    with pytest.raises(ValueError, match="LocalProbe does not .*pickle"):
        sweep.run_sweep(CONFIGS[:2], workers=1, progress=False, callbacks=[LocalProbe(1.0)])
    holds_lambda = BTrace(1.0)
    holds_lambda.transform = lambda x: x
    with pytest.raises(ValueError, match="test_sweep.BTrace does not"):
        sweep.run_sweep(CONFIGS[:2], workers=2, progress=False, callbacks=lambda c: [holds_lambda])
    main = type("MainProbe", (BTrace,), {"__module__": "__main__"})  # a class of a script or notebook
    monkeypatch.setattr(sys.modules["__main__"], "MainProbe", main, raising=False)
    with pytest.raises(ValueError, match="__main__.MainProbe is defined in __main__"):
        sweep.run_sweep(CONFIGS[:2], workers=2, progress=False, callbacks=[main(1.0)])
    assert not entries(cache_dir)  # checked before any run started
    hist = sweep.run_sweep(CONFIGS[:1], workers=1, progress=False, callbacks=[main(1.0)])[0]  # in-process: fine
    assert "b_trace" in hist


def test_idle_workers_serve_the_next_sweep_in_the_same_environment(cache_dir, monkeypatch):
    """A sweep that finished keeps its workers: the next one (same threads, same environment, any run cache) uses
    the same processes, with the same bits as direct calls; a changed environment gets fresh workers; shutdown
    stops them."""
    first, second = CONFIGS[4:6], [c.replace(seed=7) for c in CONFIGS[4:6]]
    sweep.run_sweep(first, workers=2, progress=False)
    procs = [p for p, _ in sweep._POOLS[1][0].workers]
    assert len(procs) == 1  # workers=2: the calling process and one worker process (sweep.CALLER_RUNS_TASKS)
    got = sweep.run_sweep(second, workers=2, progress=False)
    assert [p for p, _ in sweep._POOLS[1][0].workers] == procs
    assert_bitwise_equal(got, [loop.finetune(c, use_cache=False) for c in second])
    other = cache_dir.parent / "other-runs"  # another run cache: the same workers, which write the runs there
    monkeypatch.setenv("LORA_THEORY_CACHE", str(other))
    again = sweep.run_sweep(first, workers=2, progress=False)
    assert [p for p, _ in sweep._POOLS[1][0].workers] == procs and len(entries(other)) == len(first)
    assert_bitwise_equal(again, [loop.finetune(c, use_cache=False) for c in first])
    assert sweep._local_pool(2, threads=2) is not sweep._POOLS[1][0]  # other threads: another pool
    monkeypatch.setenv("LORA_THEORY_SWEEP_TEST_MARKER", "1")
    fresh = sweep._local_pool(2, threads=1)  # what the next sweep gets (workers start on its first task)
    assert not fresh.workers and all(p.poll() is not None for p in procs)  # the old workers were stopped
    sweep._keep_pool(fresh)
    sweep.shutdown_workers()
    assert not sweep._POOLS
