"""Many LoRA fine-tuning runs at once: K runs of the toy MLP stacked into batched weights, one training loop.

:func:`finetune_many` trains K configurations that differ only in ``seed``, ``dropout``, ``lr`` and ``scaling``
(method "lora", either dropout placement) together, and returns for each the same history as
:func:`toymodels.loop.finetune` (the sequential engine, which is the oracle of the tests). Every run is the
sequential run, step for step:

- same pretrained model, data subsets and LoRA initialisation: taken from :func:`toymodels.setup.build_finetune_model`
  and :func:`toymodels.setup.protocol_data` for the run's seed (init from its "init" stream);
- same mini-batches: :func:`toymodels.setup.minibatches` with the "batches" stream
  (:class:`toymodels.seeds.SeedStreams`);
- same dropout masks: both engines draw them from the run's :class:`toymodels.masks.MaskStream` ("masks"
  stream), at every step one mask per LoRA layer in layer order, shape (batch, d_in) for the input
  placement, (batch, r) for the bottleneck; drawn on the CPU and copied, so the masks are the same on every
  device;
- same optimizer arithmetic: torch's single-tensor SGD / Adam / AdamW update, elementwise, on a flat buffer
  that holds all K runs' parameters (Adam is elementwise, so per-run Adam on a stacked tensor is per-run Adam).

So the numbers equal the sequential engine's up to float32 rounding (the sums are taken in another order;
tested to rtol 1e-4, observed ~1e-6 after 200 steps, with and without dropout), and a diverging run stops where
the sequential one does. They are not equal to the last bit, and the run cache keys the last bits (it even
holds torch's thread count), so the batched engine caches its runs apart, in "finetune-batched"
(:func:`cache_entry`): a figure rebuilt from a cold cache by one engine gets the numbers that engine produced.
A run's last bits also depend on its batch (which runs share a base matmul, one lr or several), so the batch
is the unit of computation and of the cache: :func:`finetune_many` trains the distinct configs in a canonical
order (:func:`canonical_batch`) and keys each run by the batch's digest too; a batch is recomputed whole when
any of its runs is missing. The same set of configs therefore gives the same bits in any process, in any
order, from a cold or a warm cache (what :func:`toymodels.sweep.run_sweep` relies on across its workers).

Why it is faster (measured in benchmarks/bench_finetune.py, see BENCHMARKS.md):

1. The frozen prefix is data: the input of the first LoRA layer and that layer's base output x W0^T + b0 are
   computed once for all fine-tuning (and test) images; a step gathers its rows. For the default protocol
   (784-256-256-10, LoRA on every layer) this removes the largest matmul (64 x 784 x 256) from every step.
2. Forward and backward are written out by hand (no autograd graph, no optimizer objects): the LoRA paths
   are batched matmuls over runs, (K, n, d) x (K, d, r); the frozen base matmuls are shared by the runs that
   share a pretrained model (same seed): one (m n, d_in) x (d_in, d_out) product per seed when every seed has
   the same number m of runs, one per run otherwise. The gradient of the first LoRA layer's A, when its input
   is not dropped out, is one (m r, n) x (n, d) product per seed.
3. One optimizer update for all runs and parameters: a handful of elementwise kernels on one flat buffer.
4. Records evaluate a LoRA layer after the first with its merged weight W + s B A (one matmul per layer and
   run instead of the base matmul plus two skinny LoRA products and a sum: half the evaluation time).

With dropout the masks are drawn per run from numpy's PCG64 (~1.2 ns per entry here; torch's serial CPU
``bernoulli_``, which both engines used before :mod:`toymodels.masks`, cost ~6.6 ns per entry and was the
largest single cost of a step).

Shapes follow torch.nn.Linear / PEFT: A (r, d_in), B (d_out, r), layer output x W^T + b + s drop(x) A^T B^T
(input placement) or x W^T + b + s drop(x A^T) B^T (bottleneck, ALLoRA eq. 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from analysis.inputs import positive_int
from toymodels import cache as run_cache
from toymodels import loop, setup
from toymodels.config import FinetuneConfig
from toymodels.lora import LoRALinear, scaling_factor
from toymodels.losses import loss_fn
from toymodels.masks import SCHEME as MASK_SCHEME
from toymodels.masks import scale as scaled_mask
from toymodels.mlp import auto_device
from toymodels.seeds import SeedStreams

NAMESPACE = "finetune-batched"  # not the sequential engine's "finetune": equal to rounding, not to the bit
BATCHED_VERSION = 3  # part of the cache key: change it when the engine's arithmetic changes (3: merged-weight eval)
VARYING = ("seed", "dropout", "lr", "scaling")
RECORDERS = ("loss", "norms", "rows", "channels", "grads")
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam / AdamW defaults, as setup.make_optimizer uses them


# ------------------------------------------------------------------------------------------------ validation


def check_batchable(configs: Sequence[FinetuneConfig]) -> list[FinetuneConfig]:
    """The configs as a list if :func:`finetune_many` can run them together; else ValueError naming the field.

    Each config must use method "lora" in float32 with the ReLU activation, without expected-loss training, LoRA+
    or LoWR, and record only :data:`RECORDERS` ("moments" and "grad_std" are not implemented here); every field
    other than seed, dropout, lr and scaling must be the same in all configs.
    """
    if isinstance(configs, FinetuneConfig):
        configs = [configs]
    configs = list(configs)
    if not configs:
        raise ValueError("configs must be a non-empty sequence of FinetuneConfig")
    for c in configs:
        if not isinstance(c, FinetuneConfig):
            raise ValueError(f"configs must be FinetuneConfig objects, got {type(c).__name__}")
        if c.method != "lora":
            raise ValueError(f"method must be 'lora' for the batched engine, got {c.method!r} "
                             "(use toymodels.loop.finetune)")
        if c.expected_loss:
            raise ValueError("expected_loss must be False for the batched engine (use toymodels.loop.finetune)")
        if c.lora_plus_ratio is not None:
            raise ValueError(f"lora_plus_ratio must be None for the batched engine, got {c.lora_plus_ratio!r}")
        if c.lowr is not None:
            raise ValueError(f"lowr must be None for the batched engine, got {c.lowr!r}")
        if c.dtype != "float32":
            raise ValueError(f"dtype must be 'float32' for the batched engine, got {c.dtype!r}")
        if c.activation != "relu":
            raise ValueError(f"activation must be 'relu' for the batched engine, got {c.activation!r} "
                             "(use toymodels.loop.finetune)")
        bad = [r for r in c.recorders if r not in RECORDERS]
        if bad:
            raise ValueError(f"recorders must be among {RECORDERS} for the batched engine, got {bad}")
    ref = configs[0]
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in VARYING:
            continue
        for c in configs[1:]:
            if getattr(c, f.name) != getattr(ref, f.name):
                raise ValueError(f"{f.name} must be the same in all configs to batch them (only {VARYING} may "
                                 f"differ), got {getattr(ref, f.name)!r} and {getattr(c, f.name)!r}")
    return configs


# ------------------------------------------------------------------------------------------------- public API


def finetune_many(configs: Sequence[FinetuneConfig], device: str | torch.device | None = None, *,
                  mask_threads: int | None = None, use_cache: bool = True,
                  refresh: bool = False, on_diverge: str = "raise") -> list[dict[str, np.ndarray]]:
    """Run (or load from the cache) many fine-tuning runs together; one history per config, in order.

    The histories have the keys of :func:`toymodels.loop.finetune` for the recorders used ("step",
    "batch_loss"; "train_loss", "train_acc", "test_loss", "test_acc"; "norm_A", "norm_B"; "row_norm_BA";
    "channel_a", "channel_b"; "grad_norm_A", "grad_norm_B") and equal its numbers up to float32 rounding.
    The distinct configs form one batch (:func:`canonical_batch`; duplicates computed once): if every run of
    the batch is cached it is loaded, else the batch is trained whole and its missing runs cached (namespace
    "finetune-batched", :func:`cache_entry`, which keys a run by its batch too). All configs are validated before anything runs
    (:func:`check_batchable`). A run whose loss becomes non-finite at step t gets the sequential engine's
    truncated history (steps before t, key ``diverged_step``) and is cached as such; then, as
    :func:`loop.finetune`, ``on_diverge="raise"`` raises :class:`loop.TrainingDiverged` (after every run has
    been cached), ``"return"`` returns the histories.

    Each run draws its dropout masks from its own :class:`toymodels.masks.MaskStream`, the sequential engine's
    stream, so the runs are the sequential runs (to rounding). ``mask_threads``: threads drawing the runs'
    masks in parallel (the masks do not depend on it).
    Default: 1 on the CPU, where extra threads compete with torch's own (measured: slower on 2 cores);
    ``torch.get_num_threads()`` when training on another device, which leaves the CPU free for the masks.
    """
    configs = check_batchable(configs)
    if mask_threads is not None:
        mask_threads = positive_int("mask_threads", mask_threads)
    if on_diverge not in ("raise", "return"):
        raise ValueError(f"on_diverge must be 'raise' or 'return', got {on_diverge!r}")
    dev = auto_device(device)
    batch = canonical_batch(configs)
    entries = {c: cache_entry(c, batch) for c in batch}
    paths = {c: _path(ns, run_cache.config_key(d)) for c, (ns, d) in entries.items()}
    found = {c: run_cache.load(paths[c]) for c in batch} if use_cache and not refresh else {}
    missing = [c for c in batch if found.get(c) is None]
    if missing:  # the batch is the unit of computation: trained whole, so every run gets the same bits
        hists = _Batch(batch, dev, mask_threads).run()
        for c, hist in zip(batch, hists, strict=True):
            if use_cache and (refresh or c in missing):
                run_cache.save(paths[c], hist, entries[c][1])
            found[c] = hist
    results = [{k: v.copy() for k, v in found[c].items()} for c in configs]
    if on_diverge == "raise":
        for c, hist in zip(configs, results, strict=True):
            if "diverged_step" in hist:
                raise loop.TrainingDiverged(int(hist["diverged_step"][0]), c)
    return results  # type: ignore[return-value]


def cache_entry(cfg: FinetuneConfig, batch: Sequence[FinetuneConfig] | None = None) -> tuple[str, dict]:
    """(namespace, configuration dict) under which the batched engine caches a run trained in ``batch``.

    Not the sequential engine's entry ("finetune", ``cfg.as_dict()``): the numbers agree only to float32
    rounding (the sums run in another order), and the cache keys the last bits of a run (its key even holds
    torch's thread count for that reason), so each engine keeps its own. The dict is ``cfg.as_dict()`` plus
    the engine version, the mask stream ("none" without dropout, else :data:`toymodels.masks.SCHEME`) and
    ``batch``: the digest of the batch the run was trained in
    (:func:`batch_digest`; ``None`` means the run alone). The last bits of a run depend on its batch (the
    runs of a seed share one base matmul, whose blocking depends on how many they are; one lr for the batch
    takes another Adam path than per-run lrs), so a run is cached per batch and a cache hit is always the
    very numbers this batch would compute, whatever ran before.
    """
    batch = [cfg] if batch is None else list(batch)
    return NAMESPACE, {**_run_entry(cfg), "batch": batch_digest(batch)}


def _run_entry(cfg: FinetuneConfig) -> dict:
    stream = "none" if cfg.dropout == 0 else MASK_SCHEME
    return {**cfg.as_dict(), "batched_engine": BATCHED_VERSION, "masks": stream}


def canonical_batch(configs: Sequence[FinetuneConfig]) -> list[FinetuneConfig]:
    """The distinct configs in the order the engine trains them: by seed, then by cache key. A function of the
    set of configs only (not of their order or repetitions), so a batch computes the same bits however its
    caller listed it."""
    unique = list(dict.fromkeys(configs))
    return sorted(unique, key=lambda c: (c.seed, run_cache.config_key(c.as_dict())))


def batch_digest(batch: Sequence[FinetuneConfig]) -> str:
    """SHA-256 of the sorted keys of the batch's distinct runs (part of each run's cache key)."""
    keys = sorted({run_cache.config_key(_run_entry(c)) for c in batch})
    return run_cache.config_key({"runs": keys})


def _path(namespace: str, key: str):
    return run_cache.cache_root() / namespace / f"{key}.npz"


# ------------------------------------------------------------------------------------------------- the engine


class _Batch:
    """K runs (all validated batchable). Runs are ordered by seed ("group": same data, same pretrained model).

    Blocks: the frozen weights and the data are held per block, (Gb, ...). When every seed has the same number
    m of runs, a block is a seed (Gb = G, m runs per block) and a base matmul is one bmm of (Gb, m n, d_in) by
    the block's weights; otherwise every run is its own block (Gb = K, m = 1), with its seed's weights.
    """

    def __init__(self, configs: list[FinetuneConfig], device: torch.device, mask_threads: int | None = None):
        self.dev = device
        seeds = list(dict.fromkeys(c.seed for c in configs))
        self.order = sorted(range(len(configs)), key=lambda i: seeds.index(configs[i].seed))
        self.runs = [configs[i] for i in self.order]
        ref = self.runs[0]
        self.cfg = ref
        self.K = K = len(self.runs)
        group = [seeds.index(c.seed) for c in self.runs]
        sizes = [group.count(g) for g in range(len(seeds))]
        uniform = len(set(sizes)) == 1
        self.m = sizes[0] if uniform else 1
        self.Gb = len(seeds) if uniform else K
        block_seed = seeds if uniform else [c.seed for c in self.runs]
        # data are held once per seed (G, ...); block b reads seed seed_of_block[b]
        self.blocks_are_seeds = uniform
        self.seed_of_block = torch.tensor([seeds.index(s) for s in block_seed], device=device)
        self.block_of_run = torch.tensor([g if uniform else k for k, g in enumerate(group)], device=device)
        self.n_layers = len(ref.widths) - 1
        self.targets = sorted(int(t.split(".")[1]) for t in ref.targets)
        self.t0 = self.targets[0]
        self.slot = {i: j for j, i in enumerate(self.targets)}  # layer -> its (A, Bt) pair in self.params
        self.r = ref.r

        # per seed: data, pretrained weights, LoRA init (the sequential engine's own functions)
        per_seed = {}
        for s in seeds:
            c = next(c for c in self.runs if c.seed == s)
            data = setup.protocol_data(c, device)
            model = setup.build_finetune_model(c, device)
            per_seed[s] = (data, model)
        with torch.no_grad():
            self.W, self.b = [], []  # per layer: (Gb, d_out, d_in), (Gb, d_out)
            for i in range(self.n_layers):
                lin = [_linear(per_seed[s][1].layers[i]) for s in block_seed]
                self.W.append(torch.stack([w.weight.detach() for w in lin]).contiguous())
                self.b.append(torch.stack([w.bias.detach() for w in lin]).contiguous())
            self.splits = {}
            for split in ("finetune", "test") if "loss" in ref.recorders else ("finetune",):
                xs, ps, ys = [], [], []
                for s in seeds:
                    x, y = getattr(per_seed[s][0], split)
                    h = x
                    model = per_seed[s][1]
                    for i in range(self.t0):
                        h = torch.relu(model.layers[i](h))
                    xs.append(h)
                    ps.append(_linear(model.layers[self.t0])(h))
                    ys.append(y)
                self.splits[split] = (torch.stack(xs), torch.stack(ps), torch.stack(ys))

            # flat parameter buffer: per target layer an A block (K, r, d_in) and a B^T block (K, r, d_out)
            shapes = []
            for i in self.targets:
                d_in, d_out = ref.widths[i], ref.widths[i + 1]
                shapes += [(K, self.r, d_in), (K, self.r, d_out)]
            total = sum(int(np.prod(s)) for s in shapes)
            self.theta = torch.empty(total, device=device)
            self.grad = torch.zeros(total, device=device)
            self.params, self.grads = [], []
            off = 0
            for s in shapes:
                n = int(np.prod(s))
                self.params.append(self.theta[off:off + n].view(s))
                self.grads.append(self.grad[off:off + n].view(s))
                off += n
            lr_flat = torch.empty(total, device=device)
            off = 0
            for s in shapes:
                n = int(np.prod(s))
                lr_flat[off:off + n] = torch.tensor([c.lr for c in self.runs], device=device).repeat_interleave(
                    n // K)
                off += n
            for j, i in enumerate(self.targets):
                for k, c in enumerate(self.runs):
                    layer = per_seed[c.seed][1].layers[i]
                    self.params[2 * j][k].copy_(layer.lora_A.detach())
                    self.params[2 * j + 1][k].copy_(layer.lora_B.detach().T)
        self.lrs = [c.lr for c in self.runs]
        self.lr_flat = None if len(set(self.lrs)) == 1 else lr_flat
        self.scale = torch.tensor([scaling_factor("lora" if c.scaling is None else c.scaling, c.alpha, c.r)
                                   for c in self.runs], device=device).view(K, 1, 1)
        self.p = [c.dropout for c in self.runs]
        self.dropped = [k for k in range(K) if self.p[k] > 0]
        self.mask_streams = [self.runs[k].streams.masks() for k in self.dropped]
        self.keep = torch.tensor([1 - self.p[k] for k in self.dropped], dtype=torch.float32).view(-1, 1, 1)
        self._mask_buffers: dict[int, torch.Tensor] | None = None  # the step's masks, reused from step to step
        self.batch_gens = [SeedStreams(s).generator("batches") for s in block_seed]
        if mask_threads is None:
            mask_threads = 1 if device.type == "cpu" else torch.get_num_threads()
        self.mask_threads = mask_threads
        self.pool: ThreadPoolExecutor | None = None  # opened by run() when masks are drawn by several threads
        self.exp_avg = torch.zeros_like(self.theta)
        self.exp_avg_sq = torch.zeros_like(self.theta)

    # -- helpers -------------------------------------------------------------------------------------------

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """(K, n, d) -> (Gb, m n, d): the runs of a block side by side (a view)."""
        return t.reshape(self.Gb, -1, t.shape[-1])

    def _base(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h W_i^T + b_i for per-run inputs h (K, n, d_in) with each block's frozen weights."""
        out = torch.baddbmm(self.b[i].unsqueeze(1), self._blocks(h), self.W[i].transpose(1, 2))
        return out.view(self.K, h.shape[1], -1)

    def _base_back(self, i: int, g: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
        """add + g W_i (the frozen layer's input gradient) for per-run g (K, n, d_out)."""
        if add is None:
            return torch.bmm(self._blocks(g), self.W[i]).view(self.K, g.shape[1], -1)
        return torch.baddbmm(self._blocks(add), self._blocks(g), self.W[i]).view(self.K, g.shape[1], -1)

    def _per_run(self, t: torch.Tensor) -> torch.Tensor:
        """(Gb, ...) block data -> (K, ...) per run."""
        return t if self.m == 1 else t.repeat_interleave(self.m, dim=0)

    def _step_masks(self, n: int) -> dict[int, torch.Tensor] | None:
        """This step's masks: per LoRA layer a (K, n, d_in) (input) or (K, n, r) (bottleneck) tensor, ones for
        the runs without dropout. Each run draws its layers in order from its own
        :class:`toymodels.masks.MaskStream` (the sequential engine's order); with mask_threads > 1 different runs
        are drawn in parallel (numpy releases the GIL)."""
        if not self.dropped:
            return None
        shapes = {i: (n, self.cfg.widths[i] if self.cfg.placement == "input" else self.r) for i in self.targets}
        if self._mask_buffers is None or self._mask_buffers[self.targets[0]].shape[1] != n:
            self._mask_buffers = {i: torch.ones((self.K, *sh)) for i, sh in shapes.items()}  # rows without dropout: 1
            self._kept = {i: np.empty((len(self.dropped), *sh), dtype=bool) for i, sh in shapes.items()}
        kept = self._kept

        def draw(row: int) -> None:
            stream, p = self.mask_streams[row], self.p[self.dropped[row]]
            for i in self.targets:
                stream.kept(shapes[i], p, out=kept[i][row])

        rows = range(len(self.dropped))
        if self.pool is None or len(rows) < 2:
            for row in rows:
                draw(row)
        else:
            list(self.pool.map(draw, rows))
        out = {}
        for i in self.targets:
            buf = self._mask_buffers[i]
            if len(self.dropped) == self.K:
                buf.copy_(torch.from_numpy(kept[i])).div_(self.keep)  # = scaled_mask(kept[i], self.keep)
            else:
                buf[self.dropped] = scaled_mask(kept[i], self.keep)
            out[i] = buf if self.dev.type == "cpu" else buf.to(self.dev)
        return out

    # -- one step ------------------------------------------------------------------------------------------

    def step(self, idx: torch.Tensor | None) -> torch.Tensor:
        """Forward + backward on each run's mini-batch (rows ``idx`` (Gb, n) of its block, None: all rows);
        fills self.grad, returns the K losses.

        Layer i with LoRA, per run: hin = drop(h) (input placement) or h; u = hin A^T, times the mask for the
        bottleneck; z = h W^T + b + (s u) Bt with Bt = B^T (r, d_out). Backward from g = dL/dz:
        dL/dBt = (s u)^T g, gu = g (s Bt)^T (times the bottleneck mask), dL/dA = gu^T hin,
        dL/dh = g W + gu A (times the input mask), and dL/dz_prev = dL/dh * 1[z_prev > 0].
        """
        K, r, s, Gb, m = self.K, self.r, self.scale, self.Gb, self.m
        x_all, p_all, y_all = self.splits["finetune"]
        if idx is None and self.blocks_are_seeds:
            xb, pb, yb = x_all, p_all, y_all
        else:
            rows = self.seed_of_block.unsqueeze(1)
            if idx is None:
                xb, pb, yb = x_all[self.seed_of_block], p_all[self.seed_of_block], y_all[self.seed_of_block]
            else:
                xb, pb, yb = x_all[rows, idx], p_all[rows, idx], y_all[rows, idx]
        n = xb.shape[1]
        masks = self._step_masks(n)
        input_drop = self.cfg.placement == "input"
        saved = {}
        acts = []  # post-ReLU outputs (K, n, d) of the hidden layers from t0 on
        h = xb
        for i in range(self.t0, self.n_layers):
            j = self.slot.get(i)
            if j is None:  # a frozen layer after the first LoRA layer
                z = self._base(i, h)
            else:
                A, Bt = self.params[2 * j], self.params[2 * j + 1]
                d_in = h.shape[-1]
                mask = None if masks is None else masks[i]
                shared = i == self.t0 and not (mask is not None and input_drop)
                if shared:  # the runs of a block share the input: one (n, d) x (d, m r) product per block
                    hin = xb
                    u = torch.bmm(xb, A.view(Gb, m * r, d_in).transpose(1, 2))
                    u = u.view(Gb, n, m, r).transpose(1, 2).reshape(K, n, r)
                else:
                    if mask is None or not input_drop:
                        hin = h
                    elif i == self.t0:  # the block's input times each run's mask, without copying the input
                        hin = torch.mul(xb.unsqueeze(1), mask.view(Gb, m, n, d_in)).view(K, n, d_in)
                    else:
                        hin = h * mask
                    u = torch.bmm(hin, A.transpose(1, 2))
                if mask is not None and not input_drop:
                    u = u * mask
                us = u * s
                if i == self.t0:  # frozen part precomputed: z = P[rows] + (s u) Bt
                    z = torch.bmm(us, Bt)
                    z.view(Gb, m, n, -1).add_(pb.unsqueeze(1))
                else:
                    z = self._base(i, h).baddbmm_(us, Bt)
                saved[i] = (hin, us, mask, shared)
            if i < self.n_layers - 1:
                h = z.relu_()
                acts.append(h)
        # loss and its gradient with respect to the logits z (K, n, C)
        y = self._per_run(yb).unsqueeze(2)
        if self.cfg.loss == "ce":
            logp = torch.log_softmax(z, dim=2)
            losses = logp.gather(2, y).squeeze(2).mean(1).neg_()
            g = logp.exp_()
            g.scatter_add_(2, y, torch.full_like(g[..., :1], -1.0)).div_(n)
        else:
            diff = z.scatter_add(2, y, torch.full_like(z[..., :1], -1.0))
            losses = (diff * diff).sum(2).mean(1)
            g = diff.mul_(2.0 / n)
        # backward, last layer first
        for i in range(self.n_layers - 1, self.t0 - 1, -1):
            j = self.slot.get(i)
            g_h_lora = None
            if j is not None:
                A, Bt = self.params[2 * j], self.params[2 * j + 1]
                gA, gBt = self.grads[2 * j], self.grads[2 * j + 1]
                hin, us, mask, shared = saved.pop(i)
                torch.bmm(us.transpose(1, 2), g, out=gBt)
                gu = torch.bmm(g, (Bt * s).transpose(1, 2))
                if mask is not None and not input_drop:
                    gu.mul_(mask)
                if shared:
                    d_in = hin.shape[-1]
                    gu_blk = gu.view(Gb, m, n, r).transpose(2, 3).reshape(Gb, m * r, n)
                    torch.bmm(gu_blk, hin, out=gA.view(Gb, m * r, d_in))
                else:
                    torch.bmm(gu.transpose(1, 2), hin, out=gA)
                if i > self.t0:
                    g_h_lora = torch.bmm(gu, A)
                    if mask is not None and input_drop:
                        g_h_lora.mul_(mask)
            if i == self.t0:
                break
            g_h = self._base_back(i, g, g_h_lora)
            g = torch.ops.aten.threshold_backward(g_h, acts[i - 1 - self.t0], 0)
        return losses

    # -- optimizer -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, t: int) -> None:
        """One optimizer step for every run: torch's single-tensor SGD / Adam / AdamW arithmetic, elementwise."""
        cfg, theta, grad = self.cfg, self.theta, self.grad
        lr, wd = self.lrs[0], cfg.weight_decay
        per_run = self.lr_flat is not None
        if cfg.optimizer == "sgd":
            if wd:
                grad = grad.add(theta, alpha=wd)
            if per_run:
                theta.addcmul_(grad, self.lr_flat, value=-1.0)
            else:
                theta.add_(grad, alpha=-lr)
            return
        if wd:
            if cfg.optimizer == "adamw":
                theta.mul_(1 - self.lr_flat * wd if per_run else 1 - lr * wd)
            else:
                grad = grad.add(theta, alpha=wd)
        beta1, beta2 = _ADAM_BETAS
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(_ADAM_EPS)
        if per_run:
            theta.addcdiv_(self.exp_avg * self.lr_flat, denom, value=-1.0 / bias_correction1)
        else:
            theta.addcdiv_(self.exp_avg, denom, value=-lr / bias_correction1)

    # -- recording -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _logits(self, k: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Run k's logits on a whole split in eval mode (no dropout), and the labels. A LoRA layer after the first
        one is evaluated with its merged weight W + s B A (the layer's eval-mode function, in one matmul: half the
        time of x W^T + s (x A^T) B^T on the 2,512 x 256 x 256 evaluation of the default protocol)."""
        x_all, p_all, y_all = self.splits[split]
        blk = int(self.block_of_run[k])
        seed = int(self.seed_of_block[blk])
        x, y = x_all[seed], y_all[seed]
        h = None
        for i in range(self.t0, self.n_layers):
            j = self.slot.get(i)
            if i == self.t0:  # the frozen part is precomputed: P + s (x A^T) Bt
                h = x
                A, Bt = self.params[2 * j][k], self.params[2 * j + 1][k]
                z = p_all[seed] + float(self.scale[k]) * ((h @ A.T) @ Bt)
            elif j is None:
                z = torch.addmm(self.b[i][blk], h, self.W[i][blk].T)
            else:  # the merged weight W + s B A: one (N, d_in) x (d_in, d_out) product
                A, Bt = self.params[2 * j][k], self.params[2 * j + 1][k]
                merged = torch.addmm(self.W[i][blk], Bt.T, A, alpha=float(self.scale[k]))
                z = torch.addmm(self.b[i][blk], h, merged.T)
            h = torch.relu(z) if i < self.n_layers - 1 else z
        return h, y

    @torch.no_grad()
    def record(self, hist: list[dict], step: int, grads: bool) -> None:
        rec = set(self.cfg.recorders)
        na = len(self.targets)
        norms = None
        if rec & {"norms", "rows", "channels"}:
            A = [self.params[2 * j] for j in range(na)]
            B = [self.params[2 * j + 1].transpose(1, 2) for j in range(na)]
        if "norms" in rec:
            norms = (torch.stack([torch.linalg.vector_norm(a, dim=(1, 2)) for a in A], 1).cpu().numpy(),
                     torch.stack([torch.linalg.vector_norm(b, dim=(1, 2)) for b in B], 1).cpu().numpy())
        if "rows" in rec:
            rows = torch.stack([torch.linalg.vector_norm(self.scale * torch.bmm(b, a), dim=2).mean(1)
                                for a, b in zip(A, B, strict=True)], 1).cpu().numpy()
        if "channels" in rec:
            ch_a = [torch.linalg.vector_norm(a, dim=2).cpu().numpy() for a in A]
            ch_b = [torch.linalg.vector_norm(b, dim=1).cpu().numpy() for b in B]
        if "grads" in rec:
            if grads:
                gn = [torch.linalg.vector_norm(self.grads[j], dim=tuple(range(1, self.grads[j].dim())))
                      for j in range(2 * na)]
                gn = torch.stack(gn, 1).cpu().numpy()
            else:
                gn = np.full((self.K, 2 * na), np.nan)
        for k, hk in enumerate(hist):
            hk["step"].append(step)
            if "loss" in rec:
                for split_name in ("train", "test"):
                    logits, y = self._logits(k, "finetune" if split_name == "train" else split_name)
                    hk.setdefault(f"{split_name}_loss", []).append(loss_fn(self.cfg.loss, logits, y).item())
                    hk.setdefault(f"{split_name}_acc", []).append((logits.argmax(1) == y).double().mean().item())
            if "norms" in rec:
                hk.setdefault("norm_A", []).append(list(norms[0][k]))
                hk.setdefault("norm_B", []).append(list(norms[1][k]))
            if "rows" in rec:
                hk.setdefault("row_norm_BA", []).append(list(rows[k]))
            if "channels" in rec:
                hk.setdefault("channel_a", []).append([c[k] for c in ch_a])
                hk.setdefault("channel_b", []).append([c[k] for c in ch_b])
            if "grads" in rec:
                hk.setdefault("grad_norm_A", []).append(list(gn[k, 0::2]))
                hk.setdefault("grad_norm_B", []).append(list(gn[k, 1::2]))

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, np.ndarray]]:
        cfg = self.cfg
        n = self.splits["finetune"][2].shape[1]
        hist: list[dict[str, list]] = [{"step": [], "batch_loss": []} for _ in range(self.K)]
        self.record(hist, 0, grads=False)
        streams = [setup.minibatches(n, cfg.batch_size, cfg.steps, g) for g in self.batch_gens]
        losses = torch.empty(cfg.steps, self.K, device=self.dev)
        if self.mask_threads > 1 and len(self.dropped) > 1:
            self.pool = ThreadPoolExecutor(min(self.mask_threads, len(self.dropped)))
        try:
            for t, idx in enumerate(zip(*streams, strict=True), start=1):
                idx = None if idx[0] is None else torch.stack(idx).to(self.dev)
                losses[t - 1] = self.step(idx)
                self.update(t)
                if t % cfg.record_every == 0 or t == cfg.steps:
                    self.record(hist, t, grads=True)
        finally:
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None
        losses = losses.cpu().numpy()
        out = [None] * self.K
        for k, hk in enumerate(hist):
            bad = np.flatnonzero(~np.isfinite(losses[:, k]))
            if bad.size:  # the sequential engine stops at the first non-finite loss: keep what came before it
                diverged = int(bad[0]) + 1
                kept = sum(1 for s in hk["step"] if s < diverged)
                for key in hk:
                    hk[key] = hk[key][:kept]
                hk["batch_loss"] = list(losses[: diverged - 1, k])
                hk["diverged_step"] = [diverged]
            else:
                hk["batch_loss"] = list(losses[:, k])
            out[self.order[k]] = {key: np.asarray(v, dtype=np.float64) for key, v in hk.items()}
        return out


def _linear(layer) -> torch.nn.Linear:
    return layer.base if isinstance(layer, LoRALinear) else layer
