"""Tab. 6 from one cache: an ablation YAML is a config file layered over a full config, and the
sweep's result is one table of final losses, or of top-1 after fine-tuning."""
from __future__ import annotations

from pathlib import Path


def ablation_title(path: Path) -> str:
    """A YAML's first comment line names its Tab. 6 row."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return path.stem


def row_name(row: dict) -> str:
    """A row's name in the tables; a row that trained the same settings as another says which."""
    return f"{row['name']} = {row['same_as'].split('_')[0]}" if row.get("same_as") else row["name"]


def format_rows(rows: list[dict]) -> str:
    """A plain-text table: row, steps, loss, L_fea, L_att (or why it was refused)."""
    head = f"{'ablation':<28} {'Tab. 6 row':<40} {'steps':>6} {'loss':>9} {'L_fea':>9} {'L_att':>9}"
    lines = [head, "-" * len(head)]
    fmt = lambda v: f"{v:9.4f}" if isinstance(v, float) else f"{'-':>9}"  # noqa: E731
    for r in rows:
        if r["status"] != "done":
            lines.append(f"{r['name']:<28} {r['title'][:40]:<40} {r['status']}")
        else:
            lines.append(f"{row_name(r):<28} {r['title'][:40]:<40} {r['step']:>6} {fmt(r.get('loss'))} "
                         f"{fmt(r.get('loss_fea'))} {fmt(r.get('loss_att'))}")
    return "\n".join(lines)


def format_finetune_rows(rows: list[dict]) -> str:
    """The paper's Tab. 6 layout: row, settings, top-1 after fine-tuning (and the best epoch's, top-5)."""
    head = f"{'ablation':<28} {'settings (Tab. 6 row)':<40} {'top-1':>7} {'best':>7} {'top-5':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"{r['name']:<28} {r['title'][:40]:<40} {r['status']}")
        else:
            lines.append(f"{row_name(r):<28} {r['title'][:40]:<40} {r['top1']:7.2f} {r['best_top1']:7.2f} {r['top5']:7.2f}")
    return "\n".join(lines)
