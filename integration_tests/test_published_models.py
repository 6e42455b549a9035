"""The trial a LLaDA / Dream user makes, on tiny checkpoints of the published remote code (``tests/published.py``).

Load with ``sink_modifier.load_model(..., trust_remote_code=True)``, prune through ``oneshot`` (both pipelines,
both trajectories, Wanda and SparseGPT; in this process, after the loads of ``tests/test_published_loading.py``
have shown a fresh interpreter loads the same) and through ``sink-prune run`` (dense, 2:4 + FP8, 2:4 + W4A16,
each in a fresh interpreter), then reload each output with the call the CLI prints, in another: finite logits,
the zeros the recipe asked for, and the LM head untouched (never pruned, never quantized).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot

from sink_modifier import SinkAwarePruningModifier, load_model
from tests.published import requires_published_code, run_fresh

pytestmark = [requires_published_code, pytest.mark.slow]

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
HEAD = {"llada": "model.transformer.ff_out.weight", "dream": "lm_head.weight"}
BLOCKS = {"llada": "model.transformer.blocks", "dream": "model.layers"}
PROBE = torch.arange(5, 29)[None]


@pytest.fixture(scope="module", params=["llada", "dream"])
def published(request):
    return request.param, request.getfixturevalue(f"published_{request.param}")


def token_dataset(num=4, length=24, seed=0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(5, 240, (num, length), generator=generator).tolist()})


def block_weights(model, name: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters()
            if n.startswith(BLOCKS[name]) and n.endswith(".weight") and p.dim() == 2}


@pytest.mark.parametrize(("pipeline", "trajectory", "method"), [
    ("independent", "forward_noise", "wanda"),
    ("diffusion", "sampler", "sparsegpt"),
])
def test_oneshot_prunes_the_published_model(published, pipeline, trajectory, method):
    name, path = published
    model = load_model(path, trust_remote_code=True, dtype="float32")
    head = dict(model.named_parameters())[HEAD[name]].detach().clone()
    modifier = SinkAwarePruningModifier(sparsity=0.5, mask_structure="2:4", method=method, noise_levels=3,
                                        trajectory=trajectory, sampler_steps=4)
    oneshot(model=model, dataset=token_dataset(), pipeline=pipeline, trust_remote_code_model=True,
            recipe=[modifier])
    weights = block_weights(model, name)
    assert len(weights) == 14
    for weight_name, weight in weights.items():
        assert bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), weight_name
    assert torch.equal(dict(model.named_parameters())[HEAD[name]], head), "the LM head is never pruned"
    with torch.no_grad():
        assert torch.isfinite(model(PROBE).logits).all()


def test_dream_default_pipeline_takes_a_padding_mask(published_dream):
    """llm-compressor's sequential pipeline hands Dream's layers the 2-D 0/1 attention mask of the dataset,
    which the published SDPA call refuses unless the family's load-time adapter turns it into a boolean mask."""
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    model = load_model(published_dream, trust_remote_code=True, dtype="float32")
    ids = token_dataset()["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * (len(r) - 3) + [0] * 3 for r in ids]})
    oneshot(model=model, dataset=dataset, pipeline="sequential", trust_remote_code_model=True,
            recipe=[WandaPruningModifier(sparsity=0.5, targets=["DreamDecoderLayer"])])
    weight = model.model.layers[0].mlp.up_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


RELOAD_CHECK = r"""
import json, sys
import torch
import transformers
import sink_modifier

path, head_name, blocks = sys.argv[1], sys.argv[2], sys.argv[3]
call = sys.argv[4]
model = eval(call)
params = dict(model.named_parameters())
head_module = model.get_output_embeddings()
with torch.no_grad():
    logits = model(torch.arange(5, 29)[None]).logits
zeros = {}
for name, module in model.named_modules():
    if name.startswith(blocks) and isinstance(module, torch.nn.Linear):
        zeros[name] = float((module.weight.float() == 0).float().mean())
print(json.dumps({"finite": bool(torch.isfinite(logits).all()), "head": params[head_name].float().tolist()[:2],
                  "head_quantized": hasattr(head_module, "quantization_scheme"),
                  "head_dtype": str(params[head_name].dtype), "zeros": zeros}))
"""


@pytest.mark.parametrize("recipe", ["sink_wanda_unstructured_50", "sink_2of4_fp8", "sink_2of4_w4a16"])
def test_cli_run_and_reload_as_printed(published, recipe, tmp_path):
    """``sink-prune run`` in a fresh interpreter (the W4A16 run through ``--pipeline diffusion``, the others
    through llm-compressor's), then the printed reload call in another."""
    name, path = published
    text = tmp_path / "calib.txt"
    if name == "llada":  # its word-level test tokenizer: "t<id>" words
        rows = torch.randint(5, 240, (4, 24), generator=torch.Generator().manual_seed(1)).tolist()
        text.write_text("\n\n".join(" ".join(f"t{i}" for i in row) for row in rows))
    else:  # the Hub's tokenizer
        text.write_text("\n\n".join([
            "The quick brown fox jumps over the lazy dog near the river bank.",
            "Attention sinks receive far more attention than other positions.",
            "A diffusion language model denoises every position of its canvas at once.",
            "Two of every four weights are zero in the semi-structured pattern."]))
    out = tmp_path / "out"
    run = run_fresh("import sys; from sink_modifier.cli.main import main; sys.exit(main(sys.argv[1:]))",
                    "run", str(path), "--trust-remote-code", "--recipe", str(RECIPES / f"{recipe}.yaml"),
                    "--text-file", str(text), "--output", str(out), "--quiet", "--max-seq-length", "32",
                    *(["--pipeline", "diffusion"] if recipe == "sink_2of4_w4a16" else []))
    assert run.returncode == 0, run.stderr[-3000:]
    call = re.search(r"load with (.+)\)$", next(line for line in run.stdout.splitlines()
                                                  if line.startswith("checkpoint:"))).group(1)
    assert call == f"sink_modifier.load_model({str(out)!r}, trust_remote_code=True)"
    original = load_model(path, trust_remote_code=True, dtype="float32")
    head = dict(original.named_parameters())[HEAD[name]]
    result = run_fresh(RELOAD_CHECK, str(out), HEAD[name], BLOCKS[name], call)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["finite"]
    assert not report["head_quantized"] and report["head_dtype"] == "torch.float32"
    assert report["head"] == head.float().tolist()[:2], "the LM head is neither pruned nor quantized"
    config = json.loads((out / "config.json").read_text())
    if recipe == "sink_wanda_unstructured_50":
        assert len(report["zeros"]) == 14
        assert all(z == pytest.approx(0.5, abs=0.02) for z in report["zeros"].values())
    else:
        assert HEAD[name].removesuffix(".weight") in config["quantization_config"]["ignore"] \
            or any("lm_head" in pattern for pattern in config["quantization_config"]["ignore"])
    sink_report = json.loads((out / "sink_report.json").read_text())
    assert sink_report["family"] == {"llada": "masked", "dream": "dream"}[name]


def test_documented_llada_ignore_pattern(published_llada):
    """docs/supported-models.md: with ``targets: [Linear]``, LLaDA's LM head must be ignored by a pattern that
    matches llm-compressor's module names (which end in a dot: ``model.transformer.ff_out.``); an anchored
    ``ff_out$`` misses it and the modifier refuses the recipe rather than prune the head."""
    anchored = SinkAwarePruningModifier(targets=["Linear"], ignore=[r"re:.*transformer\.ff_out$"], noise_levels=2)
    with pytest.raises(ValueError, match=r"would prune model\.transformer\.ff_out"):
        oneshot(model=load_model(published_llada, trust_remote_code=True), dataset=token_dataset(num=2),
                recipe=[anchored], trust_remote_code_model=True)
    model = load_model(published_llada, trust_remote_code=True)
    head_before = model.get_output_embeddings().weight.detach().clone()
    documented = SinkAwarePruningModifier(targets=["Linear"], ignore=[r"re:.*transformer\.ff_out\.?$"],
                                          noise_levels=2)
    oneshot(model=model, dataset=token_dataset(num=2), recipe=[documented], trust_remote_code_model=True)
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert (model.model.transformer.blocks[0].ff_out.weight == 0).float().mean() == pytest.approx(0.5, abs=0.02)


def test_python_oneshot_keeps_llada_head_out_of_fp8(published_llada, tmp_path):
    """Through ``oneshot`` with the shipped FP8 recipe (no CLI): the sink modifier adds LLaDA's head to the later
    QuantizationModifier's ignore, so the saved head is the original float tensor."""
    model = load_model(published_llada, trust_remote_code=True, dtype="float32")
    head = model.get_output_embeddings().weight.detach().clone()
    oneshot(model=model, dataset=token_dataset(), recipe=str(RECIPES / "sink_2of4_fp8.yaml"),
            trust_remote_code_model=True, output_dir=str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["model.transformer.ff_out"]
    assert not hasattr(model.get_output_embeddings(), "quantization_scheme")
    assert torch.equal(model.get_output_embeddings().weight, head)


def test_cli_inspect(published, tmp_path):
    """``sink-prune inspect`` on the published code (LLaDA has no module called "*Attention": the probe's
    records are named by decoder layer, as in a run)."""
    name, path = published
    text = tmp_path / "calib.txt"
    rows = torch.randint(5, 240, (2, 24), generator=torch.Generator().manual_seed(2)).tolist()
    english = "The quick brown fox jumps over the lazy dog.\n\nAttention sinks draw attention to themselves."
    text.write_text("\n\n".join(" ".join(f"t{i}" for i in row) for row in rows) if name == "llada" else english)
    run = run_fresh("import sys; from sink_modifier.cli.main import main; sys.exit(main(sys.argv[1:]))",
                    "inspect", str(path), "--trust-remote-code", "--text-file", str(text), "--output",
                    str(tmp_path / "inspect"), "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "inspect" / "sink_report.json").read_text())
    assert report["family"] == {"llada": "masked", "dream": "dream"}[name] and len(report["layers"]) == 2
