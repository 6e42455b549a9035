"""A tiny stand-in for LLaDA-8B's remote code (``modeling_llada.py``), for tests that cannot download it.

What it reproduces, because the pruner depends on it:
* module names: ``model.transformer.{wte, blocks.N, ln_f, ff_out}``, blocks of class ``LLaDALlamaBlock`` with
  Linears ``q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out``; ``model.transformer.ff_out`` is the
  LM head, so an ignore pattern like ``re:.*ff_out`` would also hit every block's MLP output;
* attention computed inline in the block (no ``*Attention`` module) through
  ``torch.nn.functional.scaled_dot_product_attention`` looked up at call time, GQA by repeating k/v heads,
  bidirectional (``is_causal=False``), rotary q/k;
* logits not shifted (position i predicts the token at position i);
* ``_tied_weights_keys`` as a list (transformers 4.x style), so ``save_pretrained`` under transformers 5.x
  fails in ``_get_tied_weight_keys`` with ``AttributeError: 'list' object has no attribute 'keys'``;
* ``LLaDAModelLM.__init__`` never calls ``post_init()``, so under transformers 5 ``from_pretrained`` fails with
  ``AttributeError: 'LLaDAModelLM' object has no attribute 'all_tied_weights_keys'``;
* parameters are created with ``device=config.init_device`` (LLaDA's ``init_device``; the copies that pass it
  through unchanged fail to build on a machine without CUDA when it says ``"cuda"``).

This file is self-contained on purpose: the builders in ``tests/layouts/__init__.py`` save it next to the
weights as the checkpoint's remote code (``auto_map``), so tests load it with ``trust_remote_code=True``
exactly like the published checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast


class LLaDAConfig(PretrainedConfig):
    """LLaDA's OLMo-style field names (``d_model``, ``n_heads``, ...); ``use_cache`` is explicit because
    transformers 5 configs no longer carry it and LLaDA's forward reads it."""

    model_type = "llada"

    def __init__(
        self, d_model: int = 128, n_heads: int = 4, n_kv_heads: int = 2, n_layers: int = 2,
        mlp_hidden_size: int = 256, vocab_size: int = 128, mask_token_id: int = 126, rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5, use_cache: bool = False, init_device: str | None = None, **kwargs,
    ) -> None:
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_hidden_size, self.vocab_size, self.mask_token_id = mlp_hidden_size, vocab_size, mask_token_id
        self.rope_theta, self.rms_norm_eps, self.use_cache = rope_theta, rms_norm_eps, use_cache
        self.init_device = init_device
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("eos_token_id", 1)
        super().__init__(**kwargs)


class RMSLayerNorm(nn.Module):
    """LLaDA's RMS norm: computed in float32, scaled by a learned weight, no bias."""

    def __init__(self, size: int, eps: float, device: str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, device=device))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary embeddings computed on the fly (LLaDA keeps them in a non-persistent cache, not in weights)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        seq = q.shape[-2]
        dims = torch.arange(0, self.head_dim, 2, device=q.device).float()
        inv_freq = 1.0 / (self.theta ** (dims / self.head_dim))
        freqs = torch.outer(torch.arange(seq, device=q.device).float(), inv_freq)
        pos = torch.cat((freqs, freqs), dim=-1)
        sin, cos = pos.sin()[None, None], pos.cos()[None, None]
        q_ = (q.float() * cos + self._rotate_half(q.float()) * sin).to(q.dtype)
        k_ = (k.float() * cos + self._rotate_half(k.float()) * sin).to(k.dtype)
        return q_, k_


