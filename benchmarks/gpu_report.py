"""benchmarks/gpu.sh's bookkeeping: a failed part's one-line error written into its JSON, and the
summary table of whatever parts finished (naming those that did not).

    python benchmarks/gpu_report.py failed JSON PART EXIT_STATUS LIMIT_S LOG
    python benchmarks/gpu_report.py summary RESULTS_DIR SECONDS PART ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

TIMED_OUT = (124, 137)  # timeout(1)'s status after TERM, and a KILL's


def why_failed(status: int, limit: int, log: Path) -> str:
    """One line: the limit it ran past, or the last line the part printed (a traceback's last line
    is its error)."""
    if status in TIMED_OUT:
        return f"ran past its limit of {limit} s (exit {status})"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip() and not line.startswith("== ")] if log.is_file() else []
    return f"{lines[-1][:300] if lines else 'it printed nothing'} (exit {status})"


def mark_failed(path: Path, part: str, status: int, limit: int, log: Path) -> None:
    """Write the part's error into its JSON, keeping what the part wrote before it failed (a run
    cut short may leave the rows it finished)."""
    try:
        result = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:  # cut off while writing: the error replaces it
        result = {}
    result.update(part=part, error=why_failed(status, limit, log), exit_status=status, limit_s=limit)
    path.write_text(json.dumps(result, indent=1) + "\n")


def stage_two_rows(r: dict) -> list[tuple]:
    rows = []
    for v in r.get("variants", []):
        name = f"{'compiled' if v['compiled'] else 'eager'}, {v['steps']} steps"
        rows += [(f"{name}: images/s", v["images_per_s"], "images/s"), (f"{name}: data wait", v["data_wait"], "fraction")]
        if v["mfu"] is not None:
            rows.append((f"{name}: MFU", v["mfu"], "fraction"))
        if v["syncs_per_step"] is not None:
            rows += [(f"{name}: device syncs in a step", v["syncs_per_step"], "per step"),
                     (f"{name}: device syncs at records + checkpoint", v["syncs_at_records"], "in all")]
    return rows


def stage_one_rows(r: dict) -> list[tuple]:
    a, t = r["args"], r["throughput"]
    return [(f"bare DataLoader + base forward ({a['arch']}, batch {a['batch']})", t["bare_views_per_s"], "views/s"),
            ("cache-targets, excl. setup", t["cache_views_per_s"], "views/s"),
            ("cache-targets efficiency (cache / bare)", t["efficiency"], ""),
            (f"bytes per view ({a['feat_dtype']}/{a['attn_dtype']})", t["bytes_per_view"] / 1e3, "KB"),
            ("writer MB/s while writing", t["write_mb_per_s"], "MB/s")]


def ceiling_one_rows(r: dict) -> list[tuple]:
    rows = []
    for row in r.get("rows", []):
        what = " ".join(str(row[k]) for k in ("storage", "compress") if k in row)
        threads = f", {row['threads']} writer thread(s)" if "threads" in row else ""
        rows.append((f"{row['row']} {what}{threads}".strip(), row["views_per_s"], "views/s"))
    return rows


def ceiling_two_rows(r: dict) -> list[tuple]:
    rows = []
    for row in r.get("rows", []):
        name = f"{row['path']}{' ' + row['compress'] if row['compress'] else ''}, {row['workers']} workers"
        rows += [(name, row["views_per_s"], "views/s"), (f"{name}: host CPU", row["cpu_us"], "us/view")]
    for d in r.get("drift", []):
        rows += [(f"drift {d['renderers']}: feature rel RMS", d["feat_rel_rms"], "fraction"),
                 (f"drift {d['renderers']}: attention KL", d["attn_kl"], "")]
    return rows


ROWS = {"stage-two-eager": stage_two_rows, "stage-two-compiled": stage_two_rows, "stage-one": stage_one_rows,
        "ceiling-one": ceiling_one_rows, "ceiling-two": ceiling_two_rows}


def read_part(res: Path, part: str) -> tuple[Optional[dict], Optional[str]]:
    """(the part's result, None) or (None, why it has none)."""
    path = res / f"gpu_{part.replace('-', '_')}.json"
    if not path.is_file():
        return None, "no JSON (it did not run)"
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return None, f"{path.name} is not JSON ({err})"
    return (None, result["error"]) if "error" in result else (result, None)


def summary(res: Path, seconds: int, parts: list[str]) -> dict:
    """Print one table of every finished part's rows and a line per failed part; write gpu_summary.json."""
    rows, failed, device = [], {}, None
    for part in parts:
        result, why = read_part(res, part)
        if result is None:
            failed[part] = why
            continue
        device = device or (result.get("card") and f"{result['card']} (torch {result['torch']}, CUDA {result['cuda']})")
        try:
            rows += [(part, *row) for row in ROWS[part](result)]
        except (KeyError, TypeError) as err:  # a partial JSON: say so rather than lose the other parts
            failed[part] = f"its JSON lacks {err}"
    print(f"TEC benchmark on {device or 'the CPU'} ({seconds} s; logs and JSON in {res})")
    w = max([len(r[1]) for r in rows] + [20])
    print(f"{'part':<19} {'measure':<{w}} {'value':>12} unit")
    print("-" * (w + 40))
    for part, name, value, unit in rows:
        print(f"{part:<19} {name:<{w}} {value:>12.3f} {unit}")
    for part, why in failed.items():
        print(f"{part:<19} FAILED: {why}")
    out = {"seconds": seconds, "device": device, "parts": parts, "failed": failed,
           "rows": [dict(zip(("part", "measure", "value", "unit"), r)) for r in rows]}
    (res / "gpu_summary.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["failed"] and len(argv) == 6:
        mark_failed(Path(argv[1]), argv[2], int(argv[3]), int(argv[4]), Path(argv[5]))
    elif argv[:1] == ["summary"] and len(argv) >= 3:
        summary(Path(argv[1]), int(argv[2]), argv[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
