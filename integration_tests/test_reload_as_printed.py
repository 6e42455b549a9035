"""The call ``sink-prune run`` prints after ``load with`` loads the output, in a fresh interpreter, for the
transformers-native families (the bundled DLM: dense, 2:4 + FP8, 2:4 + W4A16; DiffusionGemma: its FP8 recipe,
per-expert keys). LLaDA and Dream are covered by ``test_published_models.py``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sink_modifier.bundled import bundled_model_path
from tests.published import run_fresh

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank and keeps running.",
         "A diffusion language model denoises every position of its canvas at once, many times.",
         "Pruning removes half of the weights while keeping the model useful for its users.",
         "Attention sinks are positions that receive far more attention than the others do."]

RELOAD = r"""
import sys
import torch
import transformers
call = sys.argv[1]
if "; " in call:  # "import sink_modifier; <expression>"
    statement, call = call.split("; ", 1)
    exec(statement)
model = eval(call)
ids = torch.arange(5, 21)[None]
inputs = {"input_ids": ids}
if type(model).__name__ == "DiffusionGemmaForBlockDiffusion":
    inputs["decoder_input_ids"] = ids.flip(-1)
with torch.no_grad():
    logits = model(**inputs).logits
print("FINITE", bool(torch.isfinite(logits).all()), type(model).__name__)
"""


def run_and_reload(model: Path, recipe: str, tmp_path: Path) -> tuple[str, str]:
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(TEXTS))
    out = tmp_path / "out"
    run = run_fresh("import sys; from sink_modifier.cli.main import main; sys.exit(main(sys.argv[1:]))",
                    "run", str(model), "--recipe", str(RECIPES / f"{recipe}.yaml"), "--text-file", str(text),
                    "--num-samples", "4", "--output", str(out), "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("checkpoint:"))
    call = re.search(r"load with (.+)\)$", line).group(1)
    reload = run_fresh(RELOAD, call)
    assert reload.returncode == 0, reload.stderr[-3000:]
    return call, reload.stdout


@pytest.mark.parametrize("recipe", ["sink_wanda_unstructured_50", "sink_2of4_fp8", "sink_2of4_w4a16"])
def test_bundled_dlm_reloads_with_plain_transformers(recipe, tmp_path):
    call, output = run_and_reload(bundled_model_path("dlm"), recipe, tmp_path)
    assert call == f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})"
    assert "FINITE True" in output


def test_diffusion_gemma_reloads_through_the_package_loader(diffusion_gemma_path, tmp_path):
    """Its FP8 experts keep per-expert keys: ``load_model`` registers their conversion before loading (importing
    the package alone no longer does)."""
    call, output = run_and_reload(diffusion_gemma_path, "diffusiongemma_sink_2of4_fp8", tmp_path)
    assert call == f"import sink_modifier; sink_modifier.load_model({str(tmp_path / 'out')!r})"
    assert "FINITE True DiffusionGemmaForBlockDiffusion" in output
