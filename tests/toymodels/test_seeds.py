"""toymodels.seeds: every stream of a run at its documented offset; a fork leaves the training RNG untouched."""

import pytest
import torch

from toymodels.config import FinetuneConfig
from toymodels.seeds import SeedStreams


def test_seed_streams():
    s = SeedStreams(7)
    assert {k: s.seed(k) for k in s.OFFSETS} == {"pretrain": 7, "init": 8, "masks": 9, "batches": 10, "probe": 11,
                                                 "grad_std": 12}
    assert torch.equal(s.generator("batches").get_state(), torch.Generator().manual_seed(10).get_state())
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with s.fork(10_000):
        a = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the training RNG is untouched
    torch.manual_seed(7 + 10_000)
    assert torch.equal(a, torch.rand(3))
    cfg = FinetuneConfig(dataset="synthetic", widths=(8, 4, 3), targets=("layers.0",), seed=7)
    assert cfg.streams.seed("init") == 8
    for bad in ("nope", 1.5):
        with pytest.raises(ValueError):
            s.seed(bad) if isinstance(bad, str) else SeedStreams(bad)
    with pytest.raises(ValueError, match="offset"):
        with s.fork("nope"):
            pass


def test_batched_engine_takes_its_batches_from_the_stream():
    """The batched engine's mini-batch generators are the "batches" stream of each seed (seed + 3, as before)."""
    import inspect

    from toymodels import batched

    src = inspect.getsource(batched)
    assert 'generator("batches")' in src and "manual_seed(" not in src
