"""Size and speed of structured pruning: dense vs the checkpoints ``SinkAwareStructuredPruningModifier`` writes.

Every pruned model is made by ``oneshot`` with the modifier (sink-aware structured Wanda, default pipeline),
saved, and loaded back with plain ``AutoModelForCausalLM.from_pretrained``: what is timed is the checkpoint a
user gets. A hand-sliced model (the first channels and KV groups kept, config rewritten) is the reference for
the modifier's own overhead. All models are timed in ONE process on the same threads, interleaved round-robin
(medians), so the ratios compare like with like:

* one denoising step: one full forward of a batch of ``--batch`` x ``--length`` tokens (a quarter masked);
* a full sampler generation: LLaDA's sampler (``sink_modifier.families.sampling``), ``--answer`` tokens in
  ``--steps`` forwards after a 32-token prompt, batch 1.

    OMP_NUM_THREADS=1 python benchmarks/structured.py                 # CPU, one thread; writes docs/benchmarks.md
    python benchmarks/structured.py --device cuda --no-docs           # the same on a GPU (prints the table)
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer

from sink_modifier import SinkAwareStructuredPruningModifier
from sink_modifier.bundled import bundled_model_path, load_eval_slice
from sink_modifier.evaluation.speed import denoising_batch, interleaved_medians
from sink_modifier.families.sampling import masked_diffusion_sample
from sink_modifier.families.structure import HF_DECODER
from sink_modifier.modifiers.slicing import keep_units

sys.path.insert(0, str(Path(__file__).parent))
from sinks import write_docs  # noqa: E402  (one writer of the docs blocks for every benchmark)

DOCS = Path(__file__).parents[1] / "docs" / "benchmarks.md"
MARKER_BEGIN, MARKER_END = "<!-- structured:begin -->", "<!-- structured:end -->"
#: (label, MLP channel sparsity, KV-group sparsity); the bundled DLM has 2 KV groups, so 25% of them (half a
#: group) is refused by the modifier and not measured
GRID = [
    ("dense", 0.0, 0.0),
    ("channels 25%", 0.25, 0.0),
    ("channels 50%", 0.5, 0.0),
    ("KV groups 50%", 0.0, 0.5),
    ("channels 25% + KV groups 50%", 0.25, 0.5),
    ("channels 50% + KV groups 50%", 0.5, 0.5),
]


def prune(source: Path, out: Path, sparsity: float, head_sparsity: float, samples: list[list[int]]) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    modifier = SinkAwareStructuredPruningModifier(sparsity=sparsity, head_sparsity=head_sparsity, noise_levels=4)
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": samples}), recipe=[modifier],
            shuffle_calibration_samples=False)
    model.save_pretrained(out)
    return out


@torch.no_grad()
def hand_slice(source: Path, out: Path) -> Path:
    """The issue's reference: first half of the channels and of the KV groups kept, config rewritten."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = model.config
    channels, kv = config.intermediate_size // 2, config.num_key_value_heads // 2
    for layer in model.model.layers:
        keep_units(HF_DECODER.channels(layer), torch.arange(channels))
        keep_units(HF_DECODER.kv_groups(layer, config), torch.arange(kv))
    HF_DECODER.rewrite_config(config, channels=channels, heads=config.num_attention_heads // 2, kv_heads=kv)
    model.save_pretrained(out)
    return out


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@torch.no_grad()
def measure(paths: dict[str, Path], args, device: torch.device) -> dict[str, dict]:
    models = {label: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
              for label, path in paths.items()}
    config = next(iter(models.values())).config
    batch = denoising_batch(config, args.batch, args.length).to(device)
    prompt = denoising_batch(config, 1, 32, masked=0.0, seed=1)[0]
    steps = interleaved_medians({label: (lambda m=model: m(input_ids=batch, use_cache=False))
                                 for label, model in models.items()}, args.repeats, device)
    generations = interleaved_medians({
        label: (lambda m=model: masked_diffusion_sample(m, prompt, answer_length=args.answer, steps=args.steps,
                                                         mask_token_id=config.mask_token_id))
        for label, model in models.items()}, args.repeats, device)
    return {
        label: dict(
            parameters=sum(p.numel() for p in model.parameters()),
            bytes=checkpoint_bytes(paths[label]),
            step=steps[label],
            generate=generations[label],
            widths=(model.config.intermediate_size, model.config.num_attention_heads,
                    model.config.num_key_value_heads),
        )
        for label, model in models.items()
    }


def table(results: dict[str, dict]) -> list[str]:
    dense = results["dense"]
    lines = ["| model | MLP channels / heads / KV heads | parameters | ratio | checkpoint (MiB) | ratio "
             "| denoising step (ms) | ratio | generation (s) | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(
            f"| {label} | {' / '.join(map(str, r['widths']))} | {r['parameters'] / 1e6:.2f}M "
            f"| **{r['parameters'] / dense['parameters']:.2f}x** | {r['bytes'] / 2**20:.1f} "
            f"| {r['bytes'] / dense['bytes']:.2f}x | {r['step'] * 1e3:.1f} | **{r['step'] / dense['step']:.2f}x** "
            f"| {r['generate']:.2f} | {r['generate'] / dense['generate']:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--answer", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logger.remove()
    device = torch.device(args.device)
    source = bundled_model_path("dlm")
    tokenizer = AutoTokenizer.from_pretrained(source)
    texts = load_eval_slice()[: args.calibration_samples]
    samples = [tokenizer(text, truncation=True, max_length=128)["input_ids"] for text in texts]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(source)}
        for label, sparsity, head_sparsity in GRID[1:]:
            paths[label] = prune(source, Path(tmp) / label.replace(" ", "_"), sparsity, head_sparsity, samples)
        paths["hand slice, channels 50% + KV groups 50% (reference)"] = hand_slice(source, Path(tmp) / "hand")
        dense_bf16 = checkpoint_bytes(paths["dense"])
        paths["dense"] = Path(tmp) / "dense"  # re-saved in float32, like the pruned ones
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(paths["dense"])
        results = measure(paths, args, device)
    command = ("OMP_NUM_THREADS=1 python benchmarks/structured.py" if args.device == "cpu"
               else f"python benchmarks/structured.py --device {args.device}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    machine = f"{platform.machine()}, torch {torch.__version__}, {where}"
    header = [
        f"Command: `{command}`  ",
        f"Machine: {machine}; bundled DLM in float32 (its shipped bf16 checkpoint: {dense_bf16 / 2**20:.1f} MiB); "
        f"denoising step: batch {args.batch} x {args.length} tokens; generation: {args.answer} tokens in "
        f"{args.steps} steps after a 32-token prompt; medians of {args.repeats} interleaved runs",
        "",
    ]
    text = "\n".join(header + table(results))
    print(text)
    if not args.no_docs:
        write_docs(text, MARKER_BEGIN, MARKER_END, "Structured pruning: size and speed", DOCS)


if __name__ == "__main__":
    main()
