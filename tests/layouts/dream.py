"""A tiny stand-in for Dream-7B's remote code (``modeling_dream.py``, Qwen2.5-based), for offline tests.

What it reproduces, because the pruner depends on it:
* module names: ``model.embed_tokens``, ``model.layers.N`` of class ``DreamDecoderLayer`` with
  ``self_attn.{q,k,v,o}_proj`` (q/k/v with bias, o without), ``mlp.{gate,up,down}_proj``,
  ``input_layernorm``, ``post_attention_layernorm``; ``model.norm``; ``lm_head``;
* attention in ``DreamSdpaAttention`` (a module whose class name ends in "Attention") through
  ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=False)`` after ``repeat_kv``;
* ``forward`` returns ``MaskedLMOutput`` with logits NOT shifted: like the real model, position i carries the
  prediction for token i+1 (Qwen's AR initialisation), and Dream's sampler realigns them with
  :func:`shift_logits`. A caller that reads Dream's logits directly must shift them itself;
* ``_tied_weights_keys = ["lm_head.weight"]``, a list as in Dream's code (Qwen2 of transformers 4.46), so
  ``save_pretrained`` under transformers 5.x fails like LLaDA's (``'list' object has no attribute 'keys'``);
* ``rotary_emb.inv_freq`` is a non-persistent buffer computed in ``__init__`` and ``_init_weights`` does not
  know it: transformers 5 builds on the meta device and leaves it uninitialised after ``from_pretrained``;
* the checkpoint's ``auto_map`` names only ``AutoModel`` (``DreamModel``), not ``AutoModelForCausalLM``.

Self-contained on purpose: the builders in ``tests/layouts/__init__.py`` save this file as the checkpoint's
remote code, so tests load it with ``trust_remote_code=True`` like the published checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput

RoPE = tuple[Tensor, Tensor]


class DreamConfig(PretrainedConfig):
    """Qwen2-style field names, Dream's mask token (126 here; 151666 in Dream-7B), untied embeddings."""

    model_type = "Dream"

    def __init__(
        self, hidden_size: int = 128, num_attention_heads: int = 4, num_key_value_heads: int = 2,
        num_hidden_layers: int = 2, intermediate_size: int = 256, vocab_size: int = 128, mask_token_id: int = 126,
        rope_theta: float = 1000000.0, rms_norm_eps: float = 1e-6, tie_word_embeddings: bool = False, **kwargs,
    ) -> None:
        self.hidden_size, self.num_attention_heads = hidden_size, num_attention_heads
        self.num_key_value_heads, self.num_hidden_layers = num_key_value_heads, num_hidden_layers
        self.intermediate_size, self.vocab_size, self.mask_token_id = intermediate_size, vocab_size, mask_token_id
        self.rope_theta, self.rms_norm_eps = rope_theta, rms_norm_eps
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("eos_token_id", 1)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def shift_logits(logits: Tensor) -> Tensor:
    """Dream's sampler step: realign next-token logits so that position i predicts token i."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


class DreamRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DreamRotaryEmbedding(nn.Module):
    """Computes (cos, sin) once per forward in the base model, passed down to every layer (Qwen2 style)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DreamSdpaAttention(nn.Module):
    """Bidirectional GQA attention; k/v heads repeated (``repeat_kv``) before torch's SDPA."""

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None, position_embeddings: RoPE) -> Tensor:
        bsz, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, seq, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DreamSdpaAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_embeddings: RoPE | None = None
    ) -> tuple[Tensor]:
        h = self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_embeddings)
        hidden_states = hidden_states + h
        return (hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)),)


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DreamRMSNorm):
            init.ones_(module.weight)


class DreamBaseModel(DreamPreTrainedModel):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.post_init()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=x.device)[None].expand(input_ids.shape[0], -1)
        if attention_mask is not None and attention_mask.dim() == 2:
            # Dream's generate() builds this 4-D bool mask (query AND key valid); padded query rows are all False.
            valid = attention_mask.bool()
            attention_mask = valid[:, None, None, :] & valid[:, None, :, None]
        position_embeddings = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask, position_embeddings=position_embeddings)[0]
        return self.norm(x)


class DreamModel(DreamPreTrainedModel):
    """The HF entry point (Dream's ``auto_map`` maps ``AutoModel`` to it)."""

    _tied_weights_keys = ["lm_head.weight"]  # transformers 4.x list, as in Dream's code

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **kwargs
    ) -> MaskedLMOutput:
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return MaskedLMOutput(logits=self.lm_head(hidden))


def register_dream() -> None:
    """Register the stand-in with the Auto classes in-process (no remote code); safe to call repeatedly."""
    AutoConfig.register(DreamConfig.model_type, DreamConfig, exist_ok=True)
    AutoModel.register(DreamConfig, DreamModel, exist_ok=True)
    AutoModelForCausalLM.register(DreamConfig, DreamModel, exist_ok=True)
