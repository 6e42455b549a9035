"""LLaDA-MoE and LLaDA2.x pruned end to end from their published code: experts removed by sink-weighted saliency,
every remaining Linear (routed and shared experts, attention) pruned by SinkAwarePruningModifier with each expert
calibrated on every token, routers and LM head untouched, and the checkpoint reloaded with its own code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from safetensors.torch import load_file

from sink_modifier import SinkAwareExpertPruningModifier, SinkAwarePruningModifier, families, load_model
from sink_modifier.families.moe import MoeBlock
from tests.published import LOAD_SAVED, run_fresh
from tests.published_moe import build, requires_published_moe_code

pytestmark = requires_published_moe_code
TOKENS = torch.arange(5, 37)[None]


@pytest.fixture(scope="module", params=["llada_moe", "llada2_moe"])
def published_moe(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp("published_moe") / request.param)


def dataset(count: int = 3, length: int = 24) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": [torch.randint(4, 240, (length,), generator=generator).tolist()
                                            for _ in range(count)]})


def load(path):
    return load_model(path, trust_remote_code=True, dtype="float32")


@torch.no_grad()
def test_the_observed_routing_is_the_routing_the_block_used(published_moe):
    """Rebuilding each block's output from what expert pruning observes gives the block's own output."""
    name, path = published_moe
    model = load(path)
    family = families.resolve(model)
    family.checkpoint.prepare(model)
    seen, inputs, outputs, handles = {}, {}, {}, []

    def register(module, hook, kind, **kwargs):
        handles.append(getattr(module, f"register_{kind}_hook")(hook, **kwargs))

    for block in family.experts.moe_blocks(model):
        family.experts.watch(block, lambda idx, w, out, n=block.name: seen.__setitem__(n, (idx, w, out)), register)
        moe = model.get_submodule(block.name)
        handles.append(moe.register_forward_pre_hook(lambda m, a, n=block.name: inputs.__setitem__(n, a[0])))
        handles.append(moe.register_forward_hook(
            lambda m, a, o, n=block.name: outputs.__setitem__(n, o[0] if isinstance(o, tuple) else o)))
    model(TOKENS)
    for handle in handles:
        handle.remove()
    assert seen and set(seen) == set(outputs)
    hidden = model.config.hidden_size
    for block_name, (top_k_index, top_k_weights, expert_outputs) in seen.items():
        moe = model.get_submodule(block_name)
        rebuilt = torch.zeros(TOKENS.numel(), hidden)
        for expert, (tokens, rows) in expert_outputs.items():
            gate = (top_k_weights * (top_k_index == expert)).sum(-1)[tokens]
            rebuilt.index_add_(0, tokens, rows * gate[:, None])
        if hasattr(moe, "shared_experts"):  # LLaDA2 adds its shared expert inside the block
            rebuilt += moe.shared_experts(inputs[block_name]).reshape(-1, hidden)
        torch.testing.assert_close(rebuilt, outputs[block_name].reshape(-1, hidden), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_experts", [True, False], ids=["experts+weights", "weights"])
@pytest.mark.slow
def test_pruned_and_reloaded_with_its_own_code(published_moe, with_experts, tmp_path):
    name, path = published_moe
    dense = load(path)
    model = load(path)
    experts = SinkAwareExpertPruningModifier(sparsity=0.5, noise_levels=2)
    recipe = ([experts] if with_experts else []) + [SinkAwarePruningModifier(sparsity=0.5, noise_levels=2)]
    out = tmp_path / "pruned"
    oneshot(model=model, dataset=dataset(), recipe=recipe, pipeline="diffusion", trust_remote_code_model=True,
            output_dir=str(out))
    kept = dense.config.num_experts // 2 if with_experts else dense.config.num_experts
    assert json.loads((out / "config.json").read_text())["num_experts"] == kept
    for layer_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in layer_name:
            zeros = (module.weight == 0).float().mean().item()
            if layer_name.endswith(".gate"):  # the router: never pruned, only its rows of removed experts go
                assert zeros == 0.0
            else:
                assert zeros == pytest.approx(0.5, abs=0.02), layer_name
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    if with_experts:
        for block, record in experts.pruned_experts.items():
            gate = model.get_submodule(block).gate
            assert torch.equal(gate.weight, dense.get_submodule(block).gate.weight[record["retained"]])
            if name == "llada2_moe":  # the same number of experts left in every routing group (4 of 4)
                assert [sum(4 * g <= e < 4 * g + 4 for e in record["retained"]) for g in range(4)] == [2] * 4
                bias = dense.get_submodule(block).gate.expert_bias
                assert torch.equal(gate.expert_bias, bias[record["retained"]])
    with torch.no_grad():
        expected = model(TOKENS).logits
    torch.save(expected, tmp_path / "expected.pt")
    # its own code, in a fresh interpreter, through the loader the report names
    result = run_fresh(RELOAD, str(out), str(tmp_path / "expected.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["exact"] and report["logits_difference"] <= 1e-5, report


RELOAD = LOAD_SAVED + r"""
with torch.no_grad():
    got = model(torch.arange(5, 37)[None]).logits
