"""toymodels.batched's hand-written numerics against their oracles, step by step (not end to end):

- forward + backward (``_Batch.step``): each run's loss and the gradients of its A and B^T equal autograd through
  the sequential engine's own model (``setup.build_finetune_model``: the pretrained MLP with ``LoRALinear``
  layers) on the same mini-batch rows with the same dropout masks (the engine's masks, captured, fed to the
  LoRALinear in place of its ``nn.Dropout``);
- the optimizer (``_Batch.update``): SGD / Adam / AdamW, with and without weight decay, one lr or one per run,
  equal ``torch.optim`` (``setup.make_optimizer``) on each run's own tensors;
- a few steps of both together equal a few autograd + torch.optim steps.

Random small configurations by hypothesis: every method and placement the engine supports (method "lora",
input / bottleneck dropout), with and without dropout, CE and MSE, LoRA on a subset of the layers, seeds with
equal and unequal numbers of runs (both block layouts), per-run lr and scaling. Float32 throughout: tolerances
are a few float32 ulps scaled by the values (rtol 2e-5), far below any real difference (a wrong mask, a wrong
transpose or a missing scaling moves the numbers by O(1) relative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toymodels import batched, config, losses, setup
from toymodels.lora import LoRALinear

RTOL, ATOL_REL = 2e-5, 1e-6  # atol relative to the largest magnitude of the compared tensor


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    """A private cache for the tiny pretrained models, and one torch thread."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_THEORY_CACHE", str(tmp_path_factory.mktemp("runs")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@st.composite
def batches(draw):
    """A list of batchable configs: shared protocol, per-run seed, dropout, lr and scaling."""
    hidden = draw(st.lists(st.sampled_from((8, 12)), min_size=1, max_size=2))
    widths = (draw(st.sampled_from((6, 10))), *hidden, draw(st.sampled_from((3, 4))))
    n_layers = len(widths) - 1
    targets = draw(st.lists(st.integers(0, n_layers - 1), min_size=1, max_size=n_layers, unique=True))
    base = dict(dataset="synthetic", widths=widths, n_pretrain=32, n_finetune=24, n_test=16, pretrain_steps=3,
                targets=tuple(f"layers.{i}" for i in sorted(targets)), r=draw(st.sampled_from((1, 3))),
                placement=draw(st.sampled_from(("input", "bottleneck"))), loss=draw(st.sampled_from(("ce", "mse"))),
                optimizer=draw(st.sampled_from(("sgd", "adam", "adamw"))),
                weight_decay=draw(st.sampled_from((0.0, 0.1))), batch_size=draw(st.sampled_from((None, 8))),
                steps=3, record_every=3, recorders=("loss",))
    dropout = draw(st.booleans())
    counts = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))  # runs per seed: equal or not
    configs = []
    for seed, count in enumerate(counts):
        for _ in range(count):
            lr = draw(st.sampled_from((1e-3, 5e-3))) * (20 if base["optimizer"] == "sgd" else 1)
            configs.append(config.FinetuneConfig(
                **base, seed=seed, lr=lr, dropout=draw(st.sampled_from((0.0, 0.2, 0.5))) if dropout else 0.0,
                scaling=draw(st.sampled_from((None, 2.0, "rslora")))))
    return list(dict.fromkeys(configs))


class FixedMask(torch.nn.Module):
    """Stands in for a LoRALinear's nn.Dropout: multiplies by a given (already scaled) mask."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, x):
        return x * self.mask


class Oracle:
    """Run k of the engine as the sequential engine's model + autograd + torch.optim."""

    def __init__(self, engine: batched._Batch, k: int):
        cfg = engine.runs[k]
        self.cfg, self.k, self.engine = cfg, k, engine
        self.model = setup.build_finetune_model(cfg, torch.device("cpu"))
        self.model.train()
        self.layers = {int(n.split(".")[1]): m for n, m in self.model.named_modules() if isinstance(m, LoRALinear)}
        assert sorted(self.layers) == engine.targets
        with torch.no_grad():  # start from the engine's parameters
            for i, layer in self.layers.items():
                j = engine.slot[i]
                layer.lora_A.copy_(engine.params[2 * j][k])
                layer.lora_B.copy_(engine.params[2 * j + 1][k].T)
                if cfg.dropout > 0:
                    layer.lora_dropout = FixedMask()
        self.data = setup.protocol_data(cfg, torch.device("cpu")).finetune
        params = [p for p in self.model.parameters() if p.requires_grad]
        assert len(params) == 2 * len(self.layers)
        self.opt = setup.make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)

    def step(self, rows: torch.Tensor | None, masks: dict | None) -> float:
        x, y = self.data
        if rows is not None:
            x, y = x[rows], y[rows]
        for i, layer in self.layers.items():
            if masks is not None and self.cfg.dropout > 0:
                layer.lora_dropout.mask = masks[i][self.k]
        self.opt.zero_grad(set_to_none=True)
        loss = losses.loss_fn(self.cfg.loss, self.model(x), y)
        loss.backward()
        return loss.item()

    def grads(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {i: (m.lora_A.grad, m.lora_B.grad.T) for i, m in self.layers.items()}

    def params(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {i: (m.lora_A.detach(), m.lora_B.detach().T) for i, m in self.layers.items()}


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = float(want.abs().max()) if want.numel() else 0.0
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=RTOL, atol=ATOL_REL * scale + 1e-12, err_msg=what)


def capture_masks(engine: batched._Batch) -> list:
    """Wrap the engine's mask drawing: every step's masks are appended to the returned list."""
    seen = []
    draw = engine._step_masks

    def recording(n):
        masks = draw(n)
        seen.append(masks)
        return masks

    engine._step_masks = recording
    return seen


def rows_for_step(engine: batched._Batch, gen: torch.Generator) -> torch.Tensor | None:
    n_rows = engine.splits["finetune"][2].shape[1]
    if engine.cfg.batch_size is None:
        return None
    return torch.stack([torch.randperm(n_rows, generator=gen)[: engine.cfg.batch_size] for _ in range(engine.Gb)])


def run_rows(engine, idx, k):
    return None if idx is None else idx[int(engine.block_of_run[k])]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs=batches(), data_seed=st.integers(0, 2**16))
