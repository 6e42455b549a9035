"""Real widths, measured: time and peak memory per phase at the published widths of LLaDA-8B, Dream-7B and
DiffusionGemma-26B, through the CLI's real path.

For each model and depth a checkpoint with the published layer shapes and vocabulary, random bf16 weights and
1, 2 or 4 decoder layers is built and saved (LLaDA and Dream with their published remote code, laid out as on the
Hub by ``tests/published.py``; needs ``../shared/fixtures/published-dlm-code``),
then ``sink-prune run`` loads it with the loader and prunes it with a shipped recipe, in a fresh process whose
resident memory is sampled every 50 ms. Phases: load (the loader, including its check forward), trajectory
(``run_trajectory``), pruning (the rest of ``oneshot``: calibration, compression, saving).

    python benchmarks/scale.py                 # the full grid (hours on 2 cores); writes docs/memory.md
    python benchmarks/scale.py --quick         # 1 layer at reduced width, seconds (CI runs it)

Peak memory is reported as peak RSS minus the weights, so that growth with depth (the weights themselves,
which a CPU run keeps in RAM) is separated from growth of the buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

DOCS = ROOT / "docs" / "memory.md"
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
H100_BF16_TFLOPS, H100_MFU = 989.0, 0.4  # dense bf16 peak; an assumed 40% utilisation


@dataclass(frozen=True)
class Shape:
    """A model family at its published width (the full depth is only used to extrapolate)."""

    family: str
    d: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    full_layers: int
    mask_token_id: int | None = None
    experts: int = 0
    expert_width: int = 0
    top_k: int = 0


SHAPES = {
    "llada": Shape("llada", d=4096, heads=32, kv_heads=32, mlp=12288, vocab=126464, full_layers=32,
                   mask_token_id=126336),
    "dream": Shape("dream", d=3584, heads=28, kv_heads=4, mlp=18944, vocab=152064, full_layers=28,
                   mask_token_id=151666),
    "diffusion_gemma": Shape("diffusion_gemma", d=2816, heads=16, kv_heads=8, mlp=2112, vocab=262144,
                             full_layers=30, experts=128, expert_width=704, top_k=8),
}
QUICK = {  # same code paths, reduced width
    "llada": Shape("llada", d=256, heads=4, kv_heads=4, mlp=512, vocab=1024, full_layers=32, mask_token_id=1000),
    "dream": Shape("dream", d=256, heads=4, kv_heads=2, mlp=512, vocab=1024, full_layers=28, mask_token_id=1000),
    "diffusion_gemma": Shape("diffusion_gemma", d=128, heads=4, kv_heads=2, mlp=128, vocab=1024, full_layers=30,
                             experts=8, expert_width=64, top_k=2),
}
RECIPES = {"llada": "sink_wanda_unstructured_50.yaml", "dream": "sink_wanda_unstructured_50.yaml",
           "diffusion_gemma": "diffusiongemma_sink_2of4_fp8.yaml"}


# ---------------------------------------------------------------------------------------------- building


def build_checkpoint(shape: Shape, layers: int, path: Path) -> int:
    """Save a random bf16 checkpoint of ``layers`` layers at ``shape``'s width; returns the weight bytes."""
    import torch

    torch.manual_seed(0)
    if shape.family == "diffusion_gemma":
        return _build_diffusion_gemma(shape, layers, path)
    from tests.published import build

    if shape.family == "llada":
        config = dict(d_model=shape.d, n_heads=shape.heads, n_kv_heads=shape.kv_heads, n_layers=layers,
                      mlp_hidden_size=shape.mlp, vocab_size=shape.vocab, mask_token_id=shape.mask_token_id)
    else:
        config = dict(hidden_size=shape.d, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                      num_hidden_layers=layers, intermediate_size=shape.mlp, vocab_size=shape.vocab,
                      mask_token_id=shape.mask_token_id)
    build(shape.family, path, dtype=torch.bfloat16, **config)
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _build_diffusion_gemma(shape: Shape, layers: int, path: Path) -> int:
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

    from tests.toy import BOS_ID, EOS_ID, PAD_ID, build_char_tokenizer

    text = DiffusionGemmaTextConfig(
        vocab_size=shape.vocab, hidden_size=shape.d, intermediate_size=shape.mlp, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=256 if shape.d > 1024 else 32, global_head_dim=512 if shape.d > 1024 else 64,
        num_global_key_value_heads=2 if shape.d > 1024 else 1,
        max_position_embeddings=4096, sliding_window=1024, num_experts=shape.experts,
        top_k_experts=shape.top_k, moe_intermediate_size=shape.expert_width,
        layer_types=["sliding_attention"] * layers, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
                  position_embedding_size=64)
    config = DiffusionGemmaConfig(text_config=text.to_dict(), vision_config=vision, canvas_length=256,
                                  boi_token_id=shape.vocab - 3, eoi_token_id=shape.vocab - 2,
                                  image_token_id=shape.vocab - 1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built for real: its encoder and decoder share every weight
    try:
        model = DiffusionGemmaForBlockDiffusion(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def calibration_text(shape: Shape, samples: int, length: int, path: Path) -> Path:
    """``samples`` paragraphs of ``length`` tokens in the checkpoint's tokenizer (ids, or characters)."""
    import random

    rng = random.Random(0)
    if shape.family == "diffusion_gemma":
        paragraphs = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length))
                      for _ in range(samples)]
    else:
        paragraphs = [" ".join(f"t{rng.randrange(5, shape.vocab - 600)}" for _ in range(length))
                      for _ in range(samples)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class Phases:
    """Wall time and peak RSS per phase of one run (seconds, GiB)."""

    time: dict = field(default_factory=dict)
    peak_rss: dict = field(default_factory=dict)


class _Sampler:
    def __init__(self):
        import psutil

        self.process, self.samples, self.running = psutil.Process(), [], True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while self.running:
            self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            time.sleep(0.05)

    def peak(self, start: float, end: float) -> float:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside, default=0) / 2**30


