"""LLaDA-MoE and LLaDA2.x from their published code: loaded in a fresh interpreter (weights and logits exact),
driven by their own families, and every expert calibrated on every token with the block's result unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from llmcompressor.modeling.moe.context import moe_calibration_context

from sink_modifier import families, load_model
from sink_modifier.errors import UserError
from sink_modifier.families.moe import RoutingLimits
from tests.published import run_fresh
from tests.published_moe import SKIP_REASON, build, requires_published_moe_code

pytestmark = requires_published_moe_code

# A new interpreter: load, compare with the saved tensors and with a fresh instance of the checkpoint's own class
# (rotary frequencies set by hand to 1 / theta^(2i/d) over the rotated part of each head).
LOAD_AND_COMPARE = r"""
import json, sys
import torch
from safetensors.torch import load_file
from pathlib import Path
import transformers.modeling_rope_utils as rope
from transformers.utils import import_utils

import sink_modifier

path = Path(sys.argv[1])
model = sink_modifier.load_model(path, trust_remote_code=True, dtype="float32")
saved = {}
for shard in sorted(path.glob("*.safetensors")):
    saved.update(load_file(shard))
state = model.state_dict()
exact = sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in saved)
config = model.config
reference = type(model)(config)
reference.load_state_dict(saved, strict=True)
head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
dim = int(head_dim * config.partial_rotary_factor)
intended = 1.0 / float(config.rope_theta) ** (torch.arange(0, dim, 2).float() / dim)
for module in reference.modules():
    if "inv_freq" in module._buffers:
        module.inv_freq.copy_(intended)
loaded_rotary = [m.inv_freq for m in model.modules() if "inv_freq" in m._buffers]
reference.eval()
tokens = torch.arange(5, 37)[None]
with torch.no_grad():
    got, want = model(tokens).logits, reference(tokens, use_cache=False).logits
print(json.dumps({"exact": exact, "logits_difference": float((got - want).abs().max()),
                  "logits_scale": float(want.abs().max()),
                  "rotary": all(torch.allclose(f, intended) for f in loaded_rotary) and bool(loaded_rotary),
                  "library_untouched": "default" not in rope.ROPE_INIT_FUNCTIONS
                                       and not hasattr(import_utils, "is_torch_fx_available"),
                  "class": type(model).__name__}))
"""


@pytest.fixture(scope="module", params=["llada_moe", "llada2_moe"])
def published_moe(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp("published_moe") / request.param)


def test_fresh_load_gives_the_saved_weights_and_the_published_forward(published_moe):
    name, path = published_moe
    result = run_fresh(LOAD_AND_COMPARE, str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["exact"], "weights must equal the saved tensors bit for bit"
    assert report["rotary"], "the rotary frequencies must be the published RoPE's"
    # fp32 logits of the published module's own forward: equal up to the last bits that per-expert matmuls on a
    # handful of rows round differently depending on where the weights sit in memory (mmap'd vs fresh)
    assert report["logits_difference"] <= 1e-6 * max(1.0, report["logits_scale"])
    assert report["library_untouched"], "transformers' own tables and modules must be left as they were"
    assert report["class"] == {"llada_moe": "LLaDAMoEModelLM", "llada2_moe": "LLaDA2MoeModelLM"}[name]


def test_each_is_driven_by_its_own_family(published_moe):
    name, path = published_moe
    model = load_model(path, trust_remote_code=True, dtype="float32")
    family = families.resolve(model)
    assert family.name == {"llada_moe": "llada_moe", "llada2_moe": "llada2"}[name]
    assert family.noise.mask_token_id == 250  # the tokenizer's; neither config has one
    limits = family.experts.routing_limits(model)
    expected = RoutingLimits(8, 2) if name == "llada_moe" else RoutingLimits(16, 2, 4, 2, min_per_group=2)
    assert limits == expected
    with pytest.raises(UserError, match="router"):
        family.checkpoint.check_scope(["model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.gate"])


@torch.no_grad()
def test_every_expert_sees_every_token_and_the_block_output_is_unchanged(published_moe):
    name, path = published_moe
    model = load_model(path, trust_remote_code=True, dtype="float32")
    tokens = torch.arange(5, 29)[None]
    plain = model(tokens).logits
    family = families.resolve(model)
    family.checkpoint.prepare(model)
    rows: dict[str, int] = {}
    handles = [module.register_forward_hook(lambda m, args, out, n=n: rows.__setitem__(n, args[0].shape[0]))
               for n, module in model.named_modules() if ".experts." in n and n.endswith("gate_proj")]
    try:
        unchanged = model(tokens).logits  # installed hooks are inert outside llm-compressor's calibration
        with moe_calibration_context():
            calibrated = model(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(unchanged, plain)
    torch.testing.assert_close(calibrated, plain, rtol=1e-5, atol=1e-6)
    assert len(rows) == (2 * 8 if name == "llada_moe" else 16)  # LLaDA2's first layer is dense
    assert set(rows.values()) == {tokens.numel()}, "every expert computes every token of the batch"


def test_llada2_built_for_eager_attention_is_refused(tmp_path):
    path = build("llada2_moe", tmp_path / "llada2")
    model = load_model(path, trust_remote_code=True, dtype="float32", attn_implementation="eager")
    with pytest.raises(UserError, match="attn_implementation='sdpa'"):
        families.resolve(model)


def test_skip_reason_names_the_missing_folder():
    assert "published-dlm-code" in SKIP_REASON