def test_one_step_loss_and_gradients_equal_autograd(configs, data_seed):
    engine = batched._Batch(batched.canonical_batch(configs), torch.device("cpu"))
    oracles = [Oracle(engine, k) for k in range(engine.K)]
    masks = capture_masks(engine)
    idx = rows_for_step(engine, torch.Generator().manual_seed(data_seed))
    losses = engine.step(idx)
    for k, oracle in enumerate(oracles):
        want_loss = oracle.step(run_rows(engine, idx, k), masks[0])
        np.testing.assert_allclose(float(losses[k]), want_loss, rtol=RTOL, err_msg=f"loss of run {k}")
        for i, (gA, gBt) in oracle.grads().items():
            j = engine.slot[i]
            close(engine.grads[2 * j][k], gA, f"dL/dA, layer {i}, run {k}: {oracle.cfg}")
            close(engine.grads[2 * j + 1][k], gBt, f"dL/dB^T, layer {i}, run {k}: {oracle.cfg}")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs=batches(), data_seed=st.integers(0, 2**16))
def test_a_few_steps_equal_autograd_and_torch_optim(configs, data_seed):
    engine = batched._Batch(batched.canonical_batch(configs), torch.device("cpu"))
    oracles = [Oracle(engine, k) for k in range(engine.K)]
    masks = capture_masks(engine)
    gen = torch.Generator().manual_seed(data_seed)
    for t in range(1, 4):
        idx = rows_for_step(engine, gen)
        losses = engine.step(idx)
        engine.update(t)
        for k, oracle in enumerate(oracles):
            want = oracle.step(run_rows(engine, idx, k), masks[t - 1])
            oracle.opt.step()
            np.testing.assert_allclose(float(losses[k]), want, rtol=1e-4, err_msg=f"loss, step {t}, run {k}")
    for k, oracle in enumerate(oracles):
        for i, (A, Bt) in oracle.params().items():
            j = engine.slot[i]
            np.testing.assert_allclose(engine.params[2 * j][k].numpy(), A.numpy(), rtol=1e-4, atol=1e-6,
                                       err_msg=f"A after 3 steps, layer {i}, run {k}: {oracle.cfg}")
            np.testing.assert_allclose(engine.params[2 * j + 1][k].numpy(), Bt.numpy(), rtol=1e-4, atol=1e-6,
                                       err_msg=f"B^T after 3 steps, layer {i}, run {k}: {oracle.cfg}")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lrs", [(1e-3, 1e-3, 1e-3), (1e-3, 3e-3, 2e-2)], ids=["one-lr", "per-run-lr"])
def test_update_equals_torch_optim(optimizer, weight_decay, lrs):
    """Random gradients fed to both, 5 steps: the flat-buffer update is torch's per-tensor update, run by run."""
    base = dict(dataset="synthetic", widths=(6, 8, 3), n_pretrain=32, n_finetune=24, n_test=16, pretrain_steps=3,
                targets=("layers.0", "layers.1"), r=2, optimizer=optimizer, weight_decay=weight_decay, steps=5,
                recorders=("loss",))
    configs = [config.FinetuneConfig(**base, lr=lr, seed=s) for s, lr in enumerate(lrs)]
    engine = batched._Batch(configs, torch.device("cpu"))
    ref = [[p.detach().clone()[k].requires_grad_() for p in engine.params] for k in range(engine.K)]
    opts = [setup.make_optimizer(optimizer, ps, c.lr, weight_decay) for ps, c in zip(ref, engine.runs, strict=True)]
    gen = torch.Generator().manual_seed(7)
    for t in range(1, 6):
        engine.grad.copy_(torch.randn(engine.grad.shape, generator=gen))
        engine.update(t)
        for k in range(engine.K):
            for p, g in zip(ref[k], engine.grads, strict=True):
                p.grad = g[k].clone()
            opts[k].step()
    for k in range(engine.K):
        for j, p in enumerate(ref[k]):
            np.testing.assert_allclose(engine.params[j][k].numpy(), p.detach().numpy(), rtol=1e-6, atol=1e-9,
                                       err_msg=f"param {j} of run {k}")
