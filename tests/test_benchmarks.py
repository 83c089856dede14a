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
    assert values["cache-targets efficiency"] > 0
    for variant in ("cache eager, 6 steps", "cache compiled, 6 steps", "online eager, 4 steps",
                    "online compiled, 4 steps"):  # run_train itself, each variant
        assert values[f"{variant}: images/s"] > 0 and 0 <= values[f"{variant}: data wait"] < 1
    assert done.stdout.count("TEC benchmark on") == 1 and "cache compiled, 6 steps: images/s" in done.stdout
    ceiling = [r["measure"] for r in summary["rows"] if r["stage"] == "ceiling"]
    assert any(m.startswith("(b) writer, direct I/O int8/uint8 none") for m in ceiling) and any(m.startswith("(c)") for m in ceiling)
    two = {r["measure"]: r["value"] for r in summary["rows"] if r["stage"] == "ceiling 2"}
    for path in ("MAE online", "pil zstd", "dali zstd", "host side zstd", "host side none"):
        assert two[f"{path}, 1 workers"] > 0 and two[f"{path}, 1 workers: host CPU"] > 0
    assert 0 < two["drift pil (cpu) vs dali (cpu): feature rel RMS"] < 0.1


def test_dry_prints_the_commands_and_a_budget_of_at_most_8_minutes_and_gpu_mode_needs_a_gpu(tmp_path):
    dry = gpu_sh("--dry", out=tmp_path)
    lines = dry.stdout.strip().splitlines()
    assert dry.returncode == 0 and len(lines) == 5
    assert "cache_targets.py" in lines[0] and "--device cuda" in lines[0]
    assert "stage_two_run.py" in lines[1] and "--steps 200" in lines[1] and "--images 4096" in lines[1]
    assert "--views 2" in lines[1] and "stage_one_ceiling.py" in lines[2] and "--device cuda" in lines[2]
    assert "stage_two_ceiling.py" in lines[3] and "--device cuda" in lines[3]
    limits = [int(part.split()[-2]) for part in lines[4].split("=")[0].split("+")]
    assert len(limits) == 4 and sum(limits) == int(lines[4].split("=")[1].split()[0]) <= 8 * 60
    assert gpu_sh("--bogus", out=tmp_path).returncode == 2
    if not torch.cuda.is_available():
        refused = gpu_sh(out=tmp_path)
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr


def test_stage_one_ceiling_smoke_writes_every_row(tmp_path):
    """benchmarks/stage_one_ceiling.py at tiny sizes: every row measured, the bytes the writer
    counted are the bytes of the shard files on disk, and (c) is held to its goal."""
    out = tmp_path / "ceiling.json"
    done = subprocess.run([sys.executable, "benchmarks/stage_one_ceiling.py", "--archs", "tiny", "--images", "8",
                           "--views", "2", "--batch", "8", "--img-size", "32", "--k-max", "3", "--shard-images", "4",
                           "--writer-shards", "2", "--record-images", "1", "--dir", str(tmp_path), "--out", str(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = [r["row"] for r in rows]
    writers = [r for r in rows if r["row"].startswith("(b)")]  # 2 storages x 2 encodings x 2 I/O x 1, 2 threads
    assert len(writers) == 16 and names.count("disk: write + fsync") == 2
    assert sorted({(r["row"], r["encode"], r["io"]) for r in writers}) == [
        ("(b) host side, buffered I/O", "instant", "buffered"), ("(b) host side, direct I/O", "instant", "direct"),
        ("(b) writer, buffered I/O", "device", "buffered"), ("(b) writer, direct I/O", "device", "direct")]
    assert {"(a) loader, 1 worker", "(c) whole loop, 1 loader worker", "(c) host side, 1 loader worker",
            "(d) stage two loader, 1 worker"} <= set(names)
    assert all(r["views_per_s"] > 0 for r in rows)
    same = lambda r: (r["storage"], r["io"], r["threads"])  # noqa: E731
    by_encode = {e: {same(r): r["bytes"] for r in writers if r["encode"] == e} for e in ("device", "instant")}
    assert by_encode["device"] == by_encode["instant"]  # the replayed encoding writes the same shards
    for r in writers:
        assert all(run["bytes"] == run["data_file_bytes"] > 0 for run in r["runs"])
        assert r["mb_per_s"] > 0 and r["writer_cpu_us_per_view"] > 0
    assert "goal" in next(r for r in rows if r["row"].startswith("(c)"))
    assert "stage-one ceiling on" in done.stdout and list(tmp_path.iterdir()) == [out]  # temp caches removed
