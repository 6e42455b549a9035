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
from tests.published import LOAD_SAVED, run_fresh
from tests.published_moe import SKIP_REASON, build, requires_published_moe_code

pytestmark = requires_published_moe_code

# A new interpreter: load, compare with the saved tensors and with a fresh instance of the checkpoint's own class
# (rotary frequencies set by hand to 1 / theta^(2i/d) over the rotated part of each head).
LOAD_AND_COMPARE = LOAD_SAVED + r"""
import transformers.modeling_rope_utils as rope
from transformers.utils import import_utils
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_llada2_built_for_eager_attention_is_refused(tmp_path):
    path = build("llada2_moe", tmp_path / "llada2")
    model = load_model(path, trust_remote_code=True, dtype="float32", attn_implementation="eager")
    with pytest.raises(UserError, match="attn_implementation='sdpa'"):
        families.resolve(model)


def test_skip_reason_names_the_missing_folder():
    assert "published-dlm-code" in SKIP_REASON


@pytest.fixture(scope="module")
def llada2_path(tmp_path_factory):
    return build("llada2_moe", tmp_path_factory.mktemp("llada2") / "llada2_moe")


SAMPLER = dict(steps=4, blocks=2, prompt_fraction=0.5, temperature=0.0, seed=1)


@torch.no_grad()
def test_llada2_sampler_states_are_its_generate_steps_with_block_causal_attention(llada2_path):
    model = load_model(llada2_path, trust_remote_code=True, dtype="float32")
    family = families.resolve(model)
    tokens = torch.arange(5, 29)
    first = family.noise.sampler_states(model, tokens, **SAMPLER)
    again = family.noise.sampler_states(model, tokens, **SAMPLER)
    assert [s.length for s in first] == [18, 18, 24, 24]  # prompt 12, blocks of 6, 2 steps per block
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again, strict=True))
    assert [s.noise_level for s in first] == [1.0, 0.75, 0.5, 0.25]
    assert all(torch.equal(s.input_ids[:12], tokens[:12]) for s in first)
    # what the step computed: generate()'s own forward equals the calibration batch's (its block-causal mask)
    logits = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out))
    try:
        family.noise.sampler_states(model, tokens, **SAMPLER)
    finally:
        handle.remove()
    for state, batch, seen in zip(first, family.calibration.calibration_batches(first), logits, strict=True):
        assert batch["attention_mask"].shape == (1, 1, state.length, state.length)
        torch.testing.assert_close(model(**batch).logits, seen, rtol=0, atol=1e-6)
    bidirectional = model(input_ids=first[0].input_ids[None, :18]).logits
    assert not torch.allclose(bidirectional, logits[0], atol=1e-4), "the first blocks must not see the last"


@torch.no_grad()
def test_llada2_sampler_masses_are_the_attention_it_computes(llada2_path):
    """The probe's key masses over generate()'s steps equal the column sums of the attention weights the
    published attention returns (eager function, the same block-causal mask)."""
    from sink_modifier import compat
    from sink_modifier.calibration.probe import AttentionProbe

    model = load_model(llada2_path, trust_remote_code=True, dtype="float32")
    family = families.resolve(model)
    tokens = torch.arange(5, 29)
    with AttentionProbe(model) as probe:
        states, masses = family.attention.measure_while_sampling(
            model, probe, lambda: family.noise.sampler_states(model, tokens, **SAMPLER))
    masses = masses[None]
    assert masses.shape == (4, 2, 24)
    compat.use_attention_implementation(model.config, "eager")
    weights = []
    handles = [layer.attention.register_forward_hook(lambda m, a, out: weights.append(out[1]))
               for layer in model.model.layers]
    try:
        for index, (state, batch) in enumerate(zip(states, family.calibration.calibration_batches(states),
                                                   strict=True)):
            weights.clear()
            model.model(**batch)
            expected = torch.stack([w[0].sum(dim=(0, 1)) for w in weights])  # [layers, keys]
            torch.testing.assert_close(masses[index, :, : state.length], expected, rtol=1e-5, atol=1e-5)
            assert masses[index, :, state.length:].abs().sum() == 0
    finally:
        for handle in handles:
            handle.remove()
        compat.use_attention_implementation(model.config, "sdpa")


@torch.no_grad()
def test_llada_moe_masses_are_the_attention_it_computes(tmp_path):
    """The probe (which wraps the SDPA call LLaDA-MoE's attention makes) gives the column sums of the attention
    weights the published eager attention returns for the same tokens."""
    from sink_modifier.calibration.probe import AttentionProbe

    path = build("llada_moe", tmp_path / "llada_moe")
    model = load_model(path, trust_remote_code=True, dtype="float32")
    family = families.resolve(model)
    (state,) = family.noise.forward_noise_states(torch.arange(5, 29), levels=1, eps=0.0, seed=0)
    with AttentionProbe(model) as probe:  # as the trajectory phase finds them: the "*Attention" modules
        masses = family.attention.measure(model, probe, [state], 1, torch.device("cpu"))[None][0]
    eager = load_model(path, trust_remote_code=True, dtype="float32", attn_implementation="eager")
    weights = eager.model(input_ids=state.input_ids[None], output_attentions=True).attentions
    expected = torch.stack([w[0].sum(dim=(0, 1)) for w in weights])
    torch.testing.assert_close(masses, expected, rtol=1e-5, atol=1e-5)