print(json.dumps({"exact": exact, "logits_difference": float((got - torch.load(sys.argv[2])).abs().max())}))
"""


@pytest.mark.slow
def test_sink_prune_run_never_asks_to_run_custom_code(published_moe, tmp_path):
    name, path = published_moe
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(f"t{i}" for i in range(5 + k, 40 + k)) for k in range(3)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sparsity_stage:\n  sparsity_modifiers:\n    SinkAwarePruningModifier:\n"
                      "      sparsity: 0.5\n      noise_levels: 2\n")
    command = [sys.executable, "-m", "sink_prune", "run", str(path), "--recipe", str(recipe), "--text-file",
               str(text), "--num-samples", "2", "--max-seq-length", "32", "--trust-remote-code",
               "--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, input="", timeout=600)
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    expert = next(k for k in saved if ".experts.1.down_proj" in k)
    assert (saved[expert] == 0).float().mean() == pytest.approx(0.5, abs=0.02)


def test_moe_block_record_names_the_decoder_layer(published_moe):
    name, path = published_moe
    model = load(path)
    blocks = families.resolve(model).experts.moe_blocks(model)
    assert all(isinstance(b, MoeBlock) and b.name.endswith(".mlp") for b in blocks)
    assert [b.layer_index for b in blocks] == ([0, 1] if name == "llada_moe" else [1])


def test_llada2_pruned_on_its_own_sampler_states(tmp_path):
    path = build("llada2_moe", tmp_path / "llada2")
    model = load(path)
    sampler = dict(trajectory="sampler", sampler_steps=4, sampler_blocks=2, prompt_fraction=0.5)
    experts = SinkAwareExpertPruningModifier(sparsity=0.5, **sampler)
    oneshot(model=model, dataset=dataset(), recipe=[experts, SinkAwarePruningModifier(sparsity=0.5, **sampler)],
            pipeline="diffusion", trust_remote_code_model=True, output_dir=str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "sink_report.json").read_text())
    assert report["trajectory"] == "sampler" and report["family"] == "llada2"
    assert report["num_states"] == 3 * 4  # 2 blocks x 2 steps per sample
    assert report["expert_pruning"]["num_experts_after"] == 8
    reloaded = load(tmp_path / "out")
    assert reloaded.config.num_experts == 8
    assert (reloaded.model.layers[1].mlp.experts[0].down_proj.weight == 0).float().mean() == 0.5
    # its own generate() builds a bfloat16 mask, so it runs in bfloat16 (as the published weights are)
    bf16 = load_model(tmp_path / "out", trust_remote_code=True, dtype="bfloat16")
    generated = bf16.generate(torch.arange(5, 13)[None], block_length=4, steps=2, gen_length=8, mask_id=250)
    assert generated.shape[1] <= 8


@pytest.mark.slow
def test_scored_by_sink_prune_eval_and_the_lm_eval_model(published_moe, tmp_path):
    from types import SimpleNamespace

    from sink_modifier import load_model_and_tokenizer
    from sink_modifier.evaluation.harness import DiffusionLM

    name, path = published_moe
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"t{i}" for i in range(5 + k, 45 + k)) for k in range(2)))
    command = [sys.executable, "-m", "sink_prune", "eval", str(path), "--trust-remote-code", "--text-file",
               str(text), "--num-samples", "2", "--max-seq-length", "32", "--num-mc-samples", "2", "-q"]
    result = subprocess.run(command, capture_output=True, text=True, input="", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ELBO perplexity" in result.stdout
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=True, dtype="float32")
    lm = DiffusionLM(model, tokenizer, mc_samples=2, batch_size=4, gen_block_length=4)
    [(score, _)] = lm.loglikelihood([SimpleNamespace(args=("t5 t6 t7 t8", " t9 t10"))], disable_tqdm=True)
    assert score < 0 and torch.isfinite(torch.tensor(score))
    [generated] = lm.generate_until([SimpleNamespace(args=("t5 t6 t7", {"until": ["[EOS]"], "max_gen_toks": 4}))],
                                    disable_tqdm=True)
    assert isinstance(generated, str)
