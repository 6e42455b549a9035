"""Remote-code masked DLMs (LLaDA and Dream layouts): probed through SDPA, pruned, saved, reloaded."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

from sink_modifier import SinkAwarePruningModifier
from tests.layouts.dream import build_tiny_dream
from tests.layouts.llada import LLaDAModelLM, build_tiny_llada

LAYOUTS = {
    "llada": (build_tiny_llada, "LLaDALlamaBlock", "model.transformer.ff_out.weight"),
    "dream": (build_tiny_dream, "DreamDecoderLayer", "lm_head.weight"),
}


def token_dataset(num=6, length=24, seed=0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(1, 120, (num, length), generator=generator).tolist()})


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_prune_save_reload(tmp_path, name, pipeline):
    build, block, head = LAYOUTS[name]
    path = build(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    head_before = dict(model.named_parameters())[head].detach().clone()
    out = tmp_path / "out"
    oneshot(model=model, dataset=token_dataset(), pipeline=pipeline, sequential_targets=[block],
            recipe=[SinkAwarePruningModifier(sparsity=0.5, mask_structure="2:4", noise_levels=4)],
            output_dir=str(out))  # LLaDA's list-style _tied_weights_keys would make this save fail

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    params = dict(reloaded.named_parameters())
    assert torch.equal(params[head], head_before), "the LM head is never pruned, and survives saving"
    pruned = [n for n in params if (".blocks." in n or ".layers." in n) and n.endswith("proj.weight")
              or n.endswith(("attn_out.weight", "ff_out.weight")) and ".blocks." in n]
    assert pruned
    for n in pruned:
        groups = (params[n].reshape(params[n].shape[0], -1, 4) == 0).sum(-1)
        assert bool((groups >= 2).all()), n
    report = json.loads((out / "sink_report.json").read_text())
    assert report["adapter"] == "masked"
    assert len(report["layers"]) == 2
    if name == "llada":
        assert isinstance(LLaDAModelLM._tied_weights_keys, list)  # the class is left as published


def test_masked_sampler_is_refused_for_dream(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_dream(tmp_path / "dream"), dtype=torch.float32)
    from sink_modifier.adapters import AdapterError, adapter_for

    adapter = adapter_for(model)
    with pytest.raises(AdapterError, match="shifts logits"):
        adapter.sampler_states(model, torch.arange(1, 21), steps=4, blocks=1, prompt_fraction=0.5,
                               temperature=0.0, seed=0)
