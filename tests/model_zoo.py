"""Tiny random-weight causal LMs, one per decoder family of transformers 5.24 (built from configs, nothing downloaded).

Each config turns on the features of its family that matter to a KV/state cache, at toy sizes: hidden 64,
2-4 decoder layers, ``max_position_embeddings`` 512, ``initializer_range`` 0.05.

- sliding / chunked windows of 8 tokens, shorter than the test prompts: gemma3, gemma3n, gpt_oss, olmo3,
  exaone4, llama4 (chunked), deepseek_v4;
- linear-attention / SSM layers next to attention layers: qwen3_5(_moe), qwen3_next, kimi_linear,
  granitemoehybrid, lfm2 (``conv``), nemotron_h, jamba; falcon_h1 has both in every layer; mamba2 is all-SSM;
- MLA with ``kv_lora_rank`` 32, ``qk_rope_head_dim`` 8 and ``v_head_dim`` 24: deepseek_v3, deepseek_v32,
  glm_moe_dsa, kimi_linear (its full layer), longcat_flash (2 cache layers per decoder layer);
- DSA indexers (deepseek_v32, glm_moe_dsa with a ``shared`` layer): 64 index heads, ``index_topk`` 16, so the
  selection is active on prompts longer than 16 tokens. With 32 heads, glm_moe_dsa's top-k flipped between
  a one-shot and a split prefill of one generated (repetitive) prompt: an upstream tie, which 64 heads avoid;
- deepseek_v4: sliding + CSA + HCA layers, compress rates 4 / 8, window 8, a 32-head indexer with
  ``index_topk`` 4 (over compressed entries), and hash-MoE plus MoE;
- gemma3n: 2 KV-producer layers and 2 KV-sharing consumer layers (``DummyLayer`` in the cache);
- attention sinks: gpt_oss (and deepseek_v4);
- NoPE layers: smollm3, llama4 (llama4's NoPE layer also does attention-temperature tuning,
  ``floor_scale`` 16, which reads ``cache.get_seq_length(layer_idx)``);
- MoE with 4 experts (MiniMax v1: 2): minimax_m2, deepseek_v3/v32/v4, glm_moe_dsa, glm4_moe, qwen3_moe,
  qwen3_5_moe, qwen3_next, kimi_linear, gpt_oss, llama4, granitemoehybrid, nemotron_h, jamba, longcat_flash
  (with zero experts), minimax.

Layer counts are just enough to include every kind of layer: qwen3_next is ``[linear, full, linear]``;
deepseek_v4 is ``[sliding, CSA, HCA]``.

With the 5.24 CPU kernels, a prompt prefilled in pieces (then greedy-decoded) matches one forward within 1.5e-6
for every type except jamba. For attention-only types, one split at 16 or 32 tokens gives bit-identical logits.
Jamba's Mamba-1 multi-token scan ignores the stored recurrent state (errors 2e-4 to 2e-2 here). Feeding its
suffix one token at a time matches within 5e-7.

API
---
``VOCAB``
    the vocabulary size of every model (128). ``pad_token_id`` is 0 and ``bos_token_id`` is 1.
``MODEL_TYPES``
    the types that generate with ``DynamicCache(config=model.config)``: every type in the brief except
    ``"minimax"``, with ``"llama"`` (plain full attention, the control) first.
``ALL_TYPES``
    ``MODEL_TYPES + ["minimax"]``. MiniMax v1 refuses every cache except its own ``MiniMaxCache`` (a
    ``DynamicCache`` subclass; ``isinstance`` check). Use ``make_cache``.
``build(model_type, seed=0, attn="eager", **config_overrides) -> PreTrainedModel``
    fp32, ``.eval()``, weights drawn after ``torch.manual_seed(seed)``. ``generation_config.pad_token_id`` is
    0. ``eos_token_id`` is ``None`` in both the config and the generation config, so ``generate`` always runs
    ``max_new_tokens`` steps. Multimodal families are built as their text-only causal LM: qwen3_5 ->
    ``Qwen3_5ForCausalLM`` (``Qwen3_5TextConfig``), and likewise for qwen3_5_moe, gemma3, gemma3n and llama4.
``config_for(model_type, **overrides) -> PreTrainedConfig``
    a fresh copy of the config that ``build`` uses. For deepseek_v4 it first imports the modeling module,
    which registers the V4 cache-layer classes that ``DynamicCache(config=...)`` needs.
``make_cache(model)``
    ``DynamicCache(config=model.config)``, or ``MiniMaxCache()`` for MiniMax v1.
``layer_kinds(model_type) -> list[str]``
    the cache-layer class name that ``DynamicCache(config=config_for(model_type))`` builds for each layer index.
``ATTN``
    the attention implementation each type needs for all of its features. It is ``"eager"`` for every type,
    and it is ``build``'s default. ``SDPA_OK`` lists the types that also build and generate the same tokens
    with ``attn="sdpa"``. deepseek_v4, gpt_oss (sinks) and mamba2 (no attention) raise ``ValueError`` for
    sdpa.
``prompt(length, seed=0, batch=1)``
    random token ids in ``[3, VOCAB)``.

Speed: one ``generate(max_new_tokens=8)`` on a 60-token prompt takes 0.02-0.35 s per type with
``torch.set_num_threads(1)`` (deepseek_v4 is the slowest, then gemma3n and the qwen3.5/next hybrids). With
2 threads on a CPU that other processes share, the same call took 0.2-2 s. Tests that loop over the zoo should
pin one thread.

Left padding: llama4 (temperature tuning counts cache columns) and deepseek_v4 (the compressors count cache
columns and include the pads) give different results for a left-padded row than for the same row unpadded.
This is upstream behaviour. For these two types, compare a pooled run against an unpooled run with the same
padding.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedConfig, PreTrainedModel

VOCAB = 128

L, F, S = "linear_attention", "full_attention", "sliding_attention"

_COMMON = dict(
    vocab_size=VOCAB,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
    max_position_embeddings=512,
    initializer_range=0.05,
)
_ATTN = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)
_MLA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=24,
)
_DS_MOE = dict(
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
)
# DSA: the index score is a signed sum over heads of ReLU terms. With 32 heads an exact tie (all heads 0) is
# practically impossible. index_topk 16 keeps the selection active on the test prompts (up to ~80 tokens).
_DSA = dict(index_n_heads=64, index_head_dim=16, index_topk=16)
_GDN = dict(
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
)
_QWEN_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
)

# model_type -> (config model_type, config kwargs). num_hidden_layers defaults to len(layer_types).
_SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(**_ATTN, num_hidden_layers=2)),
    "minimax_m2": (
        "minimax_m2",
        dict(**_ATTN, num_hidden_layers=2, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2),
    ),
    "deepseek_v4": (
        "deepseek_v4",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            head_dim=32,
            q_lora_rank=16,
            o_groups=2,
            o_lora_rank=8,
            layer_types=[S, "compressed_sparse_attention", "heavily_compressed_attention"],
            sliding_window=8,
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            index_n_heads=32,
            index_head_dim=16,
            index_topk=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            hc_mult=2,
            mlp_layer_types=["hash_moe", "moe", "moe"],
        ),
    ),
    "qwen3_5": ("qwen3_5_text", dict(**_ATTN, **_GDN, layer_types=[L, F, L])),
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(**_ATTN, **_GDN, **_QWEN_MOE, layer_types=[L, F, L])),
    "qwen3_next": ("qwen3_next", dict(**_ATTN, **_GDN, **_QWEN_MOE, layer_types=[L, F, L])),
    "deepseek_v3": ("deepseek_v3", dict(**_MLA, **_DS_MOE, num_hidden_layers=2)),
    "deepseek_v32": ("deepseek_v32", dict(**_MLA, **_DS_MOE, **_DSA, num_hidden_layers=2)),
    "glm_moe_dsa": (
        "glm_moe_dsa",
        dict(**_MLA, **_DS_MOE, **_DSA, num_hidden_layers=3, indexer_types=["full", "shared", "full"]),
    ),
    "glm4_moe": ("glm4_moe", dict(**_ATTN, **_DS_MOE, num_hidden_layers=2, use_qk_norm=True)),
    "kimi_linear": (
        "kimi_linear",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=24,
            moe_intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            linear_head_dim=8,
            linear_num_heads=4,
            layer_types=[L, F, L],
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(
            **_ATTN,
            layer_types=[S, F],
            sliding_window=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=128,
            ),
        ),
    ),
    "llama4": (
        "llama4_text",
        dict(
            **_ATTN,
            intermediate_size_mlp=96,
            num_hidden_layers=4,
            attention_chunk_size=8,
            no_rope_layer_interval=4,
            interleave_moe_layer_step=2,
            num_local_experts=4,
            num_experts_per_tok=1,
            floor_scale=16,
        ),
    ),
    "gemma3": (
        "gemma3_text",
        dict(**_ATTN, layer_types=[S, S, F], sliding_window=8, query_pre_attn_scalar=16),
    ),
    "gemma3n": (
        "gemma3n_text",
        dict(
            **_ATTN,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            layer_types=[S, F, S, F],
            sliding_window=8,
            num_kv_shared_layers=2,
            laurel_rank=8,
            altup_num_inputs=2,
            activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
        ),
    ),
    "olmo3": ("olmo3", dict(**_ATTN, layer_types=[S, F], sliding_window=8)),
    "smollm3": ("smollm3", dict(**_ATTN, num_hidden_layers=2, no_rope_layer_interval=2)),
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            **_ATTN,
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_only_layers=[0],
        ),
    ),
    "granitemoehybrid": (
        "granitemoehybrid",
        dict(
            **_ATTN,
            layer_types=[L, F, L],
            mamba_n_heads=8,
            mamba_d_head=16,
            mamba_d_state=16,
            mamba_n_groups=1,
            mamba_chunk_size=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=32,
            position_embedding_type="rope",
        ),
    ),
    "lfm2": (
        "lfm2",
        dict(**_ATTN, num_hidden_layers=3, full_attn_idxs=[1], conv_L_cache=3, block_multiple_of=16),
    ),
    "falcon_h1": (
        "falcon_h1",
        dict(
            **_ATTN,
            num_hidden_layers=2,
            mamba_d_ssm=64,
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_d_state=16,
            mamba_n_groups=1,
            mamba_chunk_size=8,
        ),
    ),
    "nemotron_h": (
        "nemotron_h",
        dict(
            **_ATTN,
            layers_block_type=["mamba", "attention", "moe", "mlp"],
            mamba_num_heads=8,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            chunk_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
        ),
    ),
    "jamba": (
        "jamba",
        dict(
            **_ATTN,
            num_hidden_layers=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=8,
        ),
    ),
    "mamba2": (
        "mamba2",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_heads=8,
            head_dim=16,
            state_size=16,
            n_groups=2,
            expand=2,
            conv_kernel=4,
            chunk_size=8,
        ),
    ),
    "seed_oss": ("seed_oss", dict(**_ATTN, num_hidden_layers=2, attention_dropout=0.0, residual_dropout=0.0)),
    "exaone4": ("exaone4", dict(**_ATTN, layer_types=[S, F], sliding_window=8)),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", dict(**_ATTN, num_hidden_layers=2)),
    "ernie4_5": ("ernie4_5", dict(**_ATTN, num_hidden_layers=2)),
    "apertus": (
        "apertus",
        dict(
            **_ATTN,
            num_hidden_layers=2,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=12000000.0,
                factor=8.0,
                original_max_position_embeddings=64,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
            ),
        ),
    ),
    "longcat_flash": (
        "longcat_flash",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=32,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=24,
            num_layers=2,
            ffn_hidden_size=96,
            n_routed_experts=4,
            zero_expert_num=2,
            moe_topk=2,
            expert_ffn_hidden_size=32,
        ),
    ),
    # MiniMax v1: full attention first (with a linear layer at index 0 its own cache misreports the length)
    "minimax": (
        "minimax",
        dict(**_ATTN, layer_types=[F, L], block_size=4, num_local_experts=2, num_experts_per_tok=1),
    ),
}

MODEL_TYPES: list[str] = [t for t in _SPECS if t != "minimax"]
ALL_TYPES: list[str] = MODEL_TYPES + ["minimax"]

ATTN: dict[str, str] = {t: "eager" for t in ALL_TYPES}
SDPA_OK: frozenset[str] = frozenset(ALL_TYPES) - {"deepseek_v4", "gpt_oss", "mamba2"}

# modules that must be imported before DynamicCache(config=...) knows their layer types (LAYER_KINDS pitfall 13)
_REGISTER = {"deepseek_v4": "transformers.models.deepseek_v4.modeling_deepseek_v4"}


def config_for(model_type: str, **overrides) -> PreTrainedConfig:
    """A fresh tiny config for ``model_type`` (text config for multimodal families)."""
    cfg_type, kwargs = _SPECS[model_type]
    kwargs = {**_COMMON, **kwargs, **overrides}
    if "layer_types" in kwargs and "num_hidden_layers" not in overrides:
        kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    if model_type in _REGISTER:
        importlib.import_module(_REGISTER[model_type])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(cfg_type, **kwargs)


def build(model_type: str, seed: int = 0, attn: str = "eager", **overrides) -> PreTrainedModel:
    """A tiny random-weight causal LM for ``model_type``: fp32, eval mode, pad 0, no eos."""
    cfg = config_for(model_type, **overrides)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = None
    return model.eval()


def make_cache(model: PreTrainedModel):
    """The cache ``generate`` accepts for ``model``: ``DynamicCache(config=...)``, MiniMax v1: ``MiniMaxCache()``."""
    if model.config.model_type == "minimax":
        from transformers.models.minimax.modeling_minimax import MiniMaxCache

        return MiniMaxCache()
    return DynamicCache(config=model.config)


def layer_kinds(model_type: str) -> list[str]:
    """Class name of each layer of ``DynamicCache(config=config_for(model_type))``."""
    return [type(layer).__name__ for layer in DynamicCache(config=config_for(model_type)).layers]


def prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Random token ids in ``[3, VOCAB)``, shape ``[batch, length]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