def _timed(owner, attr: str, phase: str, marks: dict) -> None:
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            marks.setdefault(phase, []).append((start, time.perf_counter()))

    setattr(owner, attr, wrapper)


def worker(spec: dict) -> dict:
    """Run ``sink-prune run`` in this (fresh) process with phase timers and an RSS sampler."""
    import llmcompressor

    from sink_modifier.calibration import pipeline
    from sink_modifier.cli import main as cli
    from sink_modifier.loading import checkpoints as loading
    from sink_modifier.modifiers import sink_rows

    marks: dict = {}
    _timed(loading, "load_model_and_tokenizer", "load", marks)
    _timed(sink_rows, "run_trajectory", "trajectory", marks)
    _timed(pipeline, "run_trajectory", "trajectory", marks)
    _timed(llmcompressor, "oneshot", "oneshot", marks)
    sampler = _Sampler()
    baseline = sampler.process.memory_info().rss / 2**30  # interpreter, torch and llm-compressor imported
    sampler.thread.start()
    start = time.perf_counter()
    argv = ["run", spec["checkpoint"], "--trust-remote-code", "--recipe", str(ROOT / "recipes" / spec["recipe"]),
            "--text-file", spec["text"], "--num-samples", str(spec["samples"]),
            "--max-seq-length", str(spec["length"]), "--output", spec["output"], "--quiet",
            "--threads", str(spec["threads"])]
    if spec["pipeline"] != "default":
        argv += ["--pipeline", spec["pipeline"]]
    code = cli.main(argv)
    end = time.perf_counter()
    sampler.running = False
    sampler.thread.join()
    if code:
        raise SystemExit(f"sink-prune run exited with {code}")
    (load_start, load_end), = marks["load"]
    (shot_start, shot_end), = marks["oneshot"]
    (traj_start, traj_end), = marks["trajectory"]
    phases = Phases()
    phases.time = {"load": load_end - load_start, "trajectory": traj_end - traj_start,
                   "pruning": (shot_end - shot_start) - (traj_end - traj_start), "total": end - start}
    pruning = max(sampler.peak(shot_start, traj_start), sampler.peak(traj_end, shot_end))
    phases.peak_rss = {"baseline": baseline, "load": sampler.peak(load_start, load_end),
                       "trajectory": sampler.peak(traj_start, traj_end), "pruning": pruning}
    return asdict(phases)


# ---------------------------------------------------------------------------------------------- the grid


def flops(shape: Shape, tokens: int, length: int) -> float:
    """Dense-equivalent forward FLOPs of one decoder layer over ``tokens`` tokens in sequences of ``length``."""
    head_dim = shape.d // shape.heads if shape.family != "diffusion_gemma" else 256
    attention = 2 * shape.d * head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    mlp = 2 * 3 * shape.d * (shape.top_k * shape.expert_width + shape.mlp if shape.experts else shape.mlp)
    scores = 2 * 2 * length * shape.heads * head_dim  # QK^T and AV per query
    return tokens * (attention + mlp + scores)


