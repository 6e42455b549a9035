"""The trial a LLaDA / Dream user makes, on stand-ins that behave like the published remote code.

Load with ``sink_modifier.load_model(..., trust_remote_code=True)``, prune through ``oneshot`` with both
pipelines and through ``sink-prune run``, save, reload with the loader: the reloaded model gives finite logits
equal to the pruned model in memory, with the zeros the recipe asked for and the LM head untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot

from sink_modifier import SinkAwarePruningModifier, families, load_model, load_model_and_tokenizer
from sink_modifier.cli import main
from sink_modifier.families import FamilyError
from tests.layouts import build_tiny_dream, build_tiny_llada

LAYOUTS = {
    "llada": (build_tiny_llada, "model.transformer.ff_out.weight", "model.transformer.blocks"),
    "dream": (build_tiny_dream, "lm_head.weight", "model.layers"),
}
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PROBE = torch.arange(5, 29)[None]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def checkpoint(request, tmp_path_factory):
    build, head, blocks = LAYOUTS[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param) / "model"), head, blocks


def token_dataset(num=6, length=24, seed=0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(5, 120, (num, length), generator=generator).tolist()})


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


def check_checkpoint(out: Path, head: str, blocks: str, head_before: torch.Tensor, nm: bool) -> torch.nn.Module:
    """Reload ``out`` with the loader (which checks a forward is finite) and check zeros, head and report."""
    reloaded = load_model(out, trust_remote_code=True)
    assert torch.isfinite(logits(reloaded)).all()
    params = dict(reloaded.named_parameters())
    assert torch.equal(params[head], head_before), "the LM head is never pruned"
    pruned = [n for n in params if n.startswith(blocks) and n.endswith(".weight") and params[n].dim() == 2]
    assert len(pruned) == 14
    for name in pruned:
        weight = params[name]
        if nm:
            assert bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), name
        else:
            assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), name
    report = json.loads((out / "sink_report.json").read_text())
    assert report["family"] in {"masked", "dream"} and len(report["layers"]) == 2
    return reloaded


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
def test_oneshot_prune_save_reload(checkpoint, tmp_path, pipeline):
    _, path, head, blocks = checkpoint
    model = load_model(path, trust_remote_code=True, dtype="float32")
    head_before = dict(model.named_parameters())[head].detach().clone()
    out = tmp_path / "out"
    oneshot(model=model, dataset=token_dataset(), pipeline=pipeline, trust_remote_code_model=True,
            recipe=[SinkAwarePruningModifier(sparsity=0.5, mask_structure="2:4", noise_levels=4)],
            output_dir=str(out))
    reloaded = check_checkpoint(out, head, blocks, head_before, nm=True)
    assert torch.equal(logits(reloaded), logits(model)), "the reloaded checkpoint is the pruned model"


def test_cli_run(checkpoint, tmp_path, capsys):
    name, path, head, blocks = checkpoint
    text = tmp_path / "calib.txt"
    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(5, 120, (6, 20), generator=generator).tolist()
    text.write_text("\n\n".join(" ".join(f"t{i}" for i in row) for row in rows))
    out = tmp_path / "out"
    recipe = RECIPES / "sink_wanda_unstructured_50.yaml"
    code = main(["run", str(path), "--trust-remote-code", "--recipe", str(recipe),
                 "--text-file", str(text), "--output", str(out), "--quiet",
                 *(["--pipeline", "diffusion"] if name == "dream" else [])])
    assert code == 0, capsys.readouterr().err
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=True)
    head_before = dict(model.named_parameters())[head].detach().clone()
    reloaded = check_checkpoint(out, head, blocks, head_before, nm=False)
    # The same run through the Python API, in memory: the CLI's checkpoint is exactly that model.
    samples = [tokenizer(t)["input_ids"] for t in text.read_text().split("\n\n")]
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": samples}), recipe=str(recipe),
            pipeline="diffusion" if name == "dream" else "independent", trust_remote_code_model=True)
    assert torch.equal(logits(reloaded), logits(model))


def test_masked_sampler_is_refused_for_dream(tmp_path):
    model = load_model(build_tiny_dream(tmp_path / "dream"), trust_remote_code=True, dtype="float32")
    family = families.resolve(model)
    assert family.name == "dream"
    with pytest.raises(FamilyError, match="shifts logits"):
        family.noise.sampler_states(model, torch.arange(1, 21), steps=4, blocks=1, prompt_fraction=0.5,
                               temperature=0.0, seed=0)


def test_documented_llada_ignore_pattern(tmp_path):
    """docs/supported-models.md: with ``targets: [Linear]``, LLaDA's LM head must be ignored by a pattern that
    matches llm-compressor's module names (which end in a dot: ``model.transformer.ff_out.``)."""
    path = build_tiny_llada(tmp_path / "llada")
    anchored = SinkAwarePruningModifier(targets=["Linear"], ignore=[r"re:.*transformer\.ff_out$"], noise_levels=2)
    with pytest.raises(ValueError, match=r"would prune model\.transformer\.ff_out"):
        oneshot(model=load_model(path, trust_remote_code=True), dataset=token_dataset(num=2),
                recipe=[anchored], trust_remote_code_model=True)
    model = load_model(path, trust_remote_code=True)
    head_before = model.get_output_embeddings().weight.detach().clone()
    documented = SinkAwarePruningModifier(targets=["Linear"], ignore=[r"re:.*transformer\.ff_out\.?$"],
                                          noise_levels=2)
    oneshot(model=model, dataset=token_dataset(num=2), recipe=[documented], trust_remote_code_model=True)
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert (model.model.transformer.blocks[0].ff_out.weight == 0).float().mean() == pytest.approx(0.5, abs=0.02)
