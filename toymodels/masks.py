"""The dropout masks of a fine-tuning run: one stream per run, drawn identically by both engines.

A run's training steps draw their dropout masks from a :class:`MaskStream` seeded with the run's "masks" seed
(:meth:`toymodels.seeds.SeedStreams.masks`, ``stream_seed(seed, "masks")``). At every step each LoRA layer with dropout draws one mask,
in layer order: shape (batch, d_in) for the input placement (PEFT: drop(x) before A), (batch, r) for the
bottleneck (ALLoRA eq. 1: drop(x A^T)). The sequential loop (:func:`toymodels.loop.finetune`) and the batched
engine (:func:`toymodels.batched.finetune_many`) draw the same masks in the same order, so the two engines
compute the same run up to float rounding.

The scheme (:data:`SCHEME`, part of the run-cache key of every run with dropout): PCG64 seeded by
``SeedSequence([masks seed, 0xD209])``; an entry takes one 32-bit word w of the stream (``random_raw`` words
split into their two 32-bit halves, low half first; an odd count discards the last half), and is kept when
w < round((1 - p) 2^32), so its keep probability is 1 - p to within 2^-32; a kept entry is 1 / (1 - p)
(computed in the run's dtype as torch's ``nn.Dropout`` does: ``kept.to(dtype).div_(1 - p)``), a dropped one 0.
E[mask] = 1 as for ``nn.Dropout``.

Why not torch's own dropout RNG, as before (the global generator, ``bernoulli_``):

- on the CPU ``bernoulli_`` is serial (two mt19937 words per entry, ~6.6 ns per entry here); this stream costs
  ~1.2 ns per entry, and the masks were the largest single cost of a batched step with dropout;
- ATen draws ``bernoulli_`` from MKL's generator on Intel CPUs and from mt19937 elsewhere (aten/src/ATen/native/
  cpu/DistributionKernels.cpp, ``bernoulli_scalar_kernel``), and from Philox on CUDA, so the same seed gave
  other masks on other machines; this stream is the same on every machine and device (masks are drawn on the
  CPU and copied);
- a per-run stream frees the loop from the process-global generator.

Only the training steps' forward passes use the stream. Anything else that runs a LoRA layer in training mode (a
callback's Monte Carlo over masks, a figure's own forward) gets ``nn.Dropout``'s masks from torch's global RNG,
as before (see :meth:`toymodels.seeds.SeedStreams.fork`).
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.inputs import dropout_rate

SCHEME = "pcg64-u32-v2"  # in the cache key of every run with dropout: change it when the scheme changes
_TAG = 0xD209


def keep_threshold(p: float) -> np.uint32:
    """The 32-bit threshold of dropout rate ``p``: an entry is kept when its word is below it."""
    return np.uint32(min(round((1.0 - p) * 2**32), 2**32 - 1))


class MaskStream:
    """The dropout-mask stream of one run (see the module docstring for the scheme).

    ``seed``: the run's "masks" seed (:meth:`toymodels.seeds.SeedStreams.masks` gives the stream of a run).
    :meth:`kept` draws the kept entries (bool), :meth:`draw` the scaled mask as a tensor.
    """

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self._bits = np.random.PCG64(np.random.SeedSequence([self.seed, _TAG]))

    def __repr__(self) -> str:
        return f"MaskStream({self.seed})"

    def kept(self, shape: tuple[int, ...], p: float, out: np.ndarray | None = None) -> np.ndarray:
        """The next mask's kept entries, a bool array of ``shape`` (written into ``out`` if given)."""
        p = dropout_rate(p, name="p")
        size = int(np.prod(shape))
        words = self._bits.random_raw((size + 1) // 2).view(np.uint32)[:size].reshape(shape)
        return np.less(words, keep_threshold(p), out=out)

    def draw(self, shape: tuple[int, ...], p: float, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
        """The next scaled mask: 1 / (1 - p) where kept, 0 elsewhere, in ``dtype`` on ``device``."""
        mask = scale(self.kept(tuple(shape), p), 1.0 - p, dtype)
        return mask if device is None else mask.to(device)


def scale(kept: np.ndarray, keep: float | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``kept.to(dtype).div_(keep)``: the scaled mask (``keep`` = 1 - p, a number or a tensor that broadcasts)."""
    return torch.from_numpy(kept).to(dtype).div_(keep)
