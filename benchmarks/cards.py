"""The card a GPU benchmark ran on: its name, torch / CUDA versions, the memory it used at most, and
the dense bf16 tensor-core peak that MFU divides by.

MFU = model FLOPs per second / the card's peak. A peak is only known for the cards below; any other
card is "unknown" (its name printed, MFU null), never given another card's peak.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Card:
    pattern: str  # a regex searched in `torch.cuda.get_device_name()`
    name: str
    bf16_flops: float  # dense (no 2:4 sparsity) bf16 tensor-core peak, FLOP/s
    source: str


# First match wins, so the specific form of a card comes before its family. The datasheets give the
# sparse figure with a footnote ("with sparsity"); the dense peak is half of it. `\b` keeps "A10" from
# matching "A100" or "A10G", and "L4" from matching "L40".
CARDS = (
    # NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe BF16 1,513 TFLOPS with sparsity
    Card(r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756e12, "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe)"),
    # same datasheet: H100 NVL BF16 1,671 TFLOPS with sparsity, per GPU
    Card(r"\bH100\b.*\bNVL\b", "H100 NVL", 835e12, "NVIDIA H100 Tensor Core GPU datasheet (H100 NVL)"),
    # same datasheet: H100 SXM BF16 1,979 TFLOPS with sparsity (torch names it "H100 80GB HBM3")
    Card(r"\bH100\b", "H100 SXM", 989e12, "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM)"),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 NVL BF16 1,671 TFLOPS with sparsity
    Card(r"\bH200\b.*\bNVL\b", "H200 NVL", 835e12, "NVIDIA H200 Tensor Core GPU datasheet (H200 NVL)"),
    # same datasheet: H200 SXM BF16 1,979 TFLOPS with sparsity
    Card(r"\bH200\b", "H200 SXM", 989e12, "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM)"),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS (624 with sparsity), PCIe and SXM alike
    Card(r"\bA100\b", "A100", 312e12, "NVIDIA A100 Tensor Core GPU datasheet"),
    # NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity (362.05 dense)
    Card(r"\bL40S\b", "L40S", 362e12, "NVIDIA L40S GPU datasheet"),
    # NVIDIA L40 datasheet: BF16 362 TFLOPS with sparsity
    Card(r"\bL40\b", "L40", 181e12, "NVIDIA L40 GPU datasheet"),
    # NVIDIA L4 Tensor Core GPU datasheet: BF16 242 TFLOPS with sparsity
    Card(r"\bL4\b", "L4", 121e12, "NVIDIA L4 Tensor Core GPU datasheet"),
    # NVIDIA A10 Tensor Core GPU datasheet: BF16 250 TFLOPS with sparsity (AWS's A10G has no NVIDIA datasheet)
    Card(r"\bA10\b", "A10", 125e12, "NVIDIA A10 Tensor Core GPU datasheet"),
)


def card_of(device_name: str) -> Card | None:
    """The known card whose pattern `device_name` matches first; None for an unknown card."""
    return next((c for c in CARDS if re.search(c.pattern, device_name)), None)


def device_record(device: str) -> dict:
    """What a result says about where it ran: on CUDA the card's name, the peak used for MFU (null
    and "unknown card" when the card is not in `CARDS`), torch's and CUDA's versions, and the most
    memory torch held on the card so far; on the CPU the same keys, the GPU ones null."""
    out = {"device": "cpu", "card": None, "peak_bf16_flops": None, "peak_source": None, "torch": torch.__version__,
           "cuda": torch.version.cuda, "max_memory_allocated_gb": None}
    if device != "cuda":
        return out
    name = torch.cuda.get_device_name()
    card = card_of(name)
    out.update(device=name, card=card.name if card else f"unknown card ({name})",
               peak_bf16_flops=card.bf16_flops if card else None, peak_source=card.source if card else None,
               max_memory_allocated_gb=torch.cuda.max_memory_allocated() / 1e9)
    return out
