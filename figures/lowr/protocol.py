"""What the LoWR figures share: the data set, LoWR's main setting, the MNIST protocol with s = alpha / r = 1 and
the protocols of the newer LoWR figures.

Toy analogue: the shared MNIST protocol (784-256-256-10 MLP, LoRA on every layer, Adam lr 1e-3) with s = alpha / r
= 1 (the paper's y = (W + BA) x). Shapes: A = lora_A (r, d_in), B = lora_B (d_out, r); channel i is
(a_i = A[i, :], b_i = B[:, i]).
"""

from __future__ import annotations

from figures._common import base_config
from figures.framework import Protocol

DATASET = "mnist"
MAIN_LOWR = (10.0, 0.1, 1)  # (tau, alpha, every): tau from the paper's grid, alpha the smaller GSM8K value

LOWR_PROTOCOLS = (  # of lowr-effective-rank, lowr-plugin-inits (and the first and last of lowr-mechanism)
    Protocol("adam", {}, primary=True, paper=True, note="the paper fine-tunes with AdamW (LoRA's defaults): Adam 1e-3"),
    Protocol("lowr-every-5", {"lowr_every": 5}, note="rescaling every 5 steps (app. A, table 5)"),
    Protocol("sgd", {"optimizer": "sgd", "lr": 0.05}, note="plain SGD: LoWR's argument (eq. 10-11) is about SGD steps"),
)


def unit_scale_config(ctx, r: int, **changes):
    """The MNIST protocol with rank r, s = alpha / r = 1, the loss and channel recorders (no seed: the framework
    fans the seeds out)."""
    return base_config(ctx, DATASET, r=r, alpha=float(r), recorders=("loss", "channels"), **changes)


def split_settings(settings: dict) -> tuple[dict, tuple[float, float, int]]:
    """(FinetuneConfig changes, LoWR's (tau, alpha, every)) from a protocol's settings (``lowr_every``)."""
    s = dict(settings)
    every = int(s.pop("lowr_every", MAIN_LOWR[2]))
    return s, (MAIN_LOWR[0], MAIN_LOWR[1], every)
