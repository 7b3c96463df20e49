"""The random streams of a run, derived from its seed in one place (:class:`SeedStreams`).

Every random number of a fine-tuning run (the pretrained MLP's init and batches, the data subsets, the LoRA
initialisation, the dropout masks, the mini-batch order, the probe batch, the grad_std masks) comes from one of
the streams named in :attr:`SeedStreams.OFFSETS`, seeded ``seed + offset``. Both engines (the loop,
:mod:`toymodels.loop`, and the batched engine, :mod:`toymodels.batched`) take their streams from here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import MappingProxyType

import numpy as np
import torch

from toymodels.masks import MaskStream


class SeedStreams:
    """The one place where a run's random streams are derived from its seed.

    Stream ``name`` is seeded ``seed + SeedStreams.OFFSETS[name]``: "pretrain" (+0: the pretrained MLP's init,
    its batches and the data subsets), "init" (+1: the LoRA initialisation, a CPU generator), "masks" (+2: the
    dropout masks of the training steps, :meth:`masks`; the global torch RNG is seeded with it too, for
    anything else a step may draw), "batches" (+3: the mini-batch permutations), "probe" (+4:
    the probe mini-batch of the recorders), "grad_std" (+5: the masks of the grad_std recorder, drawn from a
    forked RNG). A callback that draws random numbers must not touch the training streams: it uses
    :meth:`fork` (a forked global RNG seeded ``seed + offset``, restored afterwards) or its own generator.
    """

    OFFSETS = MappingProxyType({"pretrain": 0, "init": 1, "masks": 2, "batches": 3, "probe": 4, "grad_std": 5})

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.base = int(seed)

    def __repr__(self) -> str:
        return f"SeedStreams({self.base})"

    def seed(self, stream: str) -> int:
        """The integer seed of ``stream`` (one of :attr:`OFFSETS`)."""
        if stream not in self.OFFSETS:
            raise ValueError(f"stream must be one of {tuple(self.OFFSETS)}, got {stream!r}")
        return self.base + self.OFFSETS[stream]

    def generator(self, stream: str) -> torch.Generator:
        """A fresh CPU generator seeded for ``stream`` (CPU draws give the same numbers on every device)."""
        return torch.Generator(device="cpu").manual_seed(self.seed(stream))

    def masks(self) -> MaskStream:
        """A fresh dropout-mask stream of the run (:class:`toymodels.masks.MaskStream`, "masks" seed): what the
        training steps of both engines draw their masks from."""
        return MaskStream(self.seed("masks"))

    def seed_global(self, stream: str) -> None:
        """Seed torch's global RNG (CPU and CUDA) for ``stream``."""
        torch.manual_seed(self.seed(stream))

    @contextlib.contextmanager
    def fork(self, offset: int | str, device: torch.device | str | None = None) -> Iterator[None]:
        """Run the block with the global RNG seeded ``seed + offset`` (``offset`` an int or a stream name) and
        restore the training RNG afterwards (so a Monte Carlo inside a callback leaves the run unchanged)."""
        off = self.OFFSETS[offset] if isinstance(offset, str) and offset in self.OFFSETS else offset
        if isinstance(off, str) or isinstance(off, bool) or not isinstance(off, int | np.integer):
            raise ValueError(f"offset must be an integer or one of {tuple(self.OFFSETS)}, got {offset!r}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(self.base + int(off))
            yield

    def probe_indices(self, n: int, size: int | None) -> torch.Tensor:
        """The probe mini-batch: the first ``size`` (all if None) of a permutation of ``range(n)`` drawn from the
        "probe" stream (the same rows at every record of a run)."""
        return torch.randperm(n, generator=self.generator("probe"))[: size or n]
