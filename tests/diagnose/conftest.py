"""Tiny random Hugging Face models (built from a config, no download) wrapped by PEFT, trained a few steps.

Every fixture is module- or session-scoped: building and training take well under a second each, importing
transformers and peft a few seconds once.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import torch  # noqa: E402

SEED = int(os.environ.get("LORA_THEORY_SEED", "0"))
VOCAB = 128


def tiny_llama(seed: int = SEED):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = SEED):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def token_batch(n: int = 4, t: int = 16, seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def train_steps(model, steps: int, lr: float = 1e-2, seed: int = SEED) -> None:
    """A few AdamW steps of next-token prediction on random tokens (dropout active): moves B off zero."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for k in range(steps):
        ids = token_batch(4, 16, seed + 100 + k)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def make_adapter(tmp_path_factory, arch: str, steps: int = 3, save_base: bool = False, **lora_kwargs):
    """(peft_model, adapter_dir, base_dir or None): PEFT on a tiny model, trained ``steps`` steps and saved."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    root = tmp_path_factory.mktemp(f"{arch}-adapter")
    base_dir = None
    if save_base:
        base_dir = root / "base"
        base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(**lora_kwargs))
    if steps:
        train_steps(model, steps)
    model.save_pretrained(root / "adapter")
    return model, root / "adapter", base_dir


CONFIGS = {
    "plain": ("llama", dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])),
    "rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"layers.1.self_attn.q_proj": 6, "v_proj": 2},
                               alpha_pattern={"v_proj": 3, "mlp.down_proj": 32})),
    "dora": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=16, lora_dropout=0.2, target_modules=["c_attn", "c_proj"],
                          fan_in_fan_out=True)),
}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def trained(request, tmp_path_factory):
    arch, kwargs = CONFIGS[request.param]
    model, folder, _ = make_adapter(tmp_path_factory, arch, **kwargs)
    return request.param, model, folder


@pytest.fixture(scope="session")
def llama_with_base(tmp_path_factory):
    """A plain Llama adapter with dropout, its saved base model and a calibration file."""
    import numpy as np

    model, folder, base_dir = make_adapter(tmp_path_factory, "llama", steps=4, save_base=True,
                                           **CONFIGS["plain"][1])
    ids = token_batch(3, 12, SEED + 7)
    cal = folder.parent / "calibration.npy"
    np.save(cal, ids.numpy())
    return model, folder, base_dir, ids, cal
