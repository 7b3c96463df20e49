"""The measurement probe of ALLoRA fig. 2 (:mod:`figures.allora.fig2_grad_std`): the exact per-entry gradient std
over dropout masks on the last layer, with its Monte Carlo check. Kept apart so the figure file stays readable; its
``cache_name`` keeps the cached runs' keys."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from analysis import dropout as closed
from figures import seeds
from figures.allora.protocol import last_layer_problem
from figures.framework import Probe

RATE = 0.2  # the figure's dropout rate (the paper's fig. 2)


class GradStdExact(Probe):
    """The overlay (last layer, MSE, bottleneck dropout), on the probe batch at each epoch: ``epoch`` and the exact
    per-entry std of the gradients over masks, ``exact_A``, ``exact_B`` (:func:`analysis.dropout.grad_moments`,
    divided by N: the engine's loss is the batch mean); at ``mc_epochs`` also their Monte Carlo estimate over
    ``masks`` masks (``mc_A``, ``mc_B``, the standard errors of the variances ``mc_se_var_A``, ``mc_se_var_B``,
    and ``mc_epoch``), masks from the run's stream forked at :func:`figures.seeds.gradient_masks_offset`."""

    prefix = "fig2_"
    version = 1
    cache_name = "figures.allora_dropout._GradStdExact"  # its module until issue 15 (keeps the cached runs)

    def __init__(self, steps, *, spe: int, masks: int, mc_epochs):
        super().__init__(steps)
        self.spe, self.masks, self.mc_epochs = int(spe), int(masks), sorted(int(e) for e in mc_epochs)

    def params(self) -> dict:
        return {"spe": self.spe, "masks": self.masks, "mc_epochs": self.mc_epochs, "rate": RATE}

    def measure(self, state) -> dict[str, np.ndarray]:
        model, layer, step = state.model, state.layers[-1], state.step
        x, y = state.data.finetune
        idx = state.probe
        prob = last_layer_problem(model, layer, x[idx], y[idx])
        n = prob["X"].shape[0]
        _, var_a, _, var_b = closed.grad_moments(prob["X"], prob["Y"], prob["W"], prob["A"], prob["B"], RATE,
                                                 scaling=float(prob["s"]))
        out = {"epoch": step // self.spe, "exact_A": np.sqrt(var_a).ravel() / n, "exact_B": np.sqrt(var_b).ravel() / n}
        if step // self.spe not in self.mc_epochs:
            return out
        with state.streams.fork(seeds.gradient_masks_offset(step), x.device):
            h = model.features(x[idx]).detach()
            target = nn.functional.one_hot(y[idx], layer.out_features).to(h.dtype)
            gA, gB = [], []
            for _ in range(self.masks):
                loss = ((layer(h) - target) ** 2).sum(1).mean()
                a, b = torch.autograd.grad(loss, (layer.lora_A, layer.lora_B))
                gA.append(a.double().flatten())
                gB.append(b.double().flatten())
        for name, g in (("A", torch.stack(gA).cpu().numpy()), ("B", torch.stack(gB).cpu().numpy())):
            var = g.var(axis=0, ddof=1)
            m4 = ((g - g.mean(axis=0)) ** 4).mean(axis=0)
            out[f"mc_{name}"] = np.sqrt(var)
            out[f"mc_se_var_{name}"] = np.sqrt(np.maximum(m4 - var**2, 0.0) / self.masks)
        out["mc_epoch"] = step // self.spe
        return out
