"""Tiny random checkpoints of the published LLaDA and Dream code, laid out like their Hub repos.

The remote code itself is never part of this repository: it is read from ``../shared/fixtures/published-dlm-code``
(unmodified, as users download it) and copied next to the weights at test time, with the published
``config.json`` (widths shrunk, every other key and the ``auto_map`` kept) and sharded safetensors. Tests that use
it skip with :data:`SKIP_REASON` where the folder is absent (a clone outside this workplace).

The weights are written by name and shape from here, not by the published classes (which do not build under
transformers 5 without the repairs under test), so "the loader gives the saved tensors" is checked against an
independent source.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "published-dlm-code"
SKIP_REASON = (f"the published LLaDA / Dream code is not at {FIXTURES} (a clone outside the project's "
               "workplace); these tests run the real remote code only")
requires_published_code = pytest.mark.skipif(
    not (FIXTURES / "llada").is_dir() or not (FIXTURES / "dream").is_dir(), reason=SKIP_REASON)

# Widths are the smallest that W4A16's group size (128) accepts.
LLADA_VOCAB, LLADA_MASK = 256, 250  # the published 126464 / 126336, shrunk (the tokenizer is not in the fixtures)
# Dream keeps its published vocabulary so that the Hub's own tokenizer (in the fixtures) drives it.
DREAM_VOCAB, DREAM_MASK = 152064, 151666


def _config(folder: str, overrides: dict) -> dict:
    config = json.loads((FIXTURES / folder / "config.json").read_text())
    config.update(overrides)
    config.pop("_name_or_path", None)
    return config


def llada_config(**overrides) -> dict:
    if "vocab_size" in overrides:
        overrides.setdefault("embedding_size", overrides["vocab_size"])
    return _config("llada", dict(
        d_model=128, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=256, embedding_size=LLADA_VOCAB,
        vocab_size=LLADA_VOCAB, mask_token_id=LLADA_MASK, eos_token_id=1, pad_token_id=1, max_sequence_length=256,
    ) | overrides)


def dream_config(**overrides) -> dict:
    return _config("dream", dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        max_position_embeddings=512, max_window_layers=2, torch_dtype="float32",
    ) | overrides)


def llada_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    d, hidden, kv = config["d_model"], config["mlp_hidden_size"], config["d_model"] // config["n_heads"]
    kv *= config["n_kv_heads"]
    shapes = {"model.transformer.wte.weight": (config["embedding_size"], d), "model.transformer.ln_f.weight": (d,),
              "model.transformer.ff_out.weight": (config["embedding_size"], d)}
    for i in range(config["n_layers"]):
        block = f"model.transformer.blocks.{i}"
        shapes.update({
            f"{block}.attn_norm.weight": (d,), f"{block}.ff_norm.weight": (d,), f"{block}.q_proj.weight": (d, d),
            f"{block}.k_proj.weight": (kv, d), f"{block}.v_proj.weight": (kv, d),
            f"{block}.attn_out.weight": (d, d),
            f"{block}.ff_proj.weight": (hidden, d), f"{block}.up_proj.weight": (hidden, d),
            f"{block}.ff_out.weight": (d, hidden),
        })
    return shapes


def dream_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    d, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (d,), f"{layer}.post_attention_layernorm.weight": (d,),
            f"{layer}.self_attn.q_proj.weight": (d, d), f"{layer}.self_attn.q_proj.bias": (d,),
            f"{layer}.self_attn.k_proj.weight": (kv, d), f"{layer}.self_attn.k_proj.bias": (kv,),
            f"{layer}.self_attn.v_proj.weight": (kv, d), f"{layer}.self_attn.v_proj.bias": (kv,),
            f"{layer}.self_attn.o_proj.weight": (d, d), f"{layer}.mlp.gate_proj.weight": (inner, d),
            f"{layer}.mlp.up_proj.weight": (inner, d), f"{layer}.mlp.down_proj.weight": (d, inner),
        })
    return shapes


def _random(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Norm weights near 1, everything else N(0, 0.1^2) (std 0.02 at widths over 1024, as trained models)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight"):
            tensors[name] = (1 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
        else:
            std = 0.02 if max(shape) > 1024 and min(shape) > 1024 else 0.1
            tensors[name] = (std * torch.randn(shape, generator=generator)).to(dtype)
    return tensors


def save_sharded(tensors: dict[str, torch.Tensor], path: Path, shards: int = 2) -> None:
    """safetensors shards plus ``model.safetensors.index.json``, as the Hub repos store their weights."""
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, file in enumerate(files):
        part = names[i::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_id_tokenizer(path: Path, vocab_size: int, mask_token_id: int) -> None:
    """A word-level tokenizer whose tokens are ``t<id>`` plus specials (LLaDA's is not in the fixtures)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {0: "[PAD]", 1: "[EOS]", 2: "[BOS]", 3: "[UNK]", mask_token_id: "[MASK]"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]",
                            unk_token="[UNK]", mask_token="[MASK]").save_pretrained(path)


def build(model: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random checkpoint of the published ``model`` ("llada" or "dream") at ``path``: tiny by default,
    ``overrides`` set published config keys (widths, depth, vocabulary). Dream at its published vocabulary
    keeps the Hub's tokenizer; any other vocabulary gets a word-level ``t<id>`` tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = FIXTURES / model
    if model == "llada":
        config, shapes = llada_config(**overrides), llada_shapes
        copied = ["configuration_llada.py", "modeling_llada.py", "generation_config.json"]
    else:
        config, shapes = dream_config(**overrides), dream_shapes
        code = ["configuration_dream.py", "modeling_dream.py", "generation_utils.py", "generation_config.json"]
        copied = [f.name for f in source.iterdir() if f.name != "config.json"] \
            if config["vocab_size"] == DREAM_VOCAB else code
    if model == "dream" and config["vocab_size"] != DREAM_VOCAB:  # the word-level tokenizer's specials
        config.update({k: v for k, v in (("bos_token_id", 2), ("eos_token_id", 1), ("pad_token_id", 0))
                       if k not in overrides})
    if dtype != torch.float32:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if not (model == "dream" and config["vocab_size"] == DREAM_VOCAB):
        save_id_tokenizer(path, config["vocab_size"], config["mask_token_id"])
    for name in copied:
        shutil.copyfile(source / name, path / name)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_sharded(_random(shapes(config), seed, dtype), path)
    return path


def run_fresh(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter (nothing imported by this test process), this repository first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


#: The start of every fresh-interpreter load check (``run_fresh(LOAD_SAVED + rest, checkpoint, ...)``): ``model``
#: loaded by the package's loader from ``sys.argv[1]``, ``saved`` the checkpoint's tensors, ``exact`` whether the
#: loaded state equals them bit for bit.
LOAD_SAVED = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
import sink_modifier

path = Path(sys.argv[1])
model = sink_modifier.load_model(path, trust_remote_code=True, dtype="float32")
saved = {}
for shard in sorted(path.glob("*.safetensors")):
    saved.update(load_file(shard))
state = model.state_dict()
exact = sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in saved)
"""
