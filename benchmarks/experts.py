"""MoE diffusion LMs at their published widths: what the trajectory, calibration with every expert seeing every
token, and expert pruning cost, per MoE layer.

For LLaDA-MoE-7B-A1B and LLaDA2.0-mini a checkpoint with the published layer shapes (hidden size, heads, experts
and their widths, routing groups; from the model cards, since the fixtures carry only the code), random bf16
weights and 1 or 2 MoE layers is built from the published remote code (``tests/published_moe.py``; needs
``../shared/fixtures/published-dlm-code``) and loaded with ``sink_modifier.load_model``. Then, each in one
process, with resident memory sampled every 20 ms:

* trajectory: ``run_trajectory`` (forward noise, every token through its routed experts only);
* calibration: ``oneshot`` with ``SinkAwarePruningModifier`` (Wanda) on the diffusion pipeline, every expert
  computing every token (llm-compressor's all-experts flag, the default);
* expert pruning: parameters and the time of one plain forward before and after ``SinkAwareExpertPruningModifier``
  removes 25% and 50% of the routed experts.

Per-layer figures are the difference between the 2- and the 1-MoE-layer model (embeddings, LM head and LLaDA2's
first dense layer cancel out). Times are on this machine's CPU and only comparable within one table.

    python benchmarks/experts.py             # writes its section of docs/benchmarks.md
    python benchmarks/experts.py --quick     # reduced widths, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- experts:begin -->", "<!-- experts:end -->"

#: published widths (model cards): LLaDA-MoE-7B-A1B and LLaDA2.0-mini
WIDTHS = {
    "llada_moe": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                      num_experts_per_tok=8, expert_intermediate_size=1024, dense_intermediate_size=8192,
                      vocab_size=157184),
    "llada2_moe": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                       num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=512,
                       intermediate_size=5120, num_shared_experts=1, vocab_size=157184),
}
QUICK = {"llada_moe": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, num_experts=16,
                           expert_intermediate_size=128, dense_intermediate_size=512, vocab_size=4096),
         "llada2_moe": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=32, n_group=8, topk_group=4, moe_intermediate_size=64,
                            intermediate_size=512, vocab_size=4096)}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 20 ms."""

    def __enter__(self):
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.running = False
        self.thread.join()


def worker(spec: dict) -> dict:
    """One model and depth, in this process: build, load, and measure every phase."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    from sink_modifier import SinkAwareExpertPruningModifier, SinkAwarePruningModifier, families, load_model
    from sink_modifier.calibration.trajectory import TrajectorySettings, run_trajectory
    from tests.published_moe import build

    torch.set_num_threads(spec["threads"])
    model_name, moe_layers = spec["model"], spec["moe_layers"]
    widths = dict(spec["widths"])
    if model_name == "llada_moe":
        widths |= dict(num_hidden_layers=moe_layers, moe_layer_freq=[1] * moe_layers)
    else:
        widths |= dict(num_hidden_layers=moe_layers + 1, first_k_dense_replace=1)
    path = build(model_name, Path(spec["workdir"]) / f"{model_name}-{moe_layers}", dtype=torch.bfloat16, **widths)
    vocab = widths["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 240, (spec["length"],), generator=generator) for _ in range(spec["samples"])]
    settings = dict(noise_levels=spec["states"])
    result = {"model": model_name, "moe_layers": moe_layers}

    model = load_model(path, trust_remote_code=True, dtype="bfloat16")
    family = families.resolve(model)
    with PeakRSS() as phase:
        run_trajectory(model, family, rows, TrajectorySettings(**settings), progress=False)
    result["trajectory"] = (phase.seconds, phase.peak)
    with PeakRSS() as phase:
        oneshot(model=model, dataset=Dataset.from_dict({"input_ids": [r.tolist() for r in rows]}),
                recipe=[SinkAwarePruningModifier(sparsity=0.5, **settings)], pipeline="diffusion",
                trust_remote_code_model=True)
    result["calibration"] = (phase.seconds, phase.peak)
    del model
    gc.collect()

    probe = torch.randint(5, min(vocab, 240), (1, spec["length"]), generator=generator)
    for sparsity in (0.0, 0.25, 0.5):
        model = load_model(path, trust_remote_code=True, dtype="bfloat16")
        if sparsity:
            oneshot(model=model, dataset=Dataset.from_dict({"input_ids": [r.tolist() for r in rows]}),
                    recipe=[SinkAwareExpertPruningModifier(sparsity=sparsity, **settings)], pipeline="diffusion",
                    trust_remote_code_model=True)
        with torch.no_grad():
            model(probe)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                model(probe)
            seconds = (time.perf_counter() - start) / 3
        result[f"experts_{sparsity}"] = (sum(p.numel() for p in model.parameters()), seconds)
        del model
        gc.collect()
    return result


def run(args) -> list[dict]:
    widths = QUICK if args.quick else WIDTHS
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for model in args.models.split(","):
            for moe_layers in (1, 2):
                model_widths = widths[model] | ({"vocab_size": args.vocab} if args.vocab else {})
                spec = dict(model=model, moe_layers=moe_layers, widths=model_widths, workdir=workdir,
                            samples=args.samples, length=args.length, states=args.states, threads=args.threads)
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                      capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], file=sys.stderr)
    return rows


def table(rows: list[dict], args) -> str:
    by = {(r["model"], r["moe_layers"]): r for r in rows}
    tokens = args.samples * args.states * args.length
    lines = [
        f"Per MoE layer (2-layer model minus 1-layer model), bf16 weights, {args.samples} samples x "
        f"{args.states} states x {args.length} tokens = {tokens} calibration tokens, {args.threads} CPU "
        f"thread(s){f', vocabulary {args.vocab}' if args.vocab else ''}:", "",
        "| model | trajectory s / layer | trajectory peak MiB / layer | calibration (all experts) s / layer | "
        "calibration peak MiB / layer | params / MoE layer: all, -25%, -50% experts | forward s (2 MoE layers): "
        "all, -25%, -50% |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in args.models.split(","):
        one, two = by[(model, 1)], by[(model, 2)]

        def per_layer(key, index, one=one, two=two):
            return two[key][index] - one[key][index]

        params = " / ".join(f"{per_layer(f'experts_{s}', 0) / 1e6:.1f} M" for s in (0.0, 0.25, 0.5))
        forward = " / ".join(f"{two[f'experts_{s}'][1]:.2f}" for s in (0.0, 0.25, 0.5))
        lines.append(f"| {model} | {per_layer('trajectory', 0):.1f} | {per_layer('trajectory', 1) / 2**20:.0f} | "
                     f"{per_layer('calibration', 0):.1f} | {per_layer('calibration', 1) / 2**20:.0f} | {params} | "
                     f"{forward} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced widths (seconds)")
    parser.add_argument("--models", default="llada_moe,llada2_moe")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--states", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=None,
                        help="shrink the vocabulary (per-layer figures do not depend on it; forward times do)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    text = table(run(args), args)
    print(text)
    if not args.no_docs and not args.quick:
        command = "python benchmarks/experts.py " + " ".join(sys.argv[1:])
        section = f"{BEGIN}\n\n`{command.strip()}`\n\n{text}\n\n{END}"
        doc = DOCS.read_text()
        title = "## Mixture-of-experts DLMs: trajectory, all-experts calibration, expert pruning"
        doc = (doc[: doc.index(BEGIN)] + section + doc[doc.index(END) + len(END):]) if BEGIN in doc else \
            f"{doc.rstrip()}\n\n{title}\n\n{section}\n"
        DOCS.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
