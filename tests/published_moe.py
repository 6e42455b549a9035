"""Tiny random checkpoints of the published LLaDA-MoE and LLaDA2.x code, laid out like their Hub repos.

As ``tests/published.py`` does for LLaDA and Dream: the remote code is read from
``../shared/fixtures/published-dlm-code`` (unmodified) and copied next to the weights at test time; weights are
written by name and shape from here, not by the published classes. The fixtures carry no ``config.json`` for
these two, so the config holds the configuration classes' own keys with the values of the published model cards
(LLaDA-MoE-7B-A1B, LLaDA2.0-mini) at small widths, and the ``auto_map`` the Hub repos declare.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.published import FIXTURES, _random, save_id_tokenizer, save_sharded

SKIP_REASON = (f"the published LLaDA-MoE / LLaDA2 code is not at {FIXTURES} (a clone outside the project's "
               "workplace); these tests run the real remote code only")
requires_published_moe_code = pytest.mark.skipif(
    not (FIXTURES / "llada_moe").is_dir() or not (FIXTURES / "llada2_moe").is_dir(), reason=SKIP_REASON)

VOCAB, MASK = 256, 250  # the published 157184 / 156895, shrunk; the word-level tokenizer carries the mask token


def llada_moe_config(**overrides) -> dict:
    return {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "lladamoe",
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                     "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "dense_intermediate_size": 128, "expert_intermediate_size": 32,
        "shared_expert_intermediate_size": None, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_layer_freq": [1, 1], "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax",
        "norm_topk_prob": True, "qk_layernorm": True, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 50000, "partial_rotary_factor": 1, "rope_scaling": None, "max_position_embeddings": 512,
        "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None, "routed_scaling_factor": 1,
        "router_num_group": None, "router_topk_group": None, "tie_word_embeddings": False, "use_cache": False,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None, "initializer_range": 0.02,
        "torch_dtype": "float32",
    } | overrides


def llada2_config(**overrides) -> dict:
    return {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe",
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "use_qkv_bias": False, "use_qk_norm": True, "use_bias": False, "rms_norm_eps": 1e-6, "norm_head": False,
        "tie_word_embeddings": False, "embedding_dropout": 0.0, "attention_dropout": 0.0, "output_dropout": 0.0,
        "initializer_range": 0.02, "max_position_embeddings": 512, "rope_theta": 600000, "use_cache": False,
        "rope_scaling": None, "pad_token_id": 0, "eos_token_id": 1, "num_experts": 16, "num_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
        "moe_intermediate_size": 32, "first_k_dense_replace": 1, "partial_rotary_factor": 0.5,
        "torch_dtype": "float32",
    } | overrides


def _mlp(prefix: str, hidden: int, inner: int) -> dict:
    return {f"{prefix}.gate_proj.weight": (inner, hidden), f"{prefix}.up_proj.weight": (inner, hidden),
            f"{prefix}.down_proj.weight": (hidden, inner)}


def llada_moe_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = h // heads
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {f"{layer}.self_attn.q_proj.weight": (heads * hd, h),
                   f"{layer}.self_attn.k_proj.weight": (kv * hd, h),
                   f"{layer}.self_attn.v_proj.weight": (kv * hd, h),
                   f"{layer}.self_attn.o_proj.weight": (h, h),
                   f"{layer}.self_attn.q_norm.weight": (hd,), f"{layer}.self_attn.k_norm.weight": (hd,),
                   f"{layer}.input_layernorm.weight": (h,), f"{layer}.post_attention_layernorm.weight": (h,)}
        if c["moe_layer_freq"][i]:
            shapes[f"{layer}.mlp.gate.weight"] = (c["num_experts"], h)
            for e in range(c["num_experts"]):
                shapes |= _mlp(f"{layer}.mlp.experts.{e}", h, c["expert_intermediate_size"])
            if c["shared_expert_intermediate_size"]:
                shapes |= _mlp(f"{layer}.shared_expert", h, c["shared_expert_intermediate_size"])
        else:
            shapes |= _mlp(f"{layer}.mlp", h, c["dense_intermediate_size"])
    return shapes


def llada2_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, heads, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    shapes = {"model.word_embeddings.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {f"{layer}.attention.query_key_value.weight": ((heads + 2 * kv) * hd, h),
                   f"{layer}.attention.query_layernorm.weight": (hd,),
                   f"{layer}.attention.key_layernorm.weight": (hd,),
                   f"{layer}.attention.dense.weight": (h, heads * hd),
                   f"{layer}.input_layernorm.weight": (h,), f"{layer}.post_attention_layernorm.weight": (h,)}
        if i >= c["first_k_dense_replace"]:
            shapes[f"{layer}.mlp.gate.weight"] = (c["num_experts"], h)
            for e in range(c["num_experts"]):
                shapes |= _mlp(f"{layer}.mlp.experts.{e}", h, c["moe_intermediate_size"])
            shapes |= _mlp(f"{layer}.mlp.shared_experts", h, c["moe_intermediate_size"] * c["num_shared_experts"])
        else:
            shapes |= _mlp(f"{layer}.mlp", h, c["intermediate_size"])
    return shapes


def build(model: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random checkpoint of the published ``model`` ("llada_moe" or "llada2_moe") at ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, shapes = (llada_moe_config(**overrides), llada_moe_shapes) if model == "llada_moe" else \
        (llada2_config(**overrides), llada2_shapes)
    if dtype != torch.float32:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for source in (FIXTURES / model).glob("*.py"):
        shutil.copyfile(source, path / source.name)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tensors = _random(shapes(config), seed, dtype)
    if model == "llada2_moe":  # the router's expert bias is a persistent buffer, zero in a fresh model
        for i in range(config["first_k_dense_replace"], config["num_hidden_layers"]):
            tensors[f"model.layers.{i}.mlp.gate.expert_bias"] = 0.01 * torch.arange(config["num_experts"],
                                                                                    dtype=dtype)
    save_sharded(tensors, path)
    save_id_tokenizer(path, config["vocab_size"], MASK)
    return path
