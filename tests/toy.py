"""Tiny models built from configs, for tests, benchmarks and the offline demo.

Nothing can be downloaded here, so the suite builds its models: a bidirectional Gemma-3 masked diffusion LM
(LLaDA's recipe in native transformers: full bidirectional attention plus a ``[MASK]`` token) and its
autoregressive twin (same config, causal attention). Both come with a character-level tokenizer that knows the
mask token, saved next to the weights so that ``from_pretrained`` on the directory works like a hub checkpoint.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[EOS]", "[BOS]", "[UNK]", "[MASK]"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a mask token; small, offline and deterministic."""
    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        eos_token="[EOS]",
        bos_token="[BOS]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )


def toy_config(
    *,
    bidirectional: bool = True,
    vocab_size: int = 128,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    sliding_window: int = 512,
) -> Gemma3TextConfig:
    """Gemma-3 text config; hidden and intermediate sizes default to multiples of 128 so that W4A16
    (group size 128) applies to every Linear."""
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=2048,
        sliding_window=sliding_window,
        layer_types=["full_attention"] * num_hidden_layers,
        use_bidirectional_attention=bidirectional,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
    )
    if bidirectional:
        config.mask_token_id = MASK_ID
    return config


def build_toy_model(
    output_dir: str | Path, *, bidirectional: bool = True, seed: int = 0, **config_kwargs
) -> Path:
    """Build a random-weight toy model with its tokenizer and save both to ``output_dir``."""
    tokenizer = build_char_tokenizer()
    config = toy_config(bidirectional=bidirectional, vocab_size=len(tokenizer), **config_kwargs)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def diffusion_gemma_config(*, canvas_length: int = 8, num_experts: int = 4, vocab_size: int = 512):
    """The smallest text-only DiffusionGemma that transformers 5.17 builds.

    ``vision_config=None`` crashes in 5.17, so a one-layer vision tower comes along; it is never run and
    never pruned. Hidden sizes are multiples of 16 so that every Linear and expert fits 2:4 and FP8.
    """
    from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig

    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, max_position_embeddings=512, sliding_window=16,
        num_experts=num_experts, top_k_experts=2, moe_intermediate_size=32,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=PAD_ID, eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
                  position_embedding_size=64)
    return DiffusionGemmaConfig(
        text_config=text.to_dict(), vision_config=vision, canvas_length=canvas_length,
        boi_token_id=vocab_size - 3, eoi_token_id=vocab_size - 2, image_token_id=vocab_size - 1,
    )


def build_tiny_diffusion_gemma(output_dir: str | Path, *, seed: int = 0, **config_kwargs) -> Path:
    """A random-weight tiny DiffusionGemma saved to ``output_dir`` (text only; ids are the tokens)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(diffusion_gemma_config(**config_kwargs))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    # The model's own processor (Gemma4Processor) needs vision packages; the character tokenizer's ids are
    # in the vocabulary and its special ids match the config.
    build_char_tokenizer().save_pretrained(output_dir)
    return output_dir
