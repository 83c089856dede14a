"""The encoder export of a training run (Sec. 2.2, Tab. 7), from its checkpoint (`train.checkpoint`).

After training only the encoder is kept. The input adapter is a constant at inference
(``T' = MLP(T)`` depends on no input), so it is folded into the cls token; encoder adapters
and decoders are dropped. The result is a plain timm ViT in safetensors, with metadata
``{"format": EXPORT_FORMAT, "arch": <ViTArch json>}``, that `models.base.load_base_model`
accepts as the base model of a next TEC round (Tab. 7).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .config import ViTArch
from .errors import UserError
from .files import atomic_path
from .models.base import EXPORT_FORMAT
from .models.tec import TECModel, encoder_state
from .places import CHECKPOINT
from .train.checkpoint import atomic_save, load_run_model

EXPORT_NAME = "encoder.safetensors"
EXPORT_FORMATS = {"timm": EXPORT_NAME, "mae": "encoder_mae.pth"}  # --format: the default file name of each


# ---------------------------------------------------------------- export
def export_model(model: TECModel, arch: ViTArch, out: Path) -> Path:
    """Write the folded encoder to `out` (safetensors, atomically) with the export metadata."""
    from safetensors.torch import save

    out = Path(out)
    meta = {"format": EXPORT_FORMAT, "arch": json.dumps(asdict(arch))}
    data = save(encoder_state(model.float().eval()), metadata=meta)  # bytes: a failed write is an OSError
    with atomic_path(out, "the encoder export") as tmp:
        tmp.write_bytes(data)
    return out


def export_mae(model: TECModel, out: Path) -> Path:
    """Write the folded encoder as MAE's ``main_finetune.py --finetune`` reads it: a torch file
    ``{"model": state_dict}``. MAE's ViT names its weights as timm's does (patch_embed.proj.weight,
    cls_token, pos_embed [1, 1+L, C] with the cls position, blocks.N.*, norm.weight), so the state
    dict is `encoder_state`'s; MAE drops norm.* itself under global pooling (fc_norm)."""
    atomic_save({"model": encoder_state(model.float().eval())}, Path(out), "the MAE-layout export")
    return Path(out)


def is_export(path: Path) -> bool:
    """Whether `path` is a safetensors file `export` wrote (its metadata says so). The MAE layout is
    MAE's own ``{"model": ...}`` with no room for a mark: only its default place is taken as ours."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == EXPORT_FORMAT
    except Exception:  # safetensors raises its own error types: anything unreadable is not ours
        return False


def check_out(out: Path, default: Path) -> None:
    """Refuse an --out that would replace a file export did not write: a folder, or an existing
    file that is neither the run's own default export nor an export (`is_export`)."""
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; give the file to write (e.g. {out / default.name})")
    if out.exists() and out.resolve() != default.resolve() and not is_export(out):
        raise UserError(f"--out {out}: an existing file that is not a tec-pipeline export; export replaces only its "
                        f"own files: choose another --out")


def export_run(run_dir: str | Path, out: Optional[str | Path] = None, fmt: str = "timm") -> Path:
    """Export a run's last checkpoint: ``timm`` safetensors (default ``RUN/encoder.safetensors``) or
    ``mae`` ``{"model": state_dict}`` (default ``RUN/encoder_mae.pth``)."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(EXPORT_FORMATS)}")
    run_dir = Path(run_dir)
    default = run_dir / EXPORT_FORMATS[fmt]
    out = Path(out) if out is not None else default
    check_out(out, default)
    model, arch = load_run_model(run_dir / CHECKPOINT)
    if fmt == "mae":
        return export_mae(model, out)
    return export_model(model, arch, out)
