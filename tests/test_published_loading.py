"""``sink_modifier.load_model`` on the published LLaDA and Dream code (not stand-ins), each load in a fresh
interpreter: import side effects of another library (one that registers a ``"default"`` RoPE, say) are exactly
the kind of thing that made the published code look loadable when it was not."""

from __future__ import annotations

import json

import pytest

from tests.published import requires_published_code, run_fresh

pytestmark = requires_published_code

# Runs in a new interpreter: load, then compare with the saved tensors and with the published module's own
# forward (a fresh instance of the checkpoint's class, its rotary frequencies set by hand to 1 / theta^(2i/d)).
LOAD_AND_COMPARE = r"""
import json, sys
import torch
from safetensors.torch import load_file
from pathlib import Path
import transformers.modeling_rope_utils as rope

import sink_modifier

path = Path(sys.argv[1])
model = sink_modifier.load_model(path, trust_remote_code=True, dtype="float32")
saved = {}
for shard in sorted(path.glob("*.safetensors")):
    saved.update(load_file(shard))
state = model.state_dict()
exact = sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in saved)

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


def test_a_transformers_that_breaks_the_code_again_fails_with_one_line(published_llada):
    """Without the repair (as a future transformers could break the code in a new way) the loader names the
    model, the versions and the cause in one line, not a traceback."""
    code = r"""
import sys
from sink_modifier import load_model, remote_code
from sink_modifier.loading import LoadError
remote_code.repair_remote_code = lambda cls: None
try:
    load_model(sys.argv[1], trust_remote_code=True)
except LoadError as error:
    print("LOADERROR", error)
"""
    result = run_fresh(code, str(published_llada))
    line = next(line for line in result.stdout.splitlines() if line.startswith("LOADERROR"))
    assert "LLaDAModelLM" in line and "written for transformers 4.46.3" in line
    assert "TypeError: LLaDAModelLM.tie_weights() got an unexpected keyword argument" in line


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
    from sink_modifier.loading import LoadError, load_model

    with pytest.raises(LoadError, match="ships its own modeling code; pass trust_remote_code=True"):
        load_model(published_llada)
