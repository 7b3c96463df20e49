"""toymodels.seeds: every stream of a run is analysis.streams.stream_seed(seed, name); no two (seed, stream) pairs
share a seed (the old ``seed + offset`` made seed s's "init" stream seed s+1's "pretrain"); a fork leaves the
training RNG untouched."""

import pytest
import torch

from analysis.streams import stream_seed, torch_seed_bits
from toymodels.config import FinetuneConfig
from toymodels.seeds import SeedStreams

NAMES = ("pretrain", "init", "masks", "batches", "probe", "grad_std")  # every stream of a run
N_SEEDS = 10_000


def test_seed_streams():
    s = SeedStreams(7)
    assert s.STREAMS == NAMES
    assert {k: s.seed(k) for k in NAMES} == {k: stream_seed(7, k) for k in NAMES}
    assert torch.equal(s.generator("batches").get_state(),
                       torch.Generator().manual_seed(stream_seed(7, "batches")).get_state())
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with s.fork(10_000):
        a = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the training RNG is untouched
    torch.manual_seed(stream_seed(7, "fork", 10_000))
    assert torch.equal(a, torch.rand(3))
    with s.fork(("some-figure", 3)):
        b = torch.rand(3)
    torch.manual_seed(stream_seed(7, "some-figure", 3))
    assert torch.equal(b, torch.rand(3))
    assert s.fork_seed("grad_std") == s.seed("grad_std")
    cfg = FinetuneConfig(dataset="synthetic", widths=(8, 4, 3), targets=("layers.0",), seed=7)
    assert cfg.streams.seed("init") == stream_seed(7, "init")
    for bad in ("nope", 1.5, -1):
        with pytest.raises(ValueError):
            s.seed(bad) if isinstance(bad, str) else SeedStreams(bad)
    for bad in ("nope", -1, 2**32, 1.5, (), ("init",), ("fork", 3)):  # a tuple never aliases a run stream / fork
        with pytest.raises(ValueError, match="offset"):
            with s.fork(bad):
                pass


def test_no_two_seeds_share_a_stream():
    """For seeds 0..9999 and every stream of a run, all (seed, stream) seeds are distinct, and so are the low 32
    bits that torch's CPU generator reads (pretrain, init, batches, probe, grad_std and the global RNG are torch
    streams). Fails on the old scheme (seed + offset: 6 x 10000 pairs, 10005 distinct values)."""
    vals = [SeedStreams(s).seed(name) for s in range(N_SEEDS) for name in NAMES]
    assert len(set(vals)) == len(vals)
    assert len({torch_seed_bits(v) for v in vals}) == len(vals)


def test_the_old_overlaps_are_gone():
    """Directly, the coincidences of the old scheme: init(s) = pretrain(s + 1), masks(s) = pretrain(s + 2),
    batches(s) = pretrain(s + 3), and stream k of s = stream j of s + k - j in general."""
    for s in range(200):
        a, b = SeedStreams(s), SeedStreams(s + 1)
        assert a.seed("init") != b.seed("pretrain")
        assert a.seed("masks") != SeedStreams(s + 2).seed("pretrain")
        assert a.seed("batches") != SeedStreams(s + 3).seed("pretrain")
        for k, name in enumerate(NAMES):
            for j, other in enumerate(NAMES[:k]):
                assert a.seed(name) != SeedStreams(s + k - j).seed(other)
    # and the draws themselves differ (not only the integers)
    g1, g2 = SeedStreams(0).generator("init"), SeedStreams(1).generator("pretrain")
    assert not torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))


def test_batched_engine_takes_its_batches_from_the_stream():
    """The batched engine's mini-batch generators are the "batches" stream of each seed, and it seeds nothing by
    hand."""
    import inspect

    from toymodels import batched

    src = inspect.getsource(batched)
    assert 'generator("batches")' in src and "manual_seed(" not in src
