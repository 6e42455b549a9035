"""``sink_modifier.load_model``: fast one-line failures on bad sources, and the check forward that names the
cause of non-finite logits (on the published Dream code). Loading the published LLaDA and Dream code itself is
tested in fresh interpreters in ``test_published_loading.py``."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from sink_modifier import compat
from sink_modifier.loading.checkpoints import LoadError, check_finite_forward, load_model, resolve_source


def test_cpu_init_device_only_without_cuda(monkeypatch):
    """Copies of LLaDA's code that build every parameter on ``config.init_device`` ("cuda") are built on the CPU
    when there is no CUDA device, and left alone otherwise."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = SimpleNamespace(init_device="cuda:0")
    compat.cpu_init_device(config)
    assert config.init_device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = SimpleNamespace(init_device="cuda")
    compat.cpu_init_device(config)
    assert config.init_device == "cuda"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "the model path is empty"),
        ("no_such_model", "no_such_model: no such directory (a Hugging Face Hub id has the form org/name)"),
        ("./typo/model", "./typo/model: no such directory"),
        ("~/typo", "~/typo: no such directory"),
    ],
)
def test_bad_sources_fail_without_the_network(name, message, monkeypatch):
    """Decided from the name and the file system alone: a connection attempt (the Hub, with its retries) fails
    the test."""
    def no_network(*args, **kwargs):
        raise AssertionError(f"resolve_source({name!r}) opened a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(LoadError) as info:
        resolve_source(name)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_files_and_directories_that_are_not_checkpoints(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LoadError, match="is a file"):
        resolve_source(tmp_path / "weights.bin")
    with pytest.raises(LoadError, match="no config.json"):
        resolve_source(tmp_path)


def test_unreachable_hub_fails_after_one_short_connection_attempt(tmp_path, monkeypatch):
    """One connection attempt of at most 3 s to the Hub's endpoint, and no download started (transformers'
    retries of an unreachable Hub take minutes)."""
    from sink_modifier.loading import checkpoints

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://127.0.0.1:9")  # nothing listens
    attempts, connect = [], socket.create_connection

    def counted(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    monkeypatch.setattr(checkpoints, "_config_and_class", lambda *args: pytest.fail("a download was started"))
    with pytest.raises(LoadError, match="cannot be reached from this machine and the model is not in the local"):
        load_model("someone/not-cached")
    assert attempts == [(("127.0.0.1", 9), 3)]


# ---- the check forward --------------------------------------------------------------------------------


def test_check_forward_names_uninitialised_weights(published_dream):
    model = load_model(published_dream, trust_remote_code=True)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(LoadError, match=r"non-finite values \(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        check_finite_forward(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_check_forward_names_the_overflowing_module_and_the_right_dtype(published_dream, dtype):
    model = load_model(published_dream, trust_remote_code=True).to(dtype)
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


def test_loading_a_diffusion_gemma_registers_its_expert_conversion_first(diffusion_gemma_path):
    """Importing the package changes no transformers table; ``load_model`` of a DiffusionGemma registers the
    conversion that fuses per-expert keys before ``from_pretrained`` runs (fresh interpreter: nothing else has)."""
    from tests.published import run_fresh

    code = ("import sys, transformers, sink_modifier\n"
            "from transformers.conversion_mapping import get_checkpoint_conversion_mapping as mapping\n"
            "names = lambda: sorted(type(c).__name__ for c in mapping('diffusion_gemma') or [])\n"
            "print('after import', names())\n"
            "seen = []\n"
            "original = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained.__func__\n"
            "def spy(cls, *args, **kwargs):\n"
            "    seen.append(names())\n"
            "    return original(cls, *args, **kwargs)\n"
            "transformers.DiffusionGemmaForBlockDiffusion.from_pretrained = classmethod(spy)\n"
            "sink_modifier.load_model(sys.argv[1])\n"
            "print('at from_pretrained', seen[0])\n")
    result = run_fresh(code, str(diffusion_gemma_path))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("after import", "at from_"))]
    assert lines == ["after import []", "at from_pretrained ['FuseExpertsOnLoad', 'FuseExpertsOnLoad']"]