class LLaDALlamaBlock(nn.Module):
    """Pre-norm block: attention inline (SDPA), then SwiGLU ``ff_out(act(ff_proj(x)) * up_proj(x))``."""

    def __init__(self, layer_id: int, config: LLaDAConfig) -> None:
        super().__init__()
        self.layer_id, self.config = layer_id, config
        head_dim, device = config.d_model // config.n_heads, config.init_device
        self.attn_norm = RMSLayerNorm(config.d_model, config.rms_norm_eps, device)
        self.ff_norm = RMSLayerNorm(config.d_model, config.rms_norm_eps, device)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False, device=device)
        self.k_proj = nn.Linear(config.d_model, head_dim * config.n_kv_heads, bias=False, device=device)
        self.v_proj = nn.Linear(config.d_model, head_dim * config.n_kv_heads, bias=False, device=device)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False, device=device)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False, device=device)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False, device=device)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False, device=device)
        self.act = nn.SiLU()
        self.rotary_emb = RotaryEmbedding(head_dim, config.rope_theta)

    def _scaled_dot_product_attention(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None
    ) -> Tensor:
        """As LLaDA: repeat k/v heads for GQA, then call torch's SDPA (``F`` resolved at call time)."""
        if q.size(1) != k.size(1):
            groups = q.size(1) // k.size(1)
            k = k.repeat_interleave(groups, dim=1, output_size=q.size(1))
            v = v.repeat_interleave(groups, dim=1, output_size=q.size(1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, attention_bias: Tensor | None = None
    ) -> Tensor:
        bsz, seq, width = q.shape
        head_dim = width // self.config.n_heads
        q = q.view(bsz, seq, self.config.n_heads, head_dim).transpose(1, 2)
        k = k.view(bsz, seq, self.config.n_kv_heads, head_dim).transpose(1, 2)
        v = v.view(bsz, seq, self.config.n_kv_heads, head_dim).transpose(1, 2)
        q, k = self.rotary_emb(q, k)
        att = self._scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        return self.attn_out(att.transpose(1, 2).contiguous().view(bsz, seq, width))

    def forward(
        self, x: Tensor, attention_bias: Tensor | None = None, layer_past=None, use_cache: bool = False
    ) -> tuple[Tensor, None]:
        """Returns ``(hidden, cache)`` like LLaDA; this stand-in never caches."""
        h = self.attn_norm(x)
        x = x + self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), attention_bias)
        h = self.ff_norm(x)
        x = x + self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))
        return x, None


class LLaDAModel(nn.Module):
    """The inner model: a plain ``nn.Module`` holding ``transformer`` (a ModuleDict), as in LLaDA."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        device = config.init_device
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model, device=device),
                blocks=nn.ModuleList(LLaDALlamaBlock(i, config) for i in range(config.n_layers)),
                ln_f=RMSLayerNorm(config.d_model, config.rms_norm_eps, device),
                ff_out=nn.Linear(config.d_model, config.vocab_size, bias=False, device=device),
            )
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.transformer.wte(input_ids)
        # Padding mask -> bool key mask (B, 1, 1, T), broadcast over heads and queries; no causal mask.
        bias = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        for block in self.transformer.blocks:
            x, _ = block(x, attention_bias=bias)
        return self.transformer.ff_out(self.transformer.ln_f(x))


class LLaDAModelLM(PreTrainedModel):
    """The HF wrapper: ``.model`` is :class:`LLaDAModel`; logits are returned unshifted."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    # transformers 4.x style list: transformers 5 expects a {target: source} dict and save_pretrained fails.
    _tied_weights_keys = ["model.transformer.ff_out.weight"]

    def __init__(self, config: LLaDAConfig, model: LLaDAModel | None = None, init_params: bool = False) -> None:
        super().__init__(config)
        self.model = model if model is not None else LLaDAModel(config)
        # As published: no self.post_init() here (transformers 4.x did not need it).

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSLayerNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.transformer.ff_out

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs
    ) -> CausalLMOutputWithPast:
        return CausalLMOutputWithPast(logits=self.model(input_ids, attention_mask=attention_mask))


def register_llada() -> None:
    """Register the stand-in with the Auto classes in-process (no remote code); safe to call repeatedly."""
    AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
    AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
    AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
