"""torchrun with two CPU ranks (gloo): each rank calibrates on its shard, statistics are reduced across ranks,
and the masks equal a single-process run on all the data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from safetensors.torch import load_file

from conftest import calibration_dataset, load_model
from sink_modifier import SinkAwarePruningModifier

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("method, pipeline", [("wanda", "independent"), ("sparsegpt", "diffusion")])
def test_two_ranks_prune_like_one(dlm_path, tmp_path, method, pipeline):
    dataset_dir = tmp_path / "data"
    calibration_dataset(dlm_path).save_to_disk(dataset_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), str(dlm_path), str(dataset_dir), method, pipeline, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["local_samples"] for r in ranks] == [4, 4]  # each rank calibrated on its half of the 8 samples

    model = load_model(dlm_path)
    modifier = SinkAwarePruningModifier(sparsity=0.5, method=method)
    oneshot(model=model, dataset=calibration_dataset(dlm_path), recipe=[modifier], pipeline=pipeline,
            shuffle_calibration_samples=False)
    single = {n: p.detach() for n, p in model.named_parameters() if "layers" in n}
    distributed = load_file(tmp_path / "weights.safetensors")
    for name, weight in single.items():
        differ = ((weight == 0) != (distributed[name] == 0)).float().mean().item()
        if method == "wanda":  # sum of squares: only the summation order differs, and no mask moves
            assert differ == 0, (name, differ)
        else:  # OBS updates amplify float32 summation-order differences of the Hessian into a few mask flips
            assert differ < 0.01, (name, differ)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_samples"] == modifier.report["num_samples"] == 8


@pytest.mark.parametrize("pipeline", ["independent", "diffusion"])
@pytest.mark.slow
def test_two_ranks_shrink_like_one(dlm_path, tmp_path, pipeline):
    """Structured statistics are reduced across ranks: both ranks keep the units one process keeps."""
    from sink_modifier import SinkAwareStructuredPruningModifier

    dataset_dir = tmp_path / "data"
    calibration_dataset(dlm_path).save_to_disk(dataset_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), str(dlm_path), str(dataset_dir), "structured", pipeline, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["local_samples"] for r in (0, 1)] == [4, 4]
    model = load_model(dlm_path)
    oneshot(model=model, dataset=calibration_dataset(dlm_path), pipeline=pipeline,
            recipe=[SinkAwareStructuredPruningModifier(sparsity=0.5, head_sparsity=0.5)],
            shuffle_calibration_samples=False)
    single = {n: p.detach() for n, p in model.named_parameters() if "layers" in n}
    distributed = load_file(tmp_path / "weights.safetensors")
    for name, weight in single.items():
        assert torch.equal(weight, distributed[name]), name  # the same units kept, sliced from the same weights

