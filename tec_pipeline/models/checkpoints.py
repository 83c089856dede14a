"""Checkpoint files as the base families release them: read safely, find the encoder, unwrap it.

Reading never runs pickled code: ``torch.load(weights_only=True)`` with one class allowed beyond
tensors and containers, ``argparse.Namespace``, in which training checkpoints (MAE, DINO, iBOT,
DeiT, TEC) keep their command line as ``args``. What comes out is the encoder's state dict in its
family's own naming; turning that into a timm ViT's naming (DINOv2, CLIP, ...) is timm's
conversion, in `models.base`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from ..errors import UserError
from ..places import CHECKPOINT

EXPORT_FORMAT = "tec-pipeline-export"
# Where a family keeps its encoder in the file, first match wins: EMA weights before online ones
# (DINO / iBOT teacher, I-JEPA target encoder), then MAE / DeiT / TEC ``model``, OpenCLIP's and
# iBOT's ``state_dict``, and a student only where no teacher was saved.
ENTRIES = ("teacher", "target_encoder", "model", "state_dict", "student")
# Wrappers around the encoder inside the entry: the DINO / iBOT multi-crop wrapper, an encoder
# submodule (a tec-pipeline run's TECModel). DDP's ``module.`` is taken off before either.
SUBMODULES = ("backbone.", "encoder.")
# An input adapter ``T' = MLP(T)`` saved beside the encoder: its key prefix, the cls token it maps.
INPUT_ADAPTERS = (("cls_token_mlp.", "cls_token"),  # the authors' TECViT
                  ("input_adapter.mlp.", "encoder.cls_token"))  # a tec-pipeline run's checkpoint.pt
MLP_KEYS = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


class CheckpointError(UserError):
    """A checkpoint that cannot become this base model; one line naming the file and key."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)`` that also reads a training checkpoint's ``args`` Namespace."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: {unreadable(err)}") from None


def unreadable(err: Exception) -> str:
    """Why torch.load refused a file, in one line."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"not a checkpoint torch.load can read safely (it pickles {found.group(1)}; only tensors, "
                "containers and argparse.Namespace are read)")
    if "TorchScript" in text:
        return ("a TorchScript archive (OpenAI's CLIP release), which weights_only=True cannot read: "
                "save the model's state_dict() (e.g. as open_clip converts it) and point at that")
    return f"not a checkpoint torch.load can read safely ({type(err).__name__})"


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    """A safetensors file's tensors and metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({err})") from None


def is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def encoder_entry(obj: object, path: Path) -> tuple[dict[str, Tensor], str]:
    """The state dict a file keeps its encoder in (first of `ENTRIES`, else the file itself) and its name."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: unknown checkpoint layout (a {type(obj).__name__}, not a dict)")
    for name in ENTRIES:
        if is_state_dict(obj.get(name)):
            return obj[name], name
    if is_state_dict(obj):
        return obj, "flat"
    keys = ", ".join(map(str, list(obj)[:5]))
    raise CheckpointError(f"{path}: unknown checkpoint layout (top-level keys: {keys})")


def strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Where any key has `prefix`: the entries under it, prefix removed (the rest is another module)."""
    if not any(k.startswith(prefix) for k in sd):
        return sd
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@torch.no_grad()
def fold_input_adapter(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Sec. 2.2: the input adapter ``T' = MLP(T)`` depends on no input, so the encoder's cls token
    is MLP(T); fold it in and drop the MLP, as `tec.encoder_state` does (same timm `Mlp`)."""
    for prefix, cls_key in INPUT_ADAPTERS:
        mlp = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not mlp:
            continue
        if set(mlp) != MLP_KEYS or cls_key not in sd:
            raise CheckpointError(f"{path}: input adapter '{prefix}*' is not an fc1/fc2 MLP beside '{cls_key}' "
                                  f"(has {', '.join(sorted(mlp))})")
        hidden, dim = mlp["fc1.weight"].shape
        with torch.device("meta"):  # no init drawn: reading a checkpoint leaves torch's generator as it was
            adapter = Mlp(dim, hidden, dim, act_layer=nn.GELU)
        adapter.load_state_dict(mlp, assign=True)
        folded = {k: v for k, v in sd.items() if not k.startswith(prefix)}
        folded[cls_key] = adapter(sd[cls_key].float()).to(sd[cls_key].dtype)
        return folded
    return sd


def unwrap_encoder(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The encoder's keys of an entry: DDP's ``module.`` off, an input adapter folded into the cls
    token, then the encoder's submodule taken (`SUBMODULES`)."""
    sd = fold_input_adapter(strip(sd, "module."), path)
    for prefix in SUBMODULES:
        sd = strip(sd, prefix)
    return sd


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], str, dict]:
    """(encoder state dict in its family's naming, the entry it came from, metadata: an export's
    safetensors metadata, or a run checkpoint's architecture as `run_meta` gives it).

    Entries: ``teacher``, ``target_encoder``, ``model``, ``state_dict``, ``student`` or the file
    itself; prefixes ``module.``, ``backbone.``, ``encoder.``; this project's export is a
    safetensors file with ``format=tec-pipeline-export`` metadata (entry "tec-export").
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file (a run keeps its own in {CHECKPOINT})")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    meta: dict = {}
    if path.suffix == ".safetensors":
        sd, meta = read_safetensors(path)
        entry = "tec-export" if meta.get("format") == EXPORT_FORMAT else "flat"
    else:
        obj = torch_load(path)
        sd, entry = encoder_entry(obj, path)
        meta = run_meta(obj)
    return unwrap_encoder(sd, path), entry, meta


def run_meta(obj: object) -> dict:
    """A tec-pipeline run's checkpoint.pt records its model's arguments (``model_kwargs``): its
    architecture, as an export's metadata holds it (``{"arch": json}``); {} for any other file."""
    kwargs = obj.get("model_kwargs") if isinstance(obj, dict) else None
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("arch"), dict):
        return {}
    return {"arch": json.dumps(kwargs["arch"])}
