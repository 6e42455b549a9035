"""``benchmarks/experts.py --quick`` (reduced widths) runs both MoE families through every phase it measures, so
the benchmark cannot rot while its run at the published widths is too slow for CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.published_moe import SKIP_REASON, requires_published_moe_code

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "experts.py"


@requires_published_moe_code
@pytest.mark.slow
def test_experts_quick_prints_one_row_per_model(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-docs", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| llada")]
    assert rows == ["llada_moe", "llada2_moe"]
    for line in result.stdout.splitlines():
        if line.startswith("| llada"):
            params = [float(p.strip().rstrip(" M")) for p in line.split("|")[6].split("/")]
            assert params[0] > params[1] > params[2], "removing experts removes parameters"


def test_skip_reason_is_clear():
    if "published-dlm-code" not in SKIP_REASON:
        pytest.fail(SKIP_REASON)
