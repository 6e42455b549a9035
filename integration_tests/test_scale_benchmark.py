"""``benchmarks/scale.py --quick`` (1 layer, reduced width) runs every model and pipeline of the real grid through
the CLI's path, so the benchmark cannot rot while its full run is too slow for CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_scale_quick_prints_both_tables(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-docs", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and " s " not in line]
    measured = [r for r in rows if r.split("|")[2].strip() == "1"]  # the per-run table: one layer each
    assert {tuple(c.strip() for c in r.split("|")[1:4:2]) for r in measured} == {
        ("llada", "default"), ("llada", "diffusion"), ("dream", "default"), ("dream", "diffusion"),
        ("diffusion_gemma", "diffusion")}
    assert "one H100" in result.stdout
    assert (tmp_path / "results.json").exists()
