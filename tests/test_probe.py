"""Tests for the attention-mass probe: exactness against eager attention, and clean restore."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from sink_modifier.calibration.probe import AttentionProbe, AttentionProbeError, attention_key_mass

SEQ = 14
HEADS = 4


def _gemma3(bidirectional: bool) -> transformers.Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=bidirectional, attn_implementation="sdpa",
    )
    return transformers.Gemma3ForCausalLM(config).eval()


def _inputs(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, SEQ))
    if not padded:
        return ids, None
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, -3:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    return ids, mask


def _eager_masses(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    columns = []
    for probs in out.attentions:  # [B, H, Q, K]
        if mask is not None:
            probs = probs * mask[:, None, :, None]
        columns.append(probs.sum(dim=(1, 2)))
    return torch.stack(columns, dim=1)


def _naive_mass(q, k, mask=None, *, causal=False, softcap=None, scaling=None, query_mask=None):
    """Full-matrix reference: repeat keys per head, softmax, zero the fully masked rows."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        is_bool = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, -torch.inf) if is_bool else scores + mask.double()
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -torch.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if query_mask is not None:
        probs = probs * query_mask[:, None, :, None]
    return probs.sum(dim=(1, 2)).float()


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("route", ["auto", "sdpa"])
def test_gemma3_masses_match_eager(
    bidirectional: bool, padded: bool, chunk: int, route: str
) -> None:
    model = _gemma3(bidirectional)
    ids, mask = _inputs(padded)
    expected = _eager_masses(model, ids, mask)
    with AttentionProbe(model, route=route, query_chunk_size=chunk) as probe:
        assert probe.route == ("interface" if route == "auto" else "sdpa")
        assert probe.layer_names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        probe.query_mask = None if mask is None else mask.bool()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        masses = probe.pop_masses()
    assert masses.shape == (2, 2, SEQ) and masses.dtype == torch.float32
    torch.testing.assert_close(masses, expected, atol=1e-5, rtol=0)
    valid = torch.full((2,), SEQ) if mask is None else mask.sum(-1)
    torch.testing.assert_close(masses.sum(-1), (valid * HEADS).float()[:, None].expand(2, 2))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_interface_route_keeps_outputs_and_restores(bidirectional: bool) -> None:
    model = _gemma3(bidirectional)
    ids, mask = _inputs(padded=True)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    original_sdpa = F.scaled_dot_product_attention
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    with AttentionProbe(model) as probe:
        assert model.config._attn_implementation.startswith("sink_probe")
        with torch.no_grad():
            probed = model(input_ids=ids, attention_mask=mask).logits
        probe.pop_masses()
        with pytest.raises(AttentionProbeError, match="already installed"):
            probe.__enter__()
    assert torch.equal(probed, reference)
    assert all(c._attn_implementation == "sdpa" for c in configs.values())
    assert F.scaled_dot_product_attention is original_sdpa
    assert not [k for k in transformers.AttentionInterface._global_mapping if "sink_probe" in k]
    assert not [
        k for k in transformers.masking_utils.AttentionMaskInterface._global_mapping
        if "sink_probe" in k
    ]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_interface_route_restores_after_exception() -> None:
    model = _gemma3(False)
    with pytest.raises(ValueError, match="boom"), AttentionProbe(model):
        raise ValueError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_interface_route_rejects_unprobed_module() -> None:
    model = _gemma3(False)
    only_first = {"model.layers.0.self_attn": model.model.layers[0].self_attn}
    ids, _ = _inputs(padded=False)
    with AttentionProbe(model, attention_modules=only_first), pytest.raises(AttentionProbeError):
        model(input_ids=ids)
    assert model.config._attn_implementation == "sdpa"


def test_gemma2_softcap_matches_eager() -> None:
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=16, sliding_window=8,
        attn_logit_softcapping=2.0, attn_implementation="sdpa",
    )
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids, mask = _inputs(padded=True)
    expected = _eager_masses(model, ids, mask)
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        eager_logits = eager(input_ids=ids, attention_mask=mask).logits
    with AttentionProbe(model, query_chunk_size=4) as probe:
        probe.query_mask = mask.bool()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        masses = probe.pop_masses()
    torch.testing.assert_close(masses, expected, atol=1e-5, rtol=0)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], eager_logits[valid], atol=1e-5, rtol=0)


