"""The random streams of a run, derived from its seed in one place (:class:`SeedStreams`).

Every random number of a fine-tuning run (the pretrained MLP's init and batches, the LoRA initialisation, the
dropout masks, the mini-batch order, the probe batch, the grad_std masks) comes from one of the streams named in
:attr:`SeedStreams.STREAMS`, whose seed is :func:`analysis.streams.stream_seed` ``(seed, name)``: numpy's
SeedSequence of the run's seed with the stream's name as spawn key (the project's one derivation of seeds, see
:mod:`analysis.streams`). Both engines (the loop, :mod:`toymodels.loop`, and the batched engine,
:mod:`toymodels.batched`) take their streams from here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from analysis.streams import stream_seed
from toymodels.masks import MaskStream


class SeedStreams:
    """The one place where a run's random streams are derived from its seed.

    Scheme (issue 16): stream ``name`` of the run with seed ``seed`` is seeded
    ``analysis.streams.stream_seed(seed, name)`` = SeedSequence(entropy=seed, spawn_key=<name encoded>) ->
    a 63-bit integer. No two (seed, stream) pairs share a seed (tested for seeds 0..9999, including the 32 bits
    torch's CPU generator reads; the old ``seed + offset`` made seed s's "init" stream seed s+1's "pretrain").
    The streams: "pretrain" (the pretrained MLP's init and its batches), "init" (the LoRA initialisation, a CPU
    generator), "masks" (the dropout masks of the training steps, :meth:`masks`; the global torch RNG is seeded
    with it too, for anything else a step may draw), "batches" (the mini-batch permutations), "probe" (the probe
    mini-batch of the recorders), "grad_std" (the masks of the grad_std recorder, drawn from a forked RNG). The
    data subsets are drawn by :mod:`toymodels.data` from the run's seed with their own SeedSequence keys. A
    callback that draws random numbers must not touch the training streams: it uses :meth:`fork` (a forked
    global RNG seeded ``stream_seed(seed, "fork", offset)`` for an integer offset, or ``stream_seed(seed, *key)``
    for a tuple key, restored afterwards) or its own generator.
    """

    STREAMS = ("pretrain", "init", "masks", "batches", "probe", "grad_std")

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.base = int(seed)

    def __repr__(self) -> str:
        return f"SeedStreams({self.base})"

    def seed(self, stream: str) -> int:
        """The integer seed of ``stream`` (one of :attr:`STREAMS`): ``stream_seed(self.base, stream)``."""
        if stream not in self.STREAMS:
            raise ValueError(f"stream must be one of {self.STREAMS}, got {stream!r}")
        return stream_seed(self.base, stream)

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

    def fork_seed(self, key: int | str | tuple) -> int:
        """The seed of a fork: a stream name of :attr:`STREAMS` -> its seed; an integer ``offset`` ->
        ``stream_seed(seed, "fork", offset)``; a tuple key (names and integers, e.g. a figure's own
        ``("allora-fig2-grad-std", step)``) -> ``stream_seed(seed, *key)``."""
        if isinstance(key, str):
            return self.seed(key) if key in self.STREAMS else self._bad_fork(key)
        if isinstance(key, tuple):
            if not key or key[0] in self.STREAMS or key[0] == "fork":
                self._bad_fork(key)  # a tuple key never aliases a run stream or an integer fork
            return stream_seed(self.base, *key)
        if isinstance(key, bool) or not isinstance(key, int | np.integer) or not 0 <= int(key) < 2**32:
            self._bad_fork(key)
        return stream_seed(self.base, "fork", int(key))

    def _bad_fork(self, key):
        raise ValueError(f"offset must be an integer in [0, 2**32), one of {self.STREAMS} or a tuple key "
                         f"(names and integers, not starting with a stream name or 'fork'), got {key!r}")

    @contextlib.contextmanager
    def fork(self, offset: int | str | tuple, device: torch.device | str | None = None) -> Iterator[None]:
        """Run the block with the global RNG seeded :meth:`fork_seed` ``(offset)`` (an integer, a stream name or a
        tuple key) and restore the training RNG afterwards (so a Monte Carlo inside a callback leaves the run
        unchanged)."""
        seed = self.fork_seed(offset)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def probe_indices(self, n: int, size: int | None) -> torch.Tensor:
        """The probe mini-batch: the first ``size`` (all if None) of a permutation of ``range(n)`` drawn from the
        "probe" stream (the same rows at every record of a run)."""
        return torch.randperm(n, generator=self.generator("probe"))[: size or n]
