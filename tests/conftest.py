"""Test-session settings: one torch CPU thread (deterministic reductions, and the fastest setting for these
small models on a 2-core machine shared with other processes)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
