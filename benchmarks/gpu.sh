#!/usr/bin/env bash
# One-GPU benchmark of both stages, ViT-B/16 at 224 px (stage one: fp16 autocast, its CUDA default;
# stage two: bf16 autocast); prints ONE table. Each part runs under a hard time limit; the limits
# add up to 8 minutes (--dry prints them).
#
#   stage one: views/s of `cache-targets` (DataLoader + base forward + target enhancement + shard
#              encode + write, int8/uint8 storage) over synthetic JPEGs in a temp dir, against the
#              bare DataLoader + base forward loop on the same data (benchmarks/cache_targets.py);
#   stage two: `run_train` itself for 200 steps from a V=2 cache of 4,096 images (loader workers
#              living across epochs), eager and compiled, and online with the base in the step:
#              images/s, data-wait fraction, MFU, device syncs per step (benchmarks/stage_two_run.py);
#   stage one's ceiling: the host side behind an instant forward, targets encoded on the GPU, 1/4
#              writer threads, zstd and uncompressed (benchmarks/stage_one_ceiling.py);
#   stage two's ceiling: MAE's loader, the pil loader, DALI rendering on the GPU (mixed) and the
#              host side behind an instant step, 4 and 12 workers, and the targets' drift between
#              DALI's CPU and GPU renderings (benchmarks/stage_two_ceiling.py).
#
# Usage:  bash benchmarks/gpu.sh              # needs one CUDA GPU; at most 8 minutes
#         bash benchmarks/gpu.sh --dry        # print the commands and the time limits, run nothing
#         bash benchmarks/gpu.sh --cpu-smoke  # the same pipeline with tiny models on the CPU (script check)
# JSON goes to $OUT if set, else benchmarks/results/ (smoke runs: a temp dir unless $OUT is set).
# PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --dry) MODE=dry ;;
  --cpu-smoke) MODE=smoke ;;
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/!p}' "$0"; exit 0 ;;
  *) echo "error: unknown argument '$1' (expected --dry, --cpu-smoke or nothing)" >&2; exit 2 ;;
esac

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [[ -n "${OUT:-}" ]]; then RES=$OUT
elif [[ $MODE == smoke ]]; then RES=$(mktemp -d -t tec-gpu-smoke-XXXX)
else RES=benchmarks/results
fi
mkdir -p "$RES"
LOG=$RES/gpu_bench.log

if [[ $MODE == smoke ]]; then
  # Tiny and on the CPU: proves the script, the flags and the table, not the speed.
  STAGE1=("$PY" benchmarks/cache_targets.py --device cpu --arch vit_tiny_patch16_224 --img-size 64 --images 16
          --views 2 --batch 8 --workers 0 --shard 8 --k-max 5 --feat-dtype int8 --attn-dtype uint8 --rss-images ""
          --out "$RES/gpu_cache_targets.json")
  STAGE2=("$PY" benchmarks/stage_two_run.py --device cpu --arch vit_tiny_patch16_224 --base-arch vit_tiny_patch16_224
          --img-size 64 --images 32 --images-per-shard 16 --batch 4 --k 5 --steps 6 --online-steps 4 --log-every 2
          --workers 1 --out "$RES/gpu_stage_two.json")
  CEILING=("$PY" benchmarks/stage_one_ceiling.py --device cpu --archs tiny --storage int8/uint8 --img-size 32
           --images 16 --views 2 --batch 8 --shard-images 8 --writer-shards 2 --writer-threads 1 --record-images 1
           --k-max 5 --compress zstd none --out "$RES/gpu_stage_one_ceiling.json")
  CEILING2=("$PY" benchmarks/stage_two_ceiling.py --device cpu --img-size 32 --images 16 --views 2 --batch 4
            --shard-images 8 --k-max 3 --epochs 2 --workers 1 --out "$RES/gpu_stage_two_ceiling.json")
  LIMIT1=120; LIMIT2=240; LIMIT3=120; LIMIT4=120
else
  # ViT-B/16 base, 512 images x 2 views = 1024 views per pass (3 passes: bare, cache-targets, bare).
  STAGE1=("$PY" benchmarks/cache_targets.py --device cuda --arch vit_base_patch16_224 --img-size 224 --images 512
          --views 2 --batch 256 --workers 12 --shard 256 --k-max 15 --feat-dtype int8 --attn-dtype uint8
          --rss-images "" --out "$RES/gpu_cache_targets.json")
  # ViT-B/16 new model + ViT-B/16 base, per-GPU batch 256 (the configs use 512 = 4096 / 8 GPUs; 256 keeps
  # the online variants' memory safe on one card), bf16, 200 steps per cache variant, 50 online.
  STAGE2=("$PY" benchmarks/stage_two_run.py --device cuda --precision bf16 --arch vit_base_patch16_224
          --base-arch vit_base_patch16_224 --img-size 224 --images 4096 --views 2 --batch 256 --k 15 --steps 200
          --online-steps 50 --log-every 25 --workers 12 --out "$RES/gpu_stage_two.json")
  # The host side with the GPU as the compute device.
  CEILING=("$PY" benchmarks/stage_one_ceiling.py --device cuda --archs vit_b16 --images 256 --writer-threads 1 4 --io direct --encode device
           --compress zstd none --repeats 2 --out "$RES/gpu_stage_one_ceiling.json")
  # Stage two's host side with DALI decoding on the GPU; 192 photo JPEGs, ViT-B/16 int8/uint8 targets.
  CEILING2=("$PY" benchmarks/stage_two_ceiling.py --device cuda --images 192 --batch 64 --epochs 2 --workers 4 12
            --out "$RES/gpu_stage_two_ceiling.json")
  LIMIT1=110; LIMIT2=240; LIMIT3=75; LIMIT4=55
