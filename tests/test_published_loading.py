"""``sink_modifier.load_model`` on the published LLaDA and Dream code (not stand-ins), each load in a fresh
interpreter: import side effects of another library (one that registers a ``"default"`` RoPE, say) are exactly
the kind of thing that made the published code look loadable when it was not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.published import LOAD_SAVED, requires_published_code, run_fresh

pytestmark = requires_published_code

# Runs in a new interpreter: load, then compare with the saved tensors and with the published module's own
# forward (a fresh instance of the checkpoint's class, its rotary frequencies set by hand to 1 / theta^(2i/d)).
LOAD_AND_COMPARE = LOAD_SAVED + r"""
import transformers.modeling_rope_utils as rope

config = model.config
reference = type(model)(config)  # the published __init__ (no post_init for LLaDA: not needed to run it)
reference.load_state_dict(saved, strict=True)
theta = float(getattr(config, "rope_theta"))
head_dim = (config.d_model // config.n_heads) if hasattr(config, "d_model") else \
    config.hidden_size // config.num_attention_heads
intended = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
rotary = 0
for module in [*reference.modules(), *model.modules()]:
    if "inv_freq" in module._buffers:
        rotary += 1
        if module in set(model.modules()):
            assert torch.allclose(module.inv_freq, intended), "the loaded model's rotary frequencies are wrong"
        else:
            module.inv_freq.copy_(intended)
reference.eval()
tokens = torch.arange(5, 37).remainder(config.vocab_size - 10)[None] + 5
with torch.no_grad():
    got, want = model(tokens).logits, reference(tokens, use_cache=False).logits
print(json.dumps({"exact": exact, "keys": len(saved), "logits_equal": bool(torch.equal(got, want)),
                  "rotary_buffers": rotary, "library_table_untouched": "default" not in rope.ROPE_INIT_FUNCTIONS,
                  "class": type(model).__name__}))
"""


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.slow
def test_fresh_load_gives_the_saved_weights_and_the_published_forward(name, request):
    path = request.getfixturevalue(f"published_{name}")
    result = run_fresh(LOAD_AND_COMPARE, str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["exact"], "weights must equal the saved tensors bit for bit"
    assert report["logits_equal"], "fp32 logits must equal the published module's own forward"
    assert report["library_table_untouched"], "transformers' ROPE_INIT_FUNCTIONS must not be edited"
    assert report["class"] == {"llada": "LLaDAModelLM", "dream": "DreamModel"}[name]
    if name == "dream":
        assert report["rotary_buffers"] == 2 * 3  # the base model's and each layer's, in both models


@pytest.mark.slow
def test_a_transformers_that_breaks_the_code_again_fails_with_one_line(published_llada, tmp_path):
    """Without the repair (as a future transformers could break the code in a new way) the loader names the
    model, the versions and the cause in one line, not a traceback."""
    code = r"""
import sys
from sink_modifier import load_model
from sink_modifier.loading import remote_code
from sink_modifier.cli.main import main
from sink_modifier.loading.checkpoints import LoadError
remote_code.repair_remote_code = lambda cls: None
try:
    load_model(sys.argv[1], trust_remote_code=True)
except LoadError as error:
    print("LOADERROR", error)
print("CLI", main(["run", sys.argv[1], "--trust-remote-code", "--recipe", sys.argv[2], "--text-file", sys.argv[3],
                   "--output", sys.argv[4], "-q"]))
"""
    text = tmp_path / "calib.txt"
    text.write_text("t5 t6 t7 t8\n\nt9 t10 t11 t12")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sink_wanda_unstructured_50.yaml"
    result = run_fresh(code, str(published_llada), str(recipe), str(text), str(tmp_path / "out"))
    line = next(line for line in result.stdout.splitlines() if line.startswith("LOADERROR"))
    assert "LLaDAModelLM" in line and "(written for transformers 4.46.3) under transformers 5." in line
    assert "TypeError: LLaDAModelLM.tie_weights() got an unexpected keyword argument" in line
    assert "CLI 1" in result.stdout and not (tmp_path / "out").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("sink-prune run: error:")]
    assert errors == [f"sink-prune run: error: {line.removeprefix('LOADERROR ')}"]  # one line, not "please report"


@pytest.mark.slow
def test_dream_hub_generation_code_runs(published_dream):
    """The Hub's generation_utils.py (DreamGenerationConfig.validate predates transformers 5) and its
    diffusion_generate, after loading through the loader: two new tokens, none of them a mask."""
    code = r"""
import sys, torch
from sink_modifier import load_model
model = load_model(sys.argv[1], trust_remote_code=True, dtype="float32")
prompt = torch.tensor([[100, 200, 300, 400]])
out = model.diffusion_generate(prompt, max_new_tokens=4, steps=4, output_history=False,
                               return_dict_in_generate=True, temperature=0.0)
sequence = out.sequences[0]
assert sequence.shape[0] == 8 and torch.equal(sequence[:4], prompt[0]), sequence
print("GENERATED", (sequence[4:] == model.config.mask_token_id).sum().item())
"""
    result = run_fresh(code, str(published_dream))
    assert "GENERATED 0" in result.stdout, result.stderr[-3000:]


def test_remote_code_needs_consent(published_llada):
    from sink_modifier.loading.checkpoints import LoadError, load_model

    with pytest.raises(LoadError, match="ships its own modeling code; pass trust_remote_code=True"):
        load_model(published_llada)


# Runs in a new interpreter: Dream's ELBO (sink-prune eval's estimator) and the lm-eval model's three request
# kinds, each checked against the same computation with the shift written out by hand.
DREAM_SCORES = r"""
import json, sys
from types import SimpleNamespace
import torch
from sink_modifier import load_model_and_tokenizer
from sink_modifier.evaluation.perplexity import elbo_perplexity, perplexity, token_scores
from sink_modifier.evaluation.harness import DiffusionLM

model, tokenizer = load_model_and_tokenizer(sys.argv[1], trust_remote_code=True, dtype="float32")
mask = model.config.mask_token_id

def by_hand(model, ids, attention_mask):
    raw = model(input_ids=ids, attention_mask=attention_mask).logits
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)