def run_grid(args) -> list[dict]:
    """Run every cell not yet in ``WORKDIR/results.json`` and return all cells there (runs accumulate)."""
    shapes = QUICK if args.quick else SHAPES
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sink-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for family in args.models:
        shape = shapes[family]
        samples = args.dg_samples if family == "diffusion_gemma" else args.samples
        length = args.canvas * 2 if family == "diffusion_gemma" else args.length
        text = calibration_text(shape, samples, length, work / f"{family}-{samples}x{length}.txt")
        for depth in args.layers if family != "diffusion_gemma" else [1]:
            checkpoint = work / f"{family}-{depth}"
            if not (checkpoint / "weights.json").exists():
                _subprocess(["--build", family, str(depth), str(checkpoint)] + (["--quick"] if args.quick else []))
            weights = json.loads((checkpoint / "weights.json").read_text())["bytes"] / 2**30
            for pipeline in args.pipelines if family != "diffusion_gemma" else ["diffusion"]:
                key = f"{family}/{depth}/{pipeline}/{samples}x{length}/{args.threads}"
                if key in results:
                    continue
                output = work / f"out-{family}-{depth}-{pipeline}"
                spec = dict(checkpoint=str(checkpoint), recipe=RECIPES[family], text=str(text), samples=samples,
                            length=length, pipeline=pipeline, output=str(output), threads=args.threads)
                print(f"{family}, {depth} layer(s), {pipeline} pipeline ...", file=sys.stderr, flush=True)
                result = json.loads(_subprocess(["--worker", json.dumps(spec)]).splitlines()[-1])
                results[key] = dict(family=family, layers=depth, pipeline=pipeline, samples=samples,
                                    length=length, threads=args.threads, weights_gib=weights, **result)
                store.write_text(json.dumps(results, indent=1))
                subprocess.run(["rm", "-rf", str(output)], check=False)
    return sorted(results.values(), key=lambda r: (list(SHAPES).index(r["family"]), r["pipeline"], r["layers"]))


