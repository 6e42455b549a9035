"""Cost of sink awareness: wall time and peak memory against llm-compressor's own Wanda, in one process.

Both sides prune the same model from the same calibration states through ``oneshot``:

* ``diffusion``: ``SinkAwarePruningModifier`` with ``pipeline="diffusion"`` (trajectory phase + sequential
  calibration on the noised states) vs ``WandaPruningModifier`` calibrated on exactly those noised states
  (built with the same adapter and seed), sequential pipeline.
* ``clean``: ``SinkAwarePruningModifier`` with the default pipeline (trajectory pre-pass, then calibration on
  the clean samples) vs ``WandaPruningModifier`` on the clean samples.
* ``sampler``: ``trajectory: sampler`` with ``pipeline="diffusion"`` vs ``WandaPruningModifier`` calibrated on
  the same recorded sampler states (regenerated with the same seed). For tiny DiffusionGemma the states are
  its own ``generate()`` steps, and Wanda runs them through llm-compressor's basic pipeline with the recorded
  self-conditioning fed back in.

Peak memory is the peak resident set size above the level at the start of each run, sampled every 5 ms
(CPU), or ``torch.cuda.max_memory_allocated`` when a GPU is present.

    python benchmarks/overhead.py            # writes the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.core import active_session
from llmcompressor.modifiers.pruning import WandaPruningModifier
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, DiffusionGemmaForBlockDiffusion

from sink_modifier import SinkAwarePruningModifier
from sink_modifier.families.diffusion_gemma import DiffusionGemma, feeding_self_conditioning
from sink_modifier.families.diffusion_gemma_checkpoint import SharedWeights
from sink_modifier.families.masked import MaskedDiffusion
from sink_modifier.modifiers.scope import never_pruned_ignore
from tests.toy import MASK_ID, build_tiny_diffusion_gemma, build_toy_model

sys.path.insert(0, str(Path(__file__).parent))
from sinks import write_docs  # noqa: E402  (one writer of the docs blocks for every benchmark)

DOCS = Path(__file__).parents[1] / "docs" / "benchmarks.md"
MARKER_BEGIN, MARKER_END = "<!-- overhead:begin -->", "<!-- overhead:end -->"


class PeakMemory(contextlib.AbstractContextManager):
    """Peak memory of the block above its starting level, in MiB."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.mib = (self.peak - self.start) / 2**20
        return False


def calibration(tokenizer, num_samples: int, length: int, seed: int) -> list[list[int]]:
    """Deterministic pseudo-text samples of exactly ``length`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    low = len(tokenizer.all_special_ids)
    return [
        torch.randint(low, len(tokenizer), (length,), generator=generator).tolist() for _ in range(num_samples)
    ]


def noised_states(samples: list[list[int]], levels: int, seed: int) -> list[list[int]]:
    adapter = MaskedDiffusion(MASK_ID)
    return [
        state.input_ids.tolist()
        for sample in samples
        for state in adapter.forward_noise_states(torch.tensor(sample), levels=levels, eps=1e-3, seed=seed)
    ]


def sampler_states(model_path: Path, samples: list[list[int]], steps: int, seed: int) -> list[list[int]]:
    """The states the masked sampler visits, exactly as the sink-aware run records them."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    adapter = MaskedDiffusion(MASK_ID)
    return [
        state.input_ids.tolist()
        for sample in samples
        for state in adapter.sampler_states(model, torch.tensor(sample), steps=steps, blocks=1,
                                            prompt_fraction=0.5, temperature=0.0, seed=seed)
    ]


def timed_oneshot(model_path: Path, rows: list[list[int]], recipe, pipeline: str) -> tuple[float, float]:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": rows})
    gc.collect()
    with PeakMemory() as memory:
        start = time.perf_counter()
        oneshot(model=model, dataset=dataset, recipe=recipe, pipeline=pipeline,
                num_calibration_samples=len(rows), max_seq_length=len(rows[0]))
        seconds = time.perf_counter() - start
    del model
    gc.collect()
    return seconds, memory.mib


def measure(model_path: Path, samples, levels: int, seed: int, repeats: int) -> dict[str, dict]:
    states = noised_states(samples, levels, seed)
    recorded = sampler_states(model_path, samples, levels, seed)

    def sink(**kwargs):
        return [SinkAwarePruningModifier(sparsity=0.5, noise_levels=levels, seed=seed, **kwargs)]

    def wanda():
        return [WandaPruningModifier(sparsity=0.5, targets=["Gemma3DecoderLayer"])]

    cases = {
        "diffusion": (lambda: timed_oneshot(model_path, samples, sink(), "diffusion"),
                      lambda: timed_oneshot(model_path, states, wanda(), "sequential")),
        "clean": (lambda: timed_oneshot(model_path, samples, sink(), "independent"),
                  lambda: timed_oneshot(model_path, samples, wanda(), "independent")),
        "sampler": (lambda: timed_oneshot(model_path, samples, sink(trajectory="sampler", sampler_steps=levels),
                                          "diffusion"),
                    lambda: timed_oneshot(model_path, recorded, wanda(), "sequential")),
    }
    timed_oneshot(model_path, samples[:2], wanda(), "independent")  # warm-up: imports, first-call costs
    results = {}
    for name, (ours, theirs) in cases.items():
        runs = {"ours": [], "theirs": []}
        for _ in range(repeats):  # interleaved, so drift in machine load hits both sides alike
            runs["ours"].append(ours())
            runs["theirs"].append(theirs())
        results[name] = {
            side: {"seconds": statistics.median(r[0] for r in v), "mib": statistics.median(r[1] for r in v)}
            for side, v in runs.items()
        }
    return results