# -- route "sdpa": remote-code-style modules ------------------------------------------------------


class TinySdpaAttention(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, -1).transpose(1, 2)
        self.seen = (q.detach(), k.detach())
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
        )
        return x + self.o_proj(out.transpose(1, 2).flatten(2))


class TinyManualAttention(TinySdpaAttention):
    """Attention computed by hand, as flash/flex kernels would: invisible to the SDPA route."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)
        return x + self.o_proj((probs @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        x = self.self_attn(x, mask, causal)
        return x + self.mlp(x)


class TinyRemoteModel(nn.Module):
    def __init__(self, *attention_classes: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(cls()) for cls in attention_classes)

    def forward(self, x: torch.Tensor, mask=None, causal: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask, causal)
        return x


def _sdpa_masks() -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(3)
    bool_mask = torch.rand(2, 1, 9, 9, generator=gen) > 0.4
    bool_mask |= torch.eye(9, dtype=torch.bool)
    float_mask = torch.randn(1, HEADS, 9, 9, generator=gen)
    float_mask[..., 2] = -torch.inf
    return {"none": None, "bool": bool_mask, "float": float_mask}


@pytest.mark.parametrize(  # SDPA rejects attn_mask together with is_causal
    ("mask_kind", "causal"), [("none", False), ("none", True), ("bool", False), ("float", False)]
)
def test_sdpa_route_matches_hand_computation(mask_kind: str, causal: bool) -> None:
    mask = _sdpa_masks()[mask_kind]
    model = TinyRemoteModel(TinySdpaAttention, TinySdpaAttention).eval()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(x, mask, causal)
    original_sdpa = F.scaled_dot_product_attention
    with AttentionProbe(model, query_chunk_size=4) as probe:
        assert probe.route == "sdpa"
        assert probe.layer_names == ["layers.0.self_attn", "layers.1.self_attn"]
        with torch.no_grad():
            probed = model(x, mask, causal)
        masses = probe.pop_masses()
    assert torch.equal(probed, reference)
    expected = torch.stack(
        [_naive_mass(*block.self_attn.seen, mask, causal=causal) for block in model.layers], dim=1
    )
    torch.testing.assert_close(masses, expected, atol=1e-5, rtol=0)
    assert F.scaled_dot_product_attention is original_sdpa
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_sdpa_route_query_mask_excludes_rows() -> None:
    model = TinyRemoteModel(TinySdpaAttention).eval()
    x = torch.randn(2, 9, 32)
    query_mask = torch.ones(2, 9, dtype=torch.bool)
    query_mask[1, 6:] = False
    with AttentionProbe(model) as probe:
        probe.query_mask = query_mask
        with torch.no_grad():
            model(x, None, False)
        masses = probe.pop_masses()
    expected = _naive_mass(*model.layers[0].self_attn.seen, query_mask=query_mask)
    torch.testing.assert_close(masses[:, 0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(masses.sum(-1)[:, 0], torch.tensor([36.0, 24.0]))


def test_bypassed_layer_and_empty_pop_raise() -> None:
    model = TinyRemoteModel(TinySdpaAttention, TinyManualAttention).eval()
    x = torch.randn(1, 6, 32)
    with AttentionProbe(model) as probe:
        with pytest.raises(AttentionProbeError, match="no attention record"):
            probe.pop_masses()
        with torch.no_grad():
            model(x, None, False)
        with pytest.raises(AttentionProbeError, match=r"layers\.1\.self_attn.*bypassed") as err:
            probe.pop_masses()
        assert "layers.0" not in str(err.value)


def test_repeated_record_raises_and_records_clear() -> None:
    model = TinyRemoteModel(TinySdpaAttention).eval()
    x = torch.randn(1, 6, 32)
    with AttentionProbe(model) as probe, torch.no_grad():
        model(x, None, False)
        model(x, None, False)
        with pytest.raises(AttentionProbeError, match="more than once"):
            probe.pop_masses()
        model(x, None, False)
        assert probe.pop_masses().shape == (1, 1, 6)


@pytest.mark.parametrize("route", ["sdpa", "interface"])
def test_other_models_are_untouched_while_probing(route: str) -> None:
    """A second model (same classes) and a bare SDPA call run while a probe is installed: they give the same
    outputs as without it and leave no record; the probed model's own record is complete."""
    if route == "sdpa":
        probed, other = TinyRemoteModel(TinySdpaAttention).eval(), TinyRemoteModel(TinySdpaAttention).eval()
        x = torch.randn(1, 6, 32)
        run_probed, run_other = (lambda: probed(x, None, False)), (lambda: other(x, None, False))
    else:
        probed, other = _gemma3(True), _gemma3(True)
        ids, _ = _inputs(False)
        run_probed, run_other = (lambda: probed(input_ids=ids)), (lambda: other(input_ids=ids).logits)
    q = torch.randn(1, 2, 5, 8)
    with torch.no_grad():
        want_other, want_bare = run_other(), F.scaled_dot_product_attention(q, q, q)
        with AttentionProbe(probed, route=route) as probe:
            torch.testing.assert_close(run_other(), want_other, rtol=0, atol=0)
            torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q), want_bare, rtol=0, atol=0)
            with pytest.raises(AttentionProbeError, match="no attention record"):
                probe.pop_masses()  # neither call was recorded
            run_probed()
            assert probe.pop_masses().shape[1] == len(probe.layer_names)
    if route == "interface":
        assert other.config._attn_implementation == "sdpa"


