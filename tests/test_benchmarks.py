"""benchmarks/gpu.sh: the prepared GPU script, checked end to end with tiny models on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def gpu_sh(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "benchmarks/gpu.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cpu_smoke_runs_both_stages_and_prints_one_table(tmp_path):
    done = gpu_sh("--cpu-smoke", out=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    values = {r["measure"].split(" (")[0]: r["value"] for r in summary["rows"]}
    assert values["cache-targets efficiency"] > 0 and values["online / cache"] > 0
    assert values["loader targets only views s 0w"] > 0
    assert done.stdout.count("TEC benchmark on") == 1 and "online / cache" in done.stdout


def test_dry_prints_the_two_commands_and_gpu_mode_needs_a_gpu(tmp_path):
    dry = gpu_sh("--dry", out=tmp_path)
    lines = dry.stdout.strip().splitlines()
    assert dry.returncode == 0 and len(lines) == 2
    assert "cache_targets.py" in lines[0] and "--device cuda" in lines[0] and "train_step.py" in lines[1]
    assert gpu_sh("--bogus", out=tmp_path).returncode == 2
    if not torch.cuda.is_available():
        refused = gpu_sh(out=tmp_path)
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr
