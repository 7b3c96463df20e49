"""The one training loop and its callbacks: hook order and states, cache keys, the built-in recorders against an
independent loop written here, divergence, float64 runs, captured (X, G), equivalent modules, seed streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import channels
from analysis.streams import stream_seed
from toymodels import callback_base, config, loop, losses, setup
from toymodels.callbacks import AtSteps, CaptureLayerIO, ScaleAdapters, WeightSnapshots
from toymodels.lora import lora_modules
from toymodels.masks import MaskStream

SMALL = dict(dataset="synthetic", widths=(16, 32, 32, 10), n_pretrain=128, n_finetune=64, n_test=256,
             pretrain_steps=20, steps=10, batch_size=16, record_every=4)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_THEORY_CACHE", str(tmp_path / "runs"))


class Spy(callback_base.Callback):
    """Logs every hook call with what it sees: the step, the record flag, whether gradients exist, ||B||."""

    def __init__(self, tag: str = "spy"):
        self.tag = tag
        self.calls: list[tuple] = []

    def key(self) -> dict:
        return {"tag": self.tag}

    def reset(self) -> None:
        self.calls = []

    def _log(self, hook: str, state) -> None:
        has_grad = all(m.lora_B.grad is not None for m in state.layers)
        self.calls.append((hook, state.step, state.record, has_grad,
                           float(sum(m.lora_B.detach().norm() for m in state.layers))))

    def on_train_begin(self, state):
        self._log("begin", state)

    def on_step_begin(self, state):
        self._log("step_begin", state)

    def on_after_backward(self, state):
        self._log("backward", state)

    def on_step_end(self, state):
        self._log("step_end", state)

    def on_record(self, state):
        self._log("record", state)

    def on_train_end(self, state):
        self._log("end", state)

    def result(self):
        return {f"{self.tag}_n_calls": np.array(len(self.calls))}


def test_hooks_run_in_order_and_see_the_right_states():
    cfg = config.FinetuneConfig(**SMALL, recorders=("norms",))
    spy = Spy()
    hist = loop.finetune(cfg, callbacks=[spy], use_cache=False)
    calls = spy.calls
    assert [c[0] for c in calls[:2]] == ["begin", "record"] and calls[0][1] == 0 and calls[-1][0] == "end"
    per_step = [c for c in calls[2:-1]]
    records = [c[1] for c in calls if c[0] == "record"]
    assert records == cfg.record_steps() == hist["step"].astype(int).tolist() == [0, 4, 8, 10]
    for step in range(1, cfg.steps + 1):
        hooks = [c for c in per_step if c[1] == step]
        want = ["step_begin", "backward", "step_end"] + (["record"] if step in records else [])
        assert [c[0] for c in hooks] == want
        assert all(c[2] == (step in records) for c in hooks)  # state.record
        assert hooks[1][3]  # gradients exist after backward
        before, after = hooks[1][4], hooks[2][4]
        assert before == (0.0 if step == 1 else before) and after != before  # the update happens in between
    # the B norms the spy saw at the records are those of the "norms" recorder
    seen = [c[4] for c in calls if c[0] == "record"]
    np.testing.assert_allclose(seen, hist["norm_B"].sum(axis=1), rtol=1e-6)
    assert int(hist["spy_n_calls"]) == len(calls)


def _independent_loop(cfg: config.FinetuneConfig) -> dict[str, list]:
    """The fine-tuning run written out plainly (no engine loop): the streams stream_seed(seed, "masks") (one
    MaskStream shared by the layers, drawn in layer order) and stream_seed(seed, "batches") (batch permutations), Adam, cross-entropy; records at
    0, every record_every steps and the end (eval mode: no masks drawn)."""
    model = setup.build_finetune_model(cfg, torch.device("cpu"))
    data = setup.protocol_data(cfg, torch.device("cpu"))
    x, y = data.finetune
    layers = lora_modules(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    stream = MaskStream(stream_seed(cfg.seed, "masks"))
    for m in layers:
        m.mask_stream = stream
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, "batches"))
    out: dict[str, list] = {"step": [], "batch_loss": [], "norm_A": [], "norm_B": [], "test_loss": [], "test_acc": []}

    def record(step):
        out["step"].append(step)
        with torch.no_grad():
            out["norm_A"].append([m.lora_A.norm().item() for m in layers])
            out["norm_B"].append([m.lora_B.norm().item() for m in layers])
            model.eval()
            logits = model(data.test.x)
            model.train()
            out["test_loss"].append(torch.nn.functional.cross_entropy(logits, data.test.y).item())
            out["test_acc"].append((logits.argmax(1) == data.test.y).double().mean().item())

    model.train()
    record(0)
    step = 0
    while step < cfg.steps:
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y) - cfg.batch_size + 1, cfg.batch_size):
            if step == cfg.steps:
                break
            idx = perm[start:start + cfg.batch_size]
            step += 1
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            out["batch_loss"].append(loss.item())
            if step % cfg.record_every == 0 or step == cfg.steps:
                record(step)
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_builtin_recorders_equal_an_independent_loop(dropout):
    cfg = config.FinetuneConfig(**{**SMALL, "steps": 11}, dropout=dropout, recorders=("loss", "norms"))
    got = loop.finetune(cfg, use_cache=False)
    want = _independent_loop(cfg)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], np.asarray(v, dtype=np.float64), err_msg=k)
    assert got["norm_B"][-1].min() > 0


def test_full_batch_frozen_prefix_equals_the_plain_forward():
    """Full batch with layers.0 frozen: the engine computes layers.0's output once; the run equals a plain loop
    that runs the whole model at every step (float64, SGD: a bitwise check of the shortcut)."""
    cfg = _lockstep_cfg(lr=0.1)
    got = loop.finetune(cfg, callbacks=[WeightSnapshots([cfg.steps])], use_cache=False)
    model = setup.build_finetune_model(cfg, torch.device("cpu"))
    x, y = setup.protocol_data(cfg, torch.device("cpu")).finetune
    x = x.double()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_array_equal(got["batch_loss"], losses)
    for i, m in enumerate(lora_modules(model)):
        np.testing.assert_array_equal(got[f"snapshot_A{i}"][0], m.lora_A.detach().numpy())
        assert got[f"snapshot_B{i}"].dtype == np.float64


class Probe(AtSteps):
    prefix = "probe_"

    def __init__(self, steps=None, scale: float = 1.0):
        super().__init__(steps)
        self.scale = scale

    def params(self):
        return {"scale": self.scale}

    def measure(self, state):
        return {"b": self.scale * float(state.layers[-1].lora_B.detach().norm())}


def test_custom_callback_key_enters_the_cache_key_and_its_result_is_cached(monkeypatch):
    cfg = config.FinetuneConfig(**SMALL, recorders=("norms",))
    assert loop.run_key(cfg) == cfg.as_dict()  # no custom callback: the key of the config alone
    keys = [loop.run_key(cfg, [c]) for c in (Probe(), Probe(scale=2.0), Probe([1, 2]), Spy())]
    assert all(k != cfg.as_dict() for k in keys) and len({str(k) for k in keys}) == len(keys)
    plain = loop.finetune(cfg)
    h1 = loop.finetune(cfg, callbacks=[Probe()])
    h2 = loop.finetune(cfg, callbacks=[Probe(scale=2.0)])  # another key: computed, not read from h1's entry
    np.testing.assert_array_equal(h1["probe_step"], plain["step"])  # steps=None: the record steps
    np.testing.assert_allclose(h1["probe_b"], plain["norm_B"][:, -1], rtol=1e-6)
    np.testing.assert_array_equal(h2["probe_b"], 2 * h1["probe_b"])
    np.testing.assert_array_equal(h1["batch_loss"], plain["batch_loss"])  # measuring leaves the run unchanged
    monkeypatch.setattr(loop, "_train", lambda *a: pytest.fail("a cached run must not be retrained"))
    again = loop.finetune(cfg, callbacks=[Probe(scale=2.0)])
    np.testing.assert_array_equal(again["probe_b"], h2["probe_b"])


def test_callback_errors_are_clear():
    cfg = config.FinetuneConfig(**SMALL, recorders=("norms",))

    class Clash(callback_base.Callback):
        def result(self):
            return {"norm_A": np.zeros(1)}

    with pytest.raises(ValueError, match="norm_A"):
        loop.finetune(cfg, callbacks=[Clash()], use_cache=False)
    with pytest.raises(ValueError, match="callbacks"):
        loop.finetune(cfg, callbacks=[lambda s: None], use_cache=False)
    with pytest.raises(ValueError, match="steps"):
        WeightSnapshots([-1])
    with pytest.raises(ValueError, match="steps"):
        CaptureLayerIO([0])
    with pytest.raises(ValueError, match="n"):
        ScaleAdapters(3, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        config.FinetuneConfig(**SMALL, dtype="float16")


def test_divergence_stops_the_run_and_truncates_the_callbacks():
    cfg = config.FinetuneConfig(**SMALL, optimizer="sgd", lr=1e6, loss="mse", recorders=("norms",))
    spy, snaps = Spy(), WeightSnapshots(range(cfg.steps + 1))
    hist = loop.finetune(cfg, callbacks=[spy, snaps], on_diverge="return")
    k = int(hist["diverged_step"][0])
    assert 1 <= k <= cfg.steps and len(hist["batch_loss"]) == k - 1
    np.testing.assert_array_equal(hist["snapshot_step"], np.arange(k))  # steps 0 .. k - 1, then stop
    assert spy.calls[-1][0] == "end" and spy.calls[-1][1] == k and not any(c[1] > k for c in spy.calls)
    with pytest.raises(loop.TrainingDiverged) as info:  # from the cache, with the same step
        loop.finetune(cfg, callbacks=[Spy(), WeightSnapshots(range(cfg.steps + 1))])
    assert info.value.step == k


def test_float64_run_is_float64_throughout():
    cfg = config.FinetuneConfig(**SMALL, optimizer="sgd", lr=0.05, recorders=("loss", "norms"))
    h32 = loop.finetune(cfg, callbacks=[WeightSnapshots([0])], use_cache=False)
    h64 = loop.finetune(cfg.replace(dtype="float64"), callbacks=[WeightSnapshots([0]), CaptureLayerIO([1])],
                         use_cache=False)
    assert h64["snapshot_A0"].dtype == np.float64 and h32["snapshot_A0"].dtype == np.float32
    assert h64["io_X0"].dtype == np.float64 and h64["io_G2"].dtype == np.float64  # data and gradients too
    assert cfg.as_dict() != cfg.replace(dtype="float64").as_dict() and "dtype" not in cfg.as_dict()
    # the adapters are drawn in float64 (other numbers than the float32 draw); at step 1 B = 0, so the loss is
    # the pretrained model's in both precisions, equal to float32 rounding
    assert not np.allclose(h64["snapshot_A0"], h32["snapshot_A0"])
    assert h64["batch_loss"][0] == pytest.approx(h32["batch_loss"][0], rel=1e-6)
    assert h64["batch_loss"][-1] < h64["batch_loss"][0]


def _lockstep_cfg(**changes):
    settings = {**SMALL, "targets": ("layers.1", "layers.2"), "r": 3, "alpha": 3.0, "optimizer": "sgd", "lr": 0.2,
                "batch_size": None, "dtype": "float64", "recorders": ()}
    return config.FinetuneConfig(**{**settings, **changes})


def test_captured_inputs_and_output_gradients_give_the_exact_update():
    """(X, G) captured at step k reproduce the change of s BA of every layer from step k - 1 to k exactly
    (analysis.channels.one_step_update: the SGD update of LoRA in closed form)."""
    cfg = _lockstep_cfg()
    k = 4
    hist = loop.finetune(cfg, callbacks=[WeightSnapshots([k - 1, k]), CaptureLayerIO([k])], use_cache=False)
    assert hist["io_step"].tolist() == [k]
    for i in range(2):
        A, B = hist[f"snapshot_A{i}"][0], hist[f"snapshot_B{i}"][0]
        X, G = hist[f"io_X{i}"][0], hist[f"io_G{i}"][0]
        assert X.shape == (cfg.n_finetune, A.shape[1]) and G.shape == (cfg.n_finetune, B.shape[0])
        want = channels.one_step_update(A, B, X, G, cfg.lr, 1.0)["total"]
        got = hist[f"snapshot_B{i}"][1] @ hist[f"snapshot_A{i}"][1] - B @ A
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
        assert np.abs(want).max() > 1e-6  # a real update, not 0 == 0
    # G = dL/dy of the mean loss: its rows sum, over the last layer, to the gradient of the bias direction
    G_last = hist["io_G1"][0]
    np.testing.assert_allclose(G_last.sum(axis=1), 0.0, atol=1e-12)  # softmax - one_hot sums to 0 per sample


def test_equivalent_modules_start_equal_and_n1_is_the_plain_run():
    cfg = _lockstep_cfg(steps=6)
    warm = 2
    plain = loop.finetune(cfg, callbacks=[WeightSnapshots([warm, cfg.steps])], use_cache=False)
    same = loop.finetune(cfg, callbacks=[ScaleAdapters(warm, 1.0), WeightSnapshots([warm, cfg.steps])],
                          use_cache=False)
    for k in plain:
        np.testing.assert_array_equal(plain[k], same[k], err_msg=k)
    scaled = loop.finetune(cfg, callbacks=[ScaleAdapters(warm, 2.0), WeightSnapshots([warm, cfg.steps])],
                            use_cache=False)
    for i in range(2):
        A0, B0 = plain[f"snapshot_A{i}"][0], plain[f"snapshot_B{i}"][0]
        np.testing.assert_array_equal(scaled[f"snapshot_A{i}"][0], 2.0 * A0)
        np.testing.assert_allclose(scaled[f"snapshot_B{i}"][0] @ scaled[f"snapshot_A{i}"][0], B0 @ A0, rtol=1e-13,
                                   atol=1e-16)
    # the same function until the rescaling, another trajectory after it (LoWR Prop. 4.1)
    np.testing.assert_array_equal(scaled["batch_loss"][: warm + 1], plain["batch_loss"][: warm + 1])
    assert not np.allclose(scaled["batch_loss"][-1], plain["batch_loss"][-1], rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), batch=st.one_of(st.none(), st.integers(1, 50)), steps=st.integers(0, 30),
       seed=st.integers(0, 2**31))
def test_minibatches_are_reshuffled_epochs(n, batch, steps, seed):
    out = list(setup.minibatches(n, batch, steps, torch.Generator().manual_seed(seed)))
    assert len(out) == steps
    if batch is None or batch >= n:
        assert all(idx is None for idx in out)
        return
    per_epoch = n // batch
    for e in range(0, steps, per_epoch):
        epoch = torch.cat(out[e:e + per_epoch])
        assert len(set(epoch.tolist())) == len(epoch) and int(epoch.min()) >= 0 and int(epoch.max()) < n
    assert all(len(idx) == batch for idx in out)


def test_public_helpers_reject_unknown_names():
    with pytest.raises(ValueError, match="name"):
        setup.make_optimizer("lbfgs", [torch.nn.Parameter(torch.zeros(1))], 0.1)
    with pytest.raises(ValueError, match="kind"):
        losses.loss_fn("hinge", torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_full_gradient_norm_probe_is_the_full_set_gradient_and_leaves_training_alone():
    """FullGradientNorm at step 0 = the global adapter-gradient norm of the fine-tune loss computed here with
    autograd on the engine's initial model; at init B = 0, so only dL/dB is non-zero. Training is unchanged."""
    from toymodels.callbacks import FullGradientNorm

    cfg = config.FinetuneConfig(**SMALL, r=4, recorders=("loss", "norms"))
    hist = loop.finetune(cfg, callbacks=[FullGradientNorm(steps=(0, cfg.steps))], use_cache=False)
    plain = loop.finetune(cfg, use_cache=False)
    for k in plain:
        np.testing.assert_array_equal(hist[k], plain[k], err_msg=k)
    model = setup.build_finetune_model(cfg, torch.device("cpu"))
    x, y = setup.protocol_data(cfg, torch.device("cpu")).finetune
    layers = lora_modules(model)
    loss = torch.nn.functional.cross_entropy(model.eval()(x), y)
    gA = torch.autograd.grad(loss, [m.lora_A for m in layers], retain_graph=True, allow_unused=True)
    gB = torch.autograd.grad(loss, [m.lora_B for m in layers])
    assert all(g is None or float(g.abs().max()) == 0.0 for g in gA)  # B = 0 at init
    expected = float(torch.sqrt(sum((g.double() ** 2).sum() for g in gB)))
    assert hist["fullgrad_step"].tolist() == [0, cfg.steps]
    assert hist["fullgrad_norm"][0] == pytest.approx(expected, rel=1e-6)
    assert hist["fullgrad_norm"][1] != pytest.approx(expected, rel=1e-3)  # the weights moved