def diffusion_gemma_states(model_path: Path, samples: list[list[int]], steps: int, seed: int):
    """The decoder steps DiffusionGemma's generate() visits, exactly as the sink-aware run records them."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_path, dtype=torch.float32)
    adapter = DiffusionGemma(model)
    return [
        state
        for sample in samples
        for state in adapter.sampler_states(model, torch.tensor(sample), steps=steps, blocks=1,
                                            prompt_fraction=0.5, temperature=0.0, seed=seed)
    ]


def timed_diffusion_gemma(model_path: Path, recipe, samples=None, states=None) -> tuple[float, float]:
    """``samples``: the sink-aware run (its own trajectory). ``states``: llm-compressor's Wanda on those states,
    through its basic pipeline, with the recorded self-conditioning fed back in (the same forwards)."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if states is None:
        dataset, pipeline, feed = Dataset.from_dict({"input_ids": samples}), "diffusion", contextlib.nullcontext()
    else:
        SharedWeights.prepare(model)  # the same tied modules, so Wanda prunes each weight once too
        dataset = Dataset.from_dict({"input_ids": [s.prefix.tolist() for s in states],
                                     "decoder_input_ids": [s.canvas.tolist() for s in states]})
        pipeline = "basic"
        feed = feeding_self_conditioning(
            model, lambda: states[active_session().state.current_batch_idx].self_conditioning)
    gc.collect()
    with PeakMemory() as memory, feed:
        start = time.perf_counter()
        oneshot(model=model, dataset=dataset, recipe=recipe, pipeline=pipeline, processor=tokenizer,
                num_calibration_samples=len(dataset), shuffle_calibration_samples=False)
        seconds = time.perf_counter() - start
    del model
    gc.collect()
    return seconds, memory.mib


def measure_diffusion_gemma(model_path: Path, samples, steps: int, seed: int, repeats: int) -> dict[str, dict]:
    states = diffusion_gemma_states(model_path, samples, steps, seed)

    def ours():
        recipe = [SinkAwarePruningModifier(sparsity=0.5, trajectory="sampler", sampler_steps=steps,
                                           sampler_blocks=1, seed=seed)]
        return timed_diffusion_gemma(model_path, recipe, samples=samples)

    def theirs():
        return timed_diffusion_gemma(model_path, [WandaPruningModifier(
            sparsity=0.5, targets=["DiffusionGemmaDecoderTextLayer"],
            ignore=never_pruned_ignore())], states=states)

    theirs()  # warm-up
    runs = {"ours": [], "theirs": []}
    for _ in range(repeats):
        runs["ours"].append(ours())
        runs["theirs"].append(theirs())
    return {"sampler": {
        side: {"seconds": statistics.median(r[0] for r in v), "mib": statistics.median(r[1] for r in v)}
        for side, v in runs.items()
    }, "num_states": len(states)}


def table(results_by_size: dict[str, dict], command: str, setup: str) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {setup}",
        "",
        "| model | calibration | sink-aware time (s) | Wanda time (s) | time ratio | sink-aware peak (MiB) "
        "| Wanda peak (MiB) | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, results in results_by_size.items():
        for name, r in results.items():
            if name == "num_states":
                continue
            ours, theirs = r["ours"], r["theirs"]
            label = {
                "diffusion": "noised states (`pipeline=\"diffusion\"`)",
                "clean": "clean samples (default pipeline)",
                "sampler": "sampler states (`trajectory: sampler`, `pipeline=\"diffusion\"`)"
                + (f", {results['num_states']} recorded decoder steps" if "num_states" in results else ""),
            }[name]
            small = max(ours["mib"], theirs["mib"]) < 1  # below the RSS sampler's resolution: no ratio
            ratio = ours["mib"] / max(theirs["mib"], 1e-9)
            memory = "< 1 | < 1 | n/a" if small else f"{ours['mib']:.0f} | {theirs['mib']:.0f} | **{ratio:.2f}x**"
            lines.append(
                f"| {size} | {label} | {ours['seconds']:.2f} | {theirs['seconds']:.2f} | "
                f"**{ours['seconds'] / theirs['seconds']:.2f}x** | {memory} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--noise-levels", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="256x4,512x4", help="hidden x layers, comma separated")
    parser.add_argument("--diffusion-gemma-samples", type=int, default=8,
                        help="samples for the tiny DiffusionGemma row (0 skips it)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    torch.manual_seed(args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            hidden, layers = map(int, size.split("x"))
            path = build_toy_model(Path(tmp) / size, hidden_size=hidden, intermediate_size=4 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
                                   num_key_value_heads=max(1, hidden // 128))
            tokenizer = AutoTokenizer.from_pretrained(path)
            samples = calibration(tokenizer, args.num_samples, args.length, args.seed)
            results[f"hidden {hidden}, {layers} layers"] = measure(
                path, samples, args.noise_levels, args.seed, args.repeats
            )
        if args.diffusion_gemma_samples:
            path = build_tiny_diffusion_gemma(Path(tmp) / "diffusion_gemma")
            tokenizer = AutoTokenizer.from_pretrained(path)
            samples = calibration(tokenizer, args.diffusion_gemma_samples, 64, args.seed)
            results["tiny DiffusionGemma (hidden 64, 2 layers, 4 experts, canvas 8)"] = measure_diffusion_gemma(
                path, samples, args.noise_levels, args.seed, args.repeats)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    command = f"{threads}python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        f"{args.num_samples} samples x {args.length} tokens, {args.noise_levels} noise levels, "
        f"median of {args.repeats} interleaved runs"
    )
    text = table(results, command.strip(), setup)
    print(text)
    if not args.no_docs:
        write_docs(text, MARKER_BEGIN, MARKER_END, "Overhead against llm-compressor's Wanda", DOCS)


if __name__ == "__main__":
    main()
