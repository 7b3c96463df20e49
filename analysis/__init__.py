"""Closed forms for the theory of LoRA fine-tuning, in float64, one module per paper section.

- :mod:`analysis.dropout`       ALLoRA sec. 3.1-3.2, app. A: dropout's expected loss, its variance, gradient moments.
- :mod:`analysis.rank_scaling`  rsLoRA thm. 3.2, app. A: exact moments after SGD steps vs the rank.
- :mod:`analysis.ripple`        ALLoRA sec. 3.3, prop. 1: output norm vs depth and its bounds.
- :mod:`analysis.adaptive`      ALLoRA sec. 4.2-4.3, listing 1: ALLoRA, ALLoRA-OD and ASF-LoRA.
- :mod:`analysis.channels`      LoWR: proxies, equivalent modules, Algorithm 1.
- :mod:`analysis.allora_dynamics` ALLoRA sec. 4.2-4.3 / 6: ALLoRA's and ALLoRA-OD's flows vs dropout's expected
  flow (does ALLoRA regularize like dropout?), ALLoRA-OD as LoRA on a reshaped loss, the chain's forward and
  backward for LoRA x eta, ALLoRA and ASF-LoRA.
- :mod:`analysis.inputs`        input validation shared by every closed form (public; bad input -> ValueError
  naming the argument).
- :mod:`analysis.streams`       every seed the project draws: ``stream_seed(seed, *key)`` (numpy SeedSequence with
  the key as spawn key; the runs' streams, the data subsets and the figures' Monte-Carlo seeds).
- :mod:`analysis.verify`        ``lora-theory verify``: one table row per derivation check, per topic.

Conventions (torch.nn.Linear / HF PEFT): X (N, d_in), Y (N, d_out), W (d_out, d_in), A = lora_A (r, d_in),
B = lora_B (d_out, r); the prediction is ``X @ W.T + scaling * X @ A.T @ B.T``. The dropout rate ``p`` is the
probability of zeroing; kept entries are scaled by 1 / (1 - p). The papers' own notations are mapped in
each docstring; where they are wrong, see ERRATA.md.
"""