fi

if [[ $MODE == dry ]]; then
  printf "%q " "${STAGE1[@]}"; echo
  printf "%q " "${STAGE2[@]}"; echo
  printf "%q " "${CEILING[@]}"; echo
  printf "%q " "${CEILING2[@]}"; echo
  echo "time limits: stage one ${LIMIT1} s + stage two ${LIMIT2} s + ceiling ${LIMIT3} s + stage two's ceiling ${LIMIT4} s = $((LIMIT1 + LIMIT2 + LIMIT3 + LIMIT4)) s"
  exit 0
fi

if [[ $MODE == gpu ]]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: benchmarks/gpu.sh needs a CUDA GPU and $PY's torch sees none (nvidia-smi: $(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -1 || echo 'not found')); use --cpu-smoke to check the script on a CPU" >&2
    exit 2
  fi
fi

run() {  # run LIMIT NAME CMD...: output to the log; on failure show its tail and stop
  local limit=$1 name=$2; shift 2
  echo "== $name: $*" >>"$LOG"
  if ! timeout "$limit" "$@" >>"$LOG" 2>&1; then
    echo "error: $name failed or ran past ${limit}s; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
}

: >"$LOG"
start=$SECONDS
run "$LIMIT1" "stage one" "${STAGE1[@]}"
run "$LIMIT2" "stage two" "${STAGE2[@]}"
run "$LIMIT3" "stage one's ceiling" "${CEILING[@]}"
run "$LIMIT4" "stage two's ceiling" "${CEILING2[@]}"

"$PY" - "$RES" "$((SECONDS - start))" <<'EOF'
import json, sys
from pathlib import Path

res, seconds = Path(sys.argv[1]), int(sys.argv[2])
s1 = json.loads((res / "gpu_cache_targets.json").read_text())
s2 = json.loads((res / "gpu_stage_two.json").read_text())
a1, t1 = s1["args"], s1["throughput"]
rows = [
    ("stage one", f"bare DataLoader + base forward ({a1['arch']}, batch {a1['batch']})", t1["bare_views_per_s"], "views/s"),
    ("stage one", "cache-targets, excl. setup", t1["cache_views_per_s"], "views/s"),
    ("stage one", "cache-targets efficiency (cache / bare)", t1["efficiency"], ""),
    ("stage one", f"bytes per view ({a1['feat_dtype']}/{a1['attn_dtype']})", t1["bytes_per_view"] / 1e3, "KB"),
    ("stage one", "writer MB/s while writing", t1["write_mb_per_s"], "MB/s"),
]
for v in s2["variants"]:
    name = f"{v['source']} {'compiled' if v['compiled'] else 'eager'}, {v['steps']} steps"
    rows.append(("stage two", f"{name}: images/s", v["images_per_s"], "images/s"))
    rows.append(("stage two", f"{name}: data wait", v["data_wait"], "fraction"))
    if v["mfu"] is not None:
        rows.append(("stage two", f"{name}: MFU", v["mfu"], "fraction"))
    if v["syncs_per_step"] is not None:
        rows.append(("stage two", f"{name}: device syncs", v["syncs_per_step"], "per step"))
ceiling = res / "gpu_stage_one_ceiling.json"
for row in json.loads(ceiling.read_text()).get("rows", []) if ceiling.is_file() else []:
    what = " ".join(str(row[k]) for k in ("storage", "compress") if k in row)
    threads = f", {row['threads']} writer thread(s)" if "threads" in row else ""
    rows.append(("ceiling", f"{row['row']} {what}{threads}".strip(), row["views_per_s"], "views/s"))
ceiling2 = res / "gpu_stage_two_ceiling.json"
two = json.loads(ceiling2.read_text()) if ceiling2.is_file() else {"rows": [], "drift": []}
for row in two["rows"]:
    chunks = f" {row['compress']}" if row["compress"] else ""
    rows.append(("ceiling 2", f"{row['path']}{chunks}, {row['workers']} workers", row["views_per_s"], "views/s"))
    rows.append(("ceiling 2", f"{row['path']}{chunks}, {row['workers']} workers: host CPU", row["cpu_us"], "us/view"))
for d in two["drift"]:
    rows.append(("ceiling 2", f"drift {d['renderers']}: feature rel RMS", d["feat_rel_rms"], "fraction"))
    rows.append(("ceiling 2", f"drift {d['renderers']}: attention KL", d["attn_kl"], ""))
print(f"TEC benchmark on {s1['device']} ({seconds} s; logs and JSON in {res})")
w = max(len(r[1]) for r in rows)
print(f"{'stage':<10} {'measure':<{w}} {'value':>12} unit")
print("-" * (w + 30))
for stage, name, value, unit in rows:
    print(f"{stage:<10} {name:<{w}} {value:>12.3f} {unit}")
summary = {"seconds": seconds, "device": s1["device"], "rows": [dict(zip(("stage", "measure", "value", "unit"), r)) for r in rows]}
(res / "gpu_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
EOF
