"""benchmarks/train_reference.py's architectures: the shipped Gemma-3 layout is unchanged, and ``--arch llama``
builds LLaDA's block layout from a native transformers class that is a masked DLM under eager attention."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sink_modifier import families
from sink_modifier.families.masked import MaskedDiffusion, attends_bidirectionally

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import train_reference
finally:
    sys.path.pop(0)


def test_gemma3_default_is_the_shipped_config():
    model = train_reference.build_model("dlm", "gemma3")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 5_774_336  # docs/reference-models.md
    assert train_reference.out_name("dlm", "gemma3") == "dlm" and train_reference.out_name("ar", "gemma3") == "ar"


def test_llama_arch_is_native_bidirectional_and_the_same_size(tmp_path):
    torch.manual_seed(0)
    model = train_reference.build_model("dlm", "llama")
    assert type(model).__module__.startswith("transformers.")  # no remote code
    names = [name for name, _ in model.named_modules()]
    assert not any(name.endswith(("q_norm", "k_norm", "post_feedforward_layernorm")) for name in names)
    assert model.config.hidden_act == "silu" and model.config.tie_word_embeddings
    gemma = sum(p.numel() for p in train_reference.build_model("dlm", "gemma3").parameters())
    params = sum(p.numel() for p in model.parameters())
    assert params == 5_770_496 and abs(params - gemma) / gemma < 1e-3  # only the QK-norm/post-norm weights
    model.save_pretrained(tmp_path)
    loaded = train_reference.load_reference(tmp_path)  # AutoModelForMaskedLM, no trust_remote_code
    assert type(loaded).__name__ == "EuroBertForMaskedLM"
    assert attends_bidirectionally(loaded)
    family = families.resolve(loaded)
    assert isinstance(family.noise, MaskedDiffusion) and family.noise.mask_token_id == train_reference.MASK_ID
    assert train_reference.out_name("dlm", "llama") == "dlm-llama"
    with pytest.raises(SystemExit, match="only a masked DLM"):
        train_reference.build_model("ar", "llama")