texts = ["The quick brown fox jumps over the lazy dog.", "Attention sinks draw attention."]
got = perplexity(model, texts, tokenizer=tokenizer, num_mc_samples=2)
want = elbo_perplexity(model, texts, tokenizer=tokenizer, mask_token_id=mask, num_mc_samples=2, logits=by_hand)
unshifted = elbo_perplexity(model, texts, tokenizer=tokenizer, mask_token_id=mask, num_mc_samples=2)

lm = DiffusionLM(model, tokenizer, mc_samples=2, batch_size=4, gen_block_length=4)
context = lm.tok_encode("The quick brown fox")
continuation = lm.tok_encode(" jumps over", add_special_tokens=False)
[(score, greedy)] = lm._loglikelihood_tokens([(None, context, continuation)], disable_tqdm=True)
total = 0.0
for t, masked in lm._masked_noise(continuation):
    tokens = torch.tensor(context + continuation)
    full = torch.cat([torch.zeros(len(context), dtype=torch.bool), masked])
    noisy = torch.where(full, torch.full_like(tokens, mask), tokens)
    nll, _ = token_scores(model, [noisy], [tokens], by_hand)
    total -= float(nll[0, full].double().sum()) / t
[rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(texts[0],))], disable_tqdm=True)
[text] = lm.generate_until([SimpleNamespace(args=("The quick brown", {"until": ["\n"], "max_gen_toks": 4}))],
                          disable_tqdm=True)
print(json.dumps({"elbo_equal": got.sample_nlls == want.sample_nlls,
                  "differs_unshifted": abs(got.nll_per_token - unshifted.nll_per_token) > 1e-6,
                  "loglikelihood": score, "by_hand": total / 2, "rolling": rolling,
                  "generated": isinstance(text, str), "family": lm.family}))
"""


@pytest.mark.slow
def test_dream_is_scored_with_its_shift(published_dream):
    """``sink-prune eval``'s ELBO and lm-eval's loglikelihood / rolling / generate_until read Dream's logits one
    position late, as its own generation code does."""
    result = run_fresh(DREAM_SCORES, str(published_dream))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["family"] == "dream"
    assert report["elbo_equal"] and report["differs_unshifted"]
    assert report["loglikelihood"] == pytest.approx(report["by_hand"], rel=1e-12)
    assert report["rolling"] < 0 and report["generated"]