def _subprocess(extra: list[str]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(extra[:2])} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def table(rows: list[dict], args) -> str:
    lines = ["| model | layers | pipeline | calibration | load s | trajectory s (per layer) "
             "| pruning s (per layer) | weights GiB "
             "| peak RSS above imports and weights, GiB: trajectory / pruning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, m, n = r["time"], r["peak_rss"], r["layers"]
        fixed = m["baseline"] + r["weights_gib"]
        lines.append(
            f"| {r['family']} | {n} | {r['pipeline']} | {r['samples']} x {r['length']} | {t['load']:.0f} | "
            f"{t['trajectory']:.0f} ({t['trajectory'] / n:.0f}) | {t['pruning']:.0f} ({t['pruning'] / n:.0f}) | "
            f"{r['weights_gib']:.2f} | {m['trajectory'] - fixed:.2f} / {m['pruning'] - fixed:.2f} |")
    return "\n".join(lines)


def layer_flops(shape: Shape, pipeline: str, samples: int, length: int, states_per_sample: int) -> float:
    """FLOPs of one layer in one run: a trajectory forward per state, then what the pipeline calibrates on (the
    clean samples, or every state with the diffusion pipeline): a calibrate and a propagate pass through
    llm-compressor's sequential pipeline, one pass through the basic pipeline (DiffusionGemma), where every
    expert sees every token."""
    tokens = samples * length
    states = tokens * states_per_sample
    calibrated = states if pipeline == "diffusion" else tokens
    if not shape.experts:
        return flops(shape, states, length) + 2 * flops(shape, calibrated, length)
    all_experts = 2 * 3 * shape.d * shape.expert_width * (shape.experts - shape.top_k)
    return flops(shape, states, length) + flops(shape, calibrated, length) + calibrated * all_experts


def extrapolation(rows: list[dict], args) -> str:
    """Full-depth time on this CPU from the deepest run's per-layer times, and H100 estimates from FLOPs."""
    shapes = QUICK if args.quick else SHAPES
    h100 = H100_BF16_TFLOPS * 1e12 * H100_MFU
    lines = ["| model | pipeline | calibration | this CPU, full depth (h) | CPU GFLOP/s achieved | one H100, "
             "same calibration (min) | one H100, the paper's calibration (min) |", "|---|---|---|---|---|---|---|"]
    for (family, pipeline), group in _groups(rows).items():
        r = max(group, key=lambda row: row["layers"])
        shape, n = shapes[family], r["layers"]
        per_layer = (r["time"]["trajectory"] + r["time"]["pruning"]) / n
        steps = 48 if family == "diffusion_gemma" else 10
        measured = layer_flops(shape, pipeline, r["samples"], r["length"], steps)
        # the paper: 128 samples of 4096 tokens, 10 levels (DiffusionGemma: 64 prompts of 512 + canvas 256)
        paper = (layer_flops(shape, pipeline, 64, 768, steps) if family == "diffusion_gemma"
                 else layer_flops(shape, pipeline, 128, 4096, steps))
        depth = shape.full_layers
        lines.append(f"| {family} | {pipeline} | {r['samples']} x {r['length']} tokens | "
                     f"{per_layer * depth / 3600:.1f} | {measured / per_layer / 1e9:.0f} | "
                     f"{measured * depth / h100 / 60:.1f} | {paper * depth / h100 / 60:.0f} |")
    return "\n".join(lines)


def _groups(rows):
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["family"], row["pipeline"]), []).append(row)
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced width, 1 layer, 2 samples (CI)")
    parser.add_argument("--models", default="llada,dream,diffusion_gemma")
    parser.add_argument("--layers", default="1,2,4")
    parser.add_argument("--pipelines", default="default,diffusion")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--canvas", type=int, default=256,
                        help="DiffusionGemma canvas (the prompt has the same length)")
    parser.add_argument("--dg-samples", type=int, default=2, help="DiffusionGemma samples")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=None,
                        help="checkpoints and results.json; cells already there are not run again (default: a "
                        "new temporary directory)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite docs/memory.md")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: render the cells already in --workdir's results.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.build:
        family, depth, path = args.build
        shape = (QUICK if args.quick else SHAPES)[family]
        size = build_checkpoint(shape, int(depth), Path(path))
        (Path(path) / "weights.json").write_text(json.dumps({"bytes": size}))
        return 0
    args.models = args.models.split(",")
    args.layers = [int(n) for n in args.layers.split(",")]
    args.pipelines = args.pipelines.split(",")
    if args.quick:
        args.layers, args.samples, args.length, args.canvas, args.dg_samples = [1], 2, 64, 16, 1
    if args.report_only:
        if not args.workdir or not (Path(args.workdir) / "results.json").exists():
            raise SystemExit("--report-only needs --workdir DIR with a results.json from earlier runs")
        rows = sorted(json.loads((Path(args.workdir) / "results.json").read_text()).values(),
                      key=lambda r: (list(SHAPES).index(r["family"]), r["pipeline"], r["layers"]))
        command = ("`python benchmarks/scale.py --workdir DIR --models MODEL --layers N --pipelines PIPELINE "
                   "[--samples N]`, one invocation per row below (cells accumulate in DIR), then "
                   "`python benchmarks/scale.py --workdir DIR --report-only`")
    else:
        rows = run_grid(args)
        command = "`python benchmarks/scale.py " + " ".join(sys.argv[1:]).strip() + "`"
    text = (f"Measured with {command} on {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {__import__('torch').__version__}, {args.threads} threads; "
            f"{time.strftime('%Y-%m-%d')}. Random bf16 weights; calibration as the command says "
            "(LLaDA/Dream: samples x tokens, 10 noise levels, `sink_wanda_unstructured_50.yaml`; DiffusionGemma: "
            "prompt and canvas of equal length, `trajectory: sampler` with 48 steps, "
            "`diffusiongemma_sink_2of4_fp8.yaml`).\n\n" + table(rows, args)
            + "\n\nExtrapolated to the full depth (per-layer time x layers; embeddings and LM head not included), "
            f"and one H100 at {H100_MFU:.0%} of its {H100_BF16_TFLOPS:.0f} bf16 TFLOP/s from the dense FLOP count "
            "of the decoder layers (a lower bound: the probe's float32 attention recompute and memory-bound work "
            "are not counted). The paper's calibration is 128 samples x 4096 tokens x 10 levels (DiffusionGemma: "
            "64 prompts of 512 tokens, canvas 256, 48 steps):\n\n" + extrapolation(rows, args))
    print(text)
    if not args.no_docs and not args.quick:
        from sinks import write_docs

        write_docs(text, BEGIN, END, "Measured at the published widths", docs=DOCS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