def test_sdpa_route_restores_after_exception() -> None:
    model = TinyRemoteModel(TinySdpaAttention)
    original_sdpa = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="boom"), AttentionProbe(model):
        raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original_sdpa
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# -- the chunked mass function itself --------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_mass_matches_naive(chunk: int, causal: bool, softcap: float | None) -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 10, 8, generator=gen) * 2
    k = torch.randn(2, 2, 10, 8, generator=gen) * 2
    mask = torch.rand(2, 1, 10, 10, generator=gen) > 0.3
    mask[0, 0, 4] = False  # fully masked query row
    mask[1, 0, 7] = False
    query_mask = torch.ones(2, 10, dtype=torch.bool)
    query_mask[0, -2:] = False
    got = attention_key_mass(q, k, mask, is_causal=causal, softcap=softcap, scaling=0.3,
                             query_mask=query_mask, chunk_size=chunk)
    want = _naive_mass(q, k, mask, causal=causal, softcap=softcap, scaling=0.3,
                       query_mask=query_mask)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_chunked_mass_float_mask_per_head_and_min_value() -> None:
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 7, 8, generator=gen)
    k = torch.randn(1, 2, 7, 8, generator=gen)
    mask = torch.randn(1, 4, 7, 7, generator=gen)
    mask[0, 1, 3] = torch.finfo(torch.float32).min  # transformers' "fully masked" row
    got = attention_key_mass(q, k, mask, chunk_size=2)
    reference_mask = mask.clone()
    reference_mask[0, 1, 3] = -torch.inf
    torch.testing.assert_close(got, _naive_mass(q, k, reference_mask), atol=1e-5, rtol=0)
    assert got.sum().item() == pytest.approx(4 * 7 - 1, abs=1e-4)


def test_measuring_forward_stops_after_the_last_attention_layer(published_llada) -> None:
    """LLaDA's backbone (the published code) computes logits; the trajectory's measuring forwards never reach its
    LM head, and the masses are those of a full forward."""
    from sink_modifier.families.masked import MaskedDiffusion
    from sink_modifier.loading.checkpoints import load_model

    model = load_model(published_llada, trust_remote_code=True)
    blocks = model.model.transformer.blocks
    layers = {f"model.transformer.blocks.{i}": block for i, block in enumerate(blocks)}
    head_calls = []
    model.model.transformer.ff_out.register_forward_hook(lambda *_: head_calls.append(1))
    adapter = MaskedDiffusion(250)
    states = adapter.forward_noise_states(torch.arange(5, 25), levels=3, eps=1e-3, seed=0)
    with AttentionProbe(model, attention_modules=layers) as probe:
        early = adapter.measure(model, probe, states, batch_size=3, device=torch.device("cpu"))[None]
        model(torch.stack([s.input_ids for s in states]))  # a full forward, for comparison
        full = probe.pop_masses()
    assert len(head_calls) == 1  # only the comparison forward reached the head
    assert torch.equal(early, full)
