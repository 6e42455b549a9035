"""``sink_modifier.load_model`` on stand-ins that behave like the published LLaDA and Dream code.

First each quirk is shown to break plain transformers (so the stand-ins are faithful and the repairs are
needed), then the loader is shown to load, repair and check, and to fail fast with one line on bad sources.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from sink_modifier import compat
from sink_modifier.loading import LoadError, check_finite_forward, load_model, resolve_source
from tests.layouts import build_llada, build_tiny_dream, build_tiny_llada
from tests.layouts.dream import DreamConfig, DreamModel
from tests.layouts.llada import LLaDAConfig

TOKENS = torch.arange(5, 21)[None]


@pytest.fixture(scope="module")
def llada_path(tmp_path_factory):
    return build_tiny_llada(tmp_path_factory.mktemp("llada") / "model")


@pytest.fixture(scope="module")
def dream_path(tmp_path_factory):
    return build_tiny_dream(tmp_path_factory.mktemp("dream") / "model")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


# ---- the published behaviours, reproduced ------------------------------------------------------------


def test_plain_transformers_cannot_load_llada(llada_path):
    with pytest.raises(AttributeError, match="has no attribute 'all_tied_weights_keys'"):
        AutoModelForCausalLM.from_pretrained(llada_path, trust_remote_code=True)


def test_plain_transformers_loads_dream_with_garbage_rotary_frequencies(dream_path):
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(dream_path, trust_remote_code=True)  # auto_map has AutoModel only
    loaded = AutoModel.from_pretrained(dream_path, trust_remote_code=True).eval()
    torch.manual_seed(0)
    original = DreamModel(DreamConfig()).eval()
    assert not torch.equal(loaded.model.rotary_emb.inv_freq, original.model.rotary_emb.inv_freq)
    assert not torch.allclose(_logits(loaded), _logits(original))


def test_llada_with_cuda_init_device_cannot_be_built_without_cuda(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the failure needs a machine without CUDA")
    path = build_tiny_llada(tmp_path / "model", init_device="cpu")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "init_device": "cuda"}))
    monkeypatch.setattr(compat, "cpu_init_device", lambda config: None)
    with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda"):
        load_model(path, trust_remote_code=True)
    monkeypatch.undo()
    model = load_model(path, trust_remote_code=True)
    assert next(model.parameters()).device.type == "cpu"


# ---- the loader ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_loader_gives_the_published_model(family, llada_path, dream_path, tmp_path):
    path = llada_path if family == "llada" else dream_path
    torch.manual_seed(0)
    original = build_llada(LLaDAConfig()) if family == "llada" else DreamModel(DreamConfig()).eval()
    model = load_model(path, trust_remote_code=True)
    assert torch.equal(_logits(model), _logits(original))
    model.save_pretrained(tmp_path / "saved")  # list-style tied keys repaired before any work is done
    again = load_model(tmp_path / "saved", trust_remote_code=True)
    assert torch.equal(_logits(again), _logits(original))


def test_remote_code_needs_consent(llada_path):
    with pytest.raises(LoadError, match="ships its own modeling code; pass trust_remote_code=True"):
        load_model(llada_path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "the model path is empty"),
        ("no_such_model", "no_such_model: no such directory (a Hugging Face Hub id has the form org/name)"),
        ("./typo/model", "./typo/model: no such directory"),
        ("~/typo", "~/typo: no such directory"),
    ],
)
def test_bad_sources_fail_at_once(name, message):
    start = time.perf_counter()
    with pytest.raises(LoadError) as info:
        resolve_source(name)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 1.0


def test_files_and_directories_that_are_not_checkpoints(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LoadError, match="is a file"):
        resolve_source(tmp_path / "weights.bin")
    with pytest.raises(LoadError, match="no config.json"):
        resolve_source(tmp_path)


def test_unreachable_hub_fails_immediately(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://127.0.0.1:9")  # nothing listens
    start = time.perf_counter()
    with pytest.raises(LoadError, match="cannot be reached from this machine and the model is not in the local"):
        load_model("someone/not-cached")
    assert time.perf_counter() - start < 5


# ---- the check forward --------------------------------------------------------------------------------


def test_check_forward_names_uninitialised_weights(dream_path):
    model = load_model(dream_path, trust_remote_code=True)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(LoadError, match=r"non-finite values \(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        check_finite_forward(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_check_forward_names_the_overflowing_module_and_the_right_dtype(dream_path, dtype):
    model = load_model(dream_path, trust_remote_code=True).to(dtype)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(torch.finfo(dtype).max / 4)
    with pytest.raises(LoadError) as info:
        check_finite_forward(model)
    message = str(info.value)
    assert "model.layers.0.mlp" in message
    if dtype == torch.float16:
        assert "overflows in float16; load the model in bfloat16 or float32" in message
    else:
        assert "float16" not in message and "torch.float32 although every weight is finite" in message
