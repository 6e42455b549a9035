"""One rank of the multi-process calibration test (launched by torchrun from test_distributed.py)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import load_from_disk
from llmcompressor import oneshot
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import sink_modifier.calibration.pipeline
import sink_modifier.modifiers.sink_rows
from sink_modifier import SinkAwarePruningModifier, SinkAwareStructuredPruningModifier


def main(model_path: str, dataset_path: str, method: str, pipeline: str, output: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    modifier = (SinkAwareStructuredPruningModifier(sparsity=0.5, head_sparsity=0.5) if method == "structured"
                else SinkAwarePruningModifier(sparsity=0.5, method=method))
    # Each rank passes its own shard (llm-compressor 0.14's automatic split of a shared dataset hands every
    # rank the first shard; see docs/failure-modes.md).
    dataset = load_from_disk(dataset_path).shard(num_shards=dist.get_world_size(), index=rank, contiguous=True)
    local_samples = []  # this rank's share of the calibration set, as its trajectory phase saw it
    for module in (sink_modifier.modifiers.sink_rows, sink_modifier.calibration.pipeline):
        measure = module.run_trajectory
        module.run_trajectory = lambda model, family, samples, *a, measure=measure, **k: (
            local_samples.append(len(samples)) or measure(model, family, samples, *a, **k))
    oneshot(model=model, dataset=dataset, recipe=[modifier], pipeline=pipeline, shuffle_calibration_samples=False)
    report = modifier.report
    if rank == 0:
        weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if "layers" in n}
        save_file(weights, os.path.join(output, "weights.safetensors"))
        with open(os.path.join(output, "report.json"), "w") as f:
            json.dump(report, f)
    with open(os.path.join(output, f"rank{rank}.json"), "w") as f:
        json.dump({"local_samples": sum(local_samples), "world_size": dist.get_world_size()}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
