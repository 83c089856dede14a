"""benchmarks/gpu.sh: the prepared GPU script, checked end to end with tiny models on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def gpu_sh(*args: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", "benchmarks/gpu.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


PARTS = ["stage-two-eager", "stage-two-compiled", "stage-one", "ceiling-one", "ceiling-two"]


def test_cpu_smoke_runs_every_part_with_the_gpu_runs_settings_and_prints_one_table(tmp_path):
    """Every part's code path with tiny sizes; stage two in bf16, compiled, with DALI's CPU graph."""
    done = gpu_sh("--cpu-smoke", out=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert summary["failed"] == {} and summary["parts"] == PARTS
    for part in ("stage_two_eager", "stage_two_compiled"):
        result = json.loads((tmp_path / f"gpu_{part}.json").read_text())
        s, (v,) = result["settings"], result["variants"]
        assert (s["precision"], s["loader"], v["compiled"]) == ("bf16", "dali", part.endswith("compiled"))
        assert v["steps_counted"] == v["steps"] == 6 and v["steps_measured"] == 2  # the step loop's own count
        assert v["syncs_per_step"] is None and v["mfu"] is None and result["card"] is None  # no CUDA here
        assert result["torch"] == torch.__version__
    values = {(r["part"], r["measure"].split(" (")[0]): r["value"] for r in summary["rows"]}
    assert values[("stage-one", "cache-targets efficiency")] > 0
    for part, name in (("stage-two-eager", "eager"), ("stage-two-compiled", "compiled")):
        assert values[(part, f"{name}, 6 steps: images/s")] > 0 and 0 <= values[(part, f"{name}, 6 steps: data wait")] < 1
    assert done.stdout.count("TEC benchmark on") == 1 and "compiled, 6 steps: images/s" in done.stdout
    ceiling = [m for p, m in values if p == "ceiling-one"]
    assert any(m.startswith("(b) writer, direct I/O int8/uint8 none") for m in ceiling)
    assert any(m.startswith("(c)") for m in ceiling)
    two = {r["measure"]: r["value"] for r in summary["rows"] if r["part"] == "ceiling-two"}
    for path in ("MAE online", "pil zstd", "dali zstd", "host side zstd", "host side none"):
        assert two[f"{path}, 1 workers"] > 0 and two[f"{path}, 1 workers: host CPU"] > 0
    assert 0 < two["drift pil (cpu) vs dali (cpu): feature rel RMS"] < 0.1


def test_a_failing_part_loses_no_other_part_nor_the_summary(tmp_path):
    """One part broken by a bogus argument, one by a 1 s limit, between two that work: each
    failure's one-line error is in its JSON, the others' JSON and the summary are there, and the
    script says so in its exit status."""
    done = gpu_sh("--cpu-smoke", out=tmp_path, GPU_SH_PARTS="ceiling-one stage-one ceiling-two stage-two-eager",
                  GPU_SH_BREAK="stage-one:arg stage-two-eager:limit")
    assert done.returncode == 1, done.stderr[-2000:]
    broken = json.loads((tmp_path / "gpu_stage_one.json").read_text())
    assert "unrecognized arguments: --bogus-argument-for-the-test" in broken["error"] and broken["exit_status"] == 2
    timed_out = json.loads((tmp_path / "gpu_stage_two_eager.json").read_text())
    assert timed_out["error"].startswith("ran past its limit of 1 s") and "\n" not in timed_out["error"]
    for part in ("ceiling_one", "ceiling_two"):
        assert json.loads((tmp_path / f"gpu_{part}.json").read_text())["rows"]
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert set(summary["failed"]) == {"stage-one", "stage-two-eager"}
    assert {r["part"] for r in summary["rows"]} == {"ceiling-one", "ceiling-two"}
    assert "stage-one           FAILED: " in done.stdout and "stage-two-eager     FAILED: ran past" in done.stdout


def test_dry_prints_each_part_and_limits_within_540_s_in_the_order_of_need_and_gpu_mode_needs_a_gpu(tmp_path):
    dry = gpu_sh("--dry", out=tmp_path)
    lines = dry.stdout.strip().splitlines()
    assert dry.returncode == 0 and len(lines) == 6
    assert [line.split(" (")[0] for line in lines[:5]] == PARTS
    assert "--variants cache-eager" in lines[0] and "--variants cache-compiled" in lines[1]
    for line in lines[:2]:
        assert all(f in line for f in ("stage_two_run.py", "--device cuda", "--precision bf16", "--arch vit_base"))
    assert "cache_targets.py" in lines[2] and "stage_one_ceiling.py" in lines[3] and "stage_two_ceiling.py" in lines[4]
    limits = [int(line.split(" (")[1].split(" s)")[0]) for line in lines[:5]]
    assert lines[5].endswith(f"= {sum(limits)} s") and sum(limits) <= 540
    assert gpu_sh("--bogus", out=tmp_path).returncode == 2
    assert gpu_sh("--cpu-smoke", "--dry", out=tmp_path).returncode == 2
    assert gpu_sh("--dry", out=tmp_path, GPU_SH_PARTS="nonsense").returncode == 2
    if not torch.cuda.is_available():
        refused = gpu_sh(out=tmp_path)
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr


@pytest.mark.parametrize("name, card, peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12), ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12), ("NVIDIA H200", "H200 SXM", 989e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12), ("NVIDIA L40S", "L40S", 362e12), ("NVIDIA L40", "L40", 181e12),
    ("NVIDIA L4", "L4", 121e12), ("NVIDIA A10", "A10", 125e12),
    ("NVIDIA A10G", None, None), ("NVIDIA GH200 480GB", None, None), ("Tesla V100-SXM2-16GB", None, None)])
def test_mfu_divides_by_the_peak_of_the_card_found(name, card, peak):
    """Each known card gets its own datasheet peak (A10 is not A100 nor A10G, L4 is not L40); an
    unknown card gets none."""
    from benchmarks.cards import card_of

    found = card_of(name)
    assert (found.name, found.bf16_flops) == (card, peak) if card else found is None
    if found:
        assert "datasheet" in found.source


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


def test_pinned_memory_counts_every_byte_of_a_batch_at_the_recipes_shapes(tmp_path):
    """benchmarks/pinned_memory.py on a few images: the targets' bytes per view are ViT-B/16's at
    int8 / uint8 (L x C features, (k+1) x H x L attention), the JPEG bytes are the files', and the
    batches alive stay within data.prefetch_batches + 2."""
    out = tmp_path / "pinned.json"
    done = subprocess.run([sys.executable, "benchmarks/pinned_memory.py", "--images", "8", "--batch", "8",
                           "--batches", "8", "--workers", "3", "--prefetch", "2", "--step-s", "0.02", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    per_view = r["bytes_per_view"]
    assert per_view["feat"] == 196 * 768 and per_view["attn"] == 16 * 12 * 196 and per_view["mask_noise"] == 196 * 4
    assert 10e3 < per_view["files"] < 200e3  # the synthetic ~500x375 JPEGs
    assert 1 <= r["batches_alive_most"] <= r["batches_alive_bound"] == 4
    m = r["measured"]
    assert m["batch_bytes"] == m["bytes_per_view"] * 512 and m["pinned_per_node_bound"] == m["batch_bytes"] * 4 * 8
