"""The LLaDA and Dream stand-ins: layout, round trip, bidirectionality, SDPA route, save quirk, and plain
llm-compressor Wanda through ``oneshot`` on both."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoTokenizer

from sink_modifier.loading import load_model
from tests.layouts import build_llada, build_tiny_dream, build_tiny_llada
from tests.layouts.dream import DreamConfig, DreamModel, shift_logits
from tests.layouts.llada import LLaDAConfig, LLaDAModelLM

LAYOUTS = {
    "llada": dict(
        build=build_tiny_llada, model_cls=LLaDAModelLM, config_cls=LLaDAConfig, block="LLaDALlamaBlock",
        fresh=lambda: build_llada(LLaDAConfig()),
        head="model.transformer.ff_out",
        linears=["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"],
        block_prefix="model.transformer.blocks",
    ),
    "dream": dict(
        build=build_tiny_dream, model_cls=DreamModel, config_cls=DreamConfig, block="DreamDecoderLayer",
        fresh=lambda: DreamModel(DreamConfig()).eval(),
        head="lm_head",
        linears=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        block_prefix="model.layers",
    ),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory):
    spec = dict(LAYOUTS[request.param], name=request.param)
    spec["path"] = spec["build"](tmp_path_factory.mktemp(request.param) / "model")
    return spec


def _load(spec) -> torch.nn.Module:
    """As a user loads the published checkpoint: its own code, through the repairing loader."""
    return load_model(spec["path"], trust_remote_code=True)


def _tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_reload_round_trip_and_layout(layout):
    model = _load(layout)
    assert type(model).__name__ == layout["model_cls"].__name__
    assert type(model).__module__.startswith("transformers_modules.")  # the checkpoint's own remote code
    assert model.config._name_or_path == str(layout["path"])
    assert model.config.mask_token_id == 126 < model.config.vocab_size
    names = dict(model.named_modules())
    for layer in range(2):
        assert type(names[f"{layout['block_prefix']}.{layer}"]).__name__ == layout["block"]
        for linear in layout["linears"]:
            assert isinstance(names[f"{layout['block_prefix']}.{layer}.{linear}"], torch.nn.Linear)
    assert isinstance(names[layout["head"]], torch.nn.Linear)
    assert model.get_input_embeddings().weight.shape == (128, 128)
    torch.manual_seed(0)
    fresh = layout["fresh"]()
    reloaded = model.state_dict()
    assert fresh.state_dict().keys() == reloaded.keys()
    assert all(torch.equal(t, reloaded[k]) for k, t in fresh.state_dict().items())
    tokenizer = AutoTokenizer.from_pretrained(layout["path"])
    assert tokenizer.mask_token_id == 126 and len(tokenizer) == 128


def test_bidirectional(layout):
    model = _load(layout)
    tokens = _tokens()
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1 - 5) % 115 + 5
    with torch.no_grad():
        first, second = model(tokens).logits, model(changed).logits
    assert first.shape == (2, 12, 128)
    assert not torch.allclose(first[:, 0], second[:, 0])


def test_attention_goes_through_torch_sdpa(layout, monkeypatch):
    """A wrapper of torch.nn.functional.scaled_dot_product_attention sees one non-causal call per layer."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((q.shape, k.shape, is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    model = _load(layout)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(_tokens())
    assert [c[2] for c in calls] == [False, False]
    assert all(q == k == (2, 4, 12, 32) for q, k, _ in calls)  # k/v heads already repeated (GQA 4:2)


def test_padding_mask_hides_padded_keys(layout):
    model = _load(layout)
    short = _tokens(batch=1, length=9)
    padded = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        expected = model(short).logits
        got = model(padded, attention_mask=mask).logits[:, :9]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dream_logits_are_unshifted_and_sampler_shift_realigns():
    logits = torch.arange(12.0).view(1, 4, 3)
    shifted = shift_logits(logits)
    assert torch.equal(shifted[:, 0], logits[:, 0]) and torch.equal(shifted[:, 1:], logits[:, :-1])


def test_save_pretrained_fails_on_list_tied_weights_keys(layout, tmp_path):
    """transformers 5 expects a dict; the published 4.x-style list breaks save_pretrained at the very end."""
    torch.manual_seed(0)
    model = layout["fresh"]()  # the class as published (the loader would already have repaired the instance)
    assert isinstance(type(model)._tied_weights_keys, list)
    with pytest.raises(AttributeError, match="keys") as info:
        model.save_pretrained(tmp_path / "out")
    assert "'list' object has no attribute 'keys'" in str(info.value)
    assert traceback.extract_tb(info.tb)[-1].name == "_get_tied_weight_keys"
    model._tied_weights_keys = {}  # the workaround: LLaDA and Dream do not tie their LM head
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_llmcompressor_wanda_oneshot(layout):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    model = _load(layout)
    dataset = Dataset.from_dict({"input_ids": _tokens(batch=4, length=16, seed=1).tolist()})
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[WandaPruningModifier(sparsity=0.5, targets=[layout["block"]])],
        sequential_targets=[layout["block"]],
        num_calibration_samples=4,
        max_seq_length=16,
        trust_remote_code_model=True,  # oneshot re-reads the config from disk
    )
    names = dict(model.named_modules())
    for layer in range(2):
        for linear in layout["linears"]:
            weight = names[f"{layout['block_prefix']}.{layer}.{linear}"].weight
            assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (names[layout["head"]].weight == 0).float().mean().item() < 0.01
