"""Tiny random-weight causal LMs built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.5)),
    # sliding-window layers (every other layer) with a window shorter than the prompts;
    # Gemma2 has no sdpa path in transformers (eager only)
    "gemma2_sliding": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_key_value_heads=2, head_dim=16, sliding_window=8, num_hidden_layers=3),
    ),
    "qwen2_sliding": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
}


def build(arch: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    config_name, model_name, extra = ARCHS[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    model.generation_config.pad_token_id = 0
    return model.eval()


def prompt(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def attn_supported(arch: str, attn: str) -> bool:
    return not (arch == "gemma2_sliding" and attn == "sdpa")
