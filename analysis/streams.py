"""Every seed the project draws, derived in one place: :func:`stream_seed`.

A random stream is named by the integer ``seed`` it belongs to (a run's seed, a Monte-Carlo check's
``LORA_THEORY_SEED``) and a *key*: a short tuple of names and small integers saying which stream it is
(``("pretrain",)``, ``("fork", 10025)``, ``("allora-fig1-dropout-mc", 1, 3)``). Its seed is

    ``SeedSequence(entropy=seed, spawn_key=encode(key)).generate_state(2, uint32)``, the two words read as one
    little-endian 64-bit integer with its top bit cleared (a non-negative int64, which ``torch.manual_seed``,
    ``torch.Generator.manual_seed``, ``numpy.random.default_rng`` and ``numpy.random.SeedSequence`` all take).

``encode`` maps each element of the key to 32-bit words with a prefix-free code, so different keys give different
words (no two keys share a spawn key): an integer ``k`` (``0 <= k < 2**32``) -> ``(0, k)``; a string ``s`` ->
``(1, h0, h1, h2, h3)``, the first 16 bytes of ``sha256(s.encode("utf-8"))`` read as four little-endian 32-bit
words (stable across processes and versions, unlike Python's salted ``hash``). ``seed`` fills the first four words
of SeedSequence's entropy pool (``0 <= seed < 2**64``), so (seed, key) -> words is injective, and distinct words
give unrelated seeds (SeedSequence's hash). Two streams therefore coincide only by a 64-bit accident; for the seeds
and keys the project uses the tests check directly that they do not (``tests/analysis/test_streams.py``).

Torch's CPU generator (mt19937) uses only the low 32 bits of a seed: ``torch.Generator().manual_seed(s)`` and
``manual_seed(s + 2**32)`` give the same numbers. Streams drawn by torch are therefore distinct only if the low
32 bits of their seeds are; :func:`torch_seed_bits` gives those bits, and the tests check them too for every
stream of a run (:class:`toymodels.seeds.SeedStreams`) over seeds 0..9999.

The scheme replaced ``seed + offset`` (issue 16): with it seed s's LoRA-init stream (``s + 1``) was seed s+1's
pretraining stream. :data:`STREAMS_VERSION` names the scheme; it is part of the run-cache key of every run, so a
run computed with another scheme is never returned.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

#: The version of the seed-derivation scheme (part of every run's cache key, :mod:`toymodels.cache`).
#: 1: ``seed + offset`` (until issue 16); 2: :func:`stream_seed` (SeedSequence with an encoded spawn key).
STREAMS_VERSION = 2

_INT_TAG, _STR_TAG = 0, 1
_MAX_SEED = 2**64


def encode_key(key: tuple) -> tuple[int, ...]:
    """The spawn key (32-bit words) of a stream key: int k -> (0, k), str s -> (1, 4 words of sha256(s))."""
    words: list[int] = []
    for i, part in enumerate(key):
        if isinstance(part, str):
            words += _str_words(part)
        elif isinstance(part, int | np.integer) and not isinstance(part, bool) and 0 <= int(part) < 2**32:
            words += [_INT_TAG, int(part)]
        else:
            raise ValueError(f"key[{i}] must be a string or an integer in [0, 2**32), got {part!r}")
    return tuple(words)


@functools.lru_cache(maxsize=1024)
def _str_words(part: str) -> tuple[int, ...]:
    digest = hashlib.sha256(part.encode("utf-8")).digest()[:16]
    return (_STR_TAG, *(int.from_bytes(digest[j:j + 4], "little") for j in range(0, 16, 4)))


def stream_seed(seed: int, *key: int | str) -> int:
    """The seed of stream ``key`` of ``seed`` (see the module docstring for the scheme): a non-negative int64.

    >>> stream_seed(0, "init") == stream_seed(1, "pretrain")
    False
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not key:
        raise ValueError("key must name the stream (at least one string or integer)")
    words = np.random.SeedSequence(entropy=int(seed), spawn_key=encode_key(key)).generate_state(2, np.uint32)
    return (int(words[0]) | int(words[1]) << 32) & (2**63 - 1)


def torch_seed_bits(seed: int) -> int:
    """The part of a seed that torch's CPU generator uses (its low 32 bits): two torch streams are the same
    stream exactly when these coincide."""
    return int(seed) & 0xFFFFFFFF


def rng(seed: int, *key: int | str) -> np.random.Generator:
    """``numpy.random.default_rng(stream_seed(seed, *key))``: a numpy generator for stream ``key`` of ``seed``."""
    return np.random.default_rng(stream_seed(seed, *key))
