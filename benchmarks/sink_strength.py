"""How strong are the sinks of a masked DLM? The Gemma-3 bundled DLM against the LLaDA-layout one, side by side.

For each model, on the same calibration text and the same noised states (``sink-prune inspect``'s trajectory:
``forward_noise``, 10 noise levels, seed 0, per-layer sinks), per decoder layer and averaged:

* **moved** at 50% unstructured, 2:4 and 75% unstructured: the share of Wanda's keep/prune decisions that the
  sink row scales move (``sink_modifier.cli.diagnostics.diagnose``, llm-compressor's own mask selection run twice);
* **sink input share**: the share of the layer's Linear inputs' squared norm carried by sink rows (mean over
  the layer's Linears; with no special sink it is about sinks/tokens);
* **sink norm ratio**: the sink tokens' hidden-state norm at the layer output over the median token's (mean
  over states that have a sink; massive activations show as 100 and more);
* **top on sink**: the share of states whose largest |activation| at the layer output sits on a sink token
  (massive activations, when there are any, sit on the sinks);
* **max/median**: the largest |activation| at the layer output over the median |activation| (mean over states),
  whatever token holds it: whether the model has massive activations at all;
* **sinks/state**: hard sinks (score above 0.5) per state.

Plus the dense model's quality: the ELBO (nats/token, 4 MC samples, seed 0) on the first documents of the
bundled evaluation slice, and the final validation NLL from each model's ``training.json``. A causal model
(``--model ar=sink_modifier/bundled/ar``, the AR twin) is measured the same way on its decoded prefixes (the
``autoregressive`` family's states) and scored with its exact NLL.

    python benchmarks/sink_strength.py                        # calibration.txt (the demo's), 8 samples x 128
    python benchmarks/sink_strength.py --text-file sink_modifier/bundled/eval_slice.txt --num-samples 16

The text defaults to ``sink_modifier/assets/calibration.txt`` (what ``sink-prune demo`` calibrates on); with
``--text-file sink_modifier/bundled/eval_slice.txt --num-samples 16`` it is what ``sink-prune inspect``
measures by default. One thread; about a minute per model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from sink_modifier import families
from sink_modifier.bundled import bundled_model_path, load_eval_slice
from sink_modifier.calibration.trajectory import TrajectorySettings, run_trajectory
from sink_modifier.cli.demo import CALIBRATION_TEXT
from sink_modifier.cli.diagnostics import diagnose
from sink_modifier.cli.workflows import read_samples
from sink_modifier.evaluation.perplexity import ar_perplexity, elbo_perplexity
from sink_modifier.families import base_model, no_cache_kwargs

ROOT = Path(__file__).resolve().parents[1]
LLAMA_DLM = ROOT / "benchmarks" / ".cache" / "reference" / "models" / "dlm-llama"  # train_reference --arch llama
SETTINGS = {"50%": (0.5, "0:0"), "2:4": (0.5, "2:4"), "75%": (0.75, "0:0")}


def default_models() -> dict[str, Path]:
    models = {"gemma3 (bundled dlm)": bundled_model_path("dlm")}
    if (LLAMA_DLM / "config.json").is_file():
        models["llama (LLaDA layout)"] = LLAMA_DLM
    return models


def load(path: Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForMaskedLM
    return auto.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@torch.no_grad()
def activation_stats(model: torch.nn.Module, result, layers: dict[str, torch.nn.Module]) -> list[dict]:
    """Per layer: share of states whose largest |activation| is on a sink, mean max/median |activation|,
    mean number of hard sinks per state."""
    groups = result.samples[0].scores.shape[1]
    records = [{"top_on_sink": [], "max_over_median": [], "sinks": []} for _ in layers]
    current: dict = {}

    def hook(index):
        def record(module, args, output):
            hidden = (output[0] if isinstance(output, tuple | list) else output).float().abs()  # [B, T, D]
            sinks = current["sinks"][:, index if groups > 1 else 0]  # [B, T]
            for row in range(hidden.shape[0]):
                flat = hidden[row]
                top_position = int(flat.max(dim=-1).values.argmax())
                records[index]["top_on_sink"].append(float(sinks[row, top_position]))
                records[index]["max_over_median"].append(float(flat.max() / flat.median()))
                records[index]["sinks"].append(float(sinks[row].sum()))
        return record

    backbone = base_model(model)
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers.values())]
    try:
        for sample in result.samples:
            current["sinks"] = sample.scores > 0.5
            input_ids = torch.stack([s.input_ids for s in sample.states])
            backbone(input_ids=input_ids, **no_cache_kwargs(backbone))
    finally:
        for handle in handles:
            handle.remove()
    return [{key: sum(values) / len(values) for key, values in record.items()} for record in records]


def measure(path: Path, texts: list[str], args) -> dict:
    model = load(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    family = families.resolve(model)
    samples = [torch.tensor(tokenizer(t, truncation=True, max_length=args.max_seq_length)["input_ids"])
               for t in texts[: args.num_samples]]
    settings = TrajectorySettings(sink_scope="layer", trajectory="forward_noise", noise_levels=args.noise_levels,
                                  seed=args.seed)
    started = time.time()
    result = run_trajectory(model, family, samples, settings, progress=False)
    layers = {f"layer {i}": layer for i, layer in enumerate(base_model(model).layers)}
    if len(layers) != len(result.layer_names):
        raise SystemExit(f"{len(result.layer_names)} attention layers for {len(layers)} decoder layers")
    diagnostics = {name: diagnose(model, result, layers, sparsity=sparsity, mask_structure=structure)
                   for name, (sparsity, structure) in SETTINGS.items()}
    activations = activation_stats(model, result, layers)
    eval_texts = load_eval_slice()[: args.eval_documents]
    if family.name == "masked":
        elbo = elbo_perplexity(model, eval_texts, tokenizer=tokenizer, mask_token_id=family.noise.mask_token_id,
                               num_mc_samples=4, seed=0, max_length=128, batch_size=32)
    else:  # a causal control (the AR twin): exact NLL, its states are decoded prefixes
        elbo = ar_perplexity(model, eval_texts, tokenizer=tokenizer, max_length=128, batch_size=32)
    log = path / "training.json"
    training = json.loads(log.read_text()) if log.is_file() else {}
    per_layer = []
    for index, name in enumerate(layers):
        base = diagnostics["50%"]["layers"][index]
        per_layer.append({
            "layer": name,
            **{f"moved {key}": diagnostics[key]["layers"][index]["moved_decisions"] for key in SETTINGS},
            "sink input share": base["sink_input_share"],
            "sink norm ratio": base["sink_norm_ratio"],
            **activations[index],
        })
    return {
        "path": str(path), "architecture": type(model).__name__, "family": family.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples": len(samples), "tokens": sum(len(s) for s in samples), "states": sum(len(s.states) for s in
                                                                                         result.samples),
        "moved": {key: d["moved_decisions"] for key, d in diagnostics.items()},
        "layers": per_layer,
        "eval_slice_elbo": elbo.nll_per_token, "eval_slice_elbo_stderr": elbo.stderr,
        "eval_slice_tokens": elbo.num_tokens,
        "validation_nll": training.get("final", {}).get("validation", {}).get("nll_per_token"),
        "seconds": time.time() - started,
    }


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2%}" if abs(value) < 1 else f"{value:.3g}"


def table(results: dict[str, dict]) -> str:
    columns = ["moved 50%", "moved 2:4", "moved 75%", "sink input share", "sink norm ratio", "top_on_sink",
               "max_over_median", "sinks"]
    titles = ["moved 50%", "moved 2:4", "moved 75%", "sink input share", "sink norm ratio",
              "top activation on sink", "max/median activation", "sinks/state"]
    lines = ["| model | layer | " + " | ".join(titles) + " |", "|---" * (2 + len(columns)) + "|"]
    for name, result in results.items():
        rows = result["layers"]
        for row in rows:
            lines.append(f"| {name} | {row['layer'][6:]} | "
                         + " | ".join(_ratio(c, row[c]) for c in columns) + " |")
        means = {}
        for column in columns:
            values = [row[column] for row in rows if row[column] is not None]
            means[column] = sum(values) / len(values) if values else None
        for key in SETTINGS:  # the weight-weighted totals diagnose() reports, not the plain layer mean
            means[f"moved {key}"] = result["moved"][key]
        lines.append(f"| {name} | **all** | " + " | ".join(f"**{_ratio(c, means[c])}**" for c in columns) + " |")
    lines += ["", "| model | parameters | eval-slice NLL (nats/token; ELBO for a DLM) | validation NLL "
              "(training.json) |",
              "|---|---|---|---|"]
    for name, result in results.items():
        validation = result["validation_nll"]
        lines.append(f"| {name} | {result['parameters']:,} | {result['eval_slice_elbo']:.3f} ± "
                     f"{result['eval_slice_elbo_stderr']:.3f} ({result['eval_slice_tokens']} tokens) | "
                     + ("n/a" if validation is None else f"{validation:.3f}") + " |")
    return "\n".join(lines)


def _ratio(column: str, value) -> str:
    if value is None:
        return "n/a"
    if column in ("sink norm ratio", "max_over_median", "sinks"):
        return f"{value:.2f}"
    return f"{value:.2%}" if column != "top_on_sink" else f"{value:.0%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", metavar="NAME=DIR",
                        help="a model to measure (repeatable; default: the bundled Gemma-3 DLM and, when trained, "
                             "the LLaDA-layout one in benchmarks/.cache/reference/models/dlm-llama)")
    parser.add_argument("--text-file", type=Path, default=CALIBRATION_TEXT)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--noise-levels", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-documents", type=int, default=24, help="eval-slice documents for the ELBO")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = dict(m.split("=", 1) for m in args.model) if args.model else default_models()
    texts = read_samples(args.text_file)
    results = {name: measure(Path(path), texts, args) for name, path in models.items()}
    command = "python " + " ".join(shlex.quote(a) for a in [
        str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
        else sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    first = next(iter(results.values()))
    print(f"{command}\n\n{first['samples']} samples x <= {args.max_seq_length} tokens of {args.text_file.name} "
          f"({first['tokens']} tokens), {args.noise_levels} noise levels, seed {args.seed}: {first['states']} "
          "states per model\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
