"""How many times a cached run shows each cached view (its reuse), said at the start of `train`.

A cache of V views per image trained for E epochs shows each view

    reuse = views seen / views cached = (S * B) / (N * V)

times (S optimizer steps of effective batch B, N usable images): E / V for whole epochs. The
authors' online TEC and MAE draw a new crop every time (reuse 1). Above `HARMLESS_REUSE`, the
largest reuse the reuse study found no cost at, the run warns once: nothing measured says it
is harmless there, and a cache can grow (`cache-targets` with a larger ``data.views``).
"""
from __future__ import annotations

import math

# The largest reuse at which the demo's reuse study resolved no cost against fresh crops: 60 (a
# cache of 2 views for 120 epochs; its rule: a margin negative in every seed, two intervals below
# 0). At 120 (1 view) the linear probe lost 1.1 / 4.5 / 3.0 points in its 3 seeds, two intervals
# below 0; at 60 one seed of three lost 3.0 (`python -m experiments reuse`, 2026-12-06; docs/demo.md,
# "Reuse at ImageNet's rate"; benchmarks/results/reuse.json). Between 60 and 120 is unmeasured.
HARMLESS_REUSE = 60.0


def view_reuse(total_steps: int, effective_batch: int, usable_images: int, views: int) -> float:
    """Each cached view's expected number of uses: views seen / views cached."""
    return total_steps * effective_batch / (usable_images * views)


def reuse_lines(total_steps: int, effective_batch: int, usable_images: int, views: int) -> list[str]:
    """The start line of a cached run (and a warning line above `HARMLESS_REUSE`)."""
    reuse = view_reuse(total_steps, effective_batch, usable_images, views)
    lines = [f"train: each cached view is seen {reuse:.1f} times ({total_steps} steps x {effective_batch} / "
             f"({usable_images} images x {views} views))"]
    if reuse > HARMLESS_REUSE:
        more = math.ceil(reuse * views / HARMLESS_REUSE)
        lines.append(f"train: warning: a reuse of {reuse:.1f} is above {HARMLESS_REUSE:g}, the largest the demo's reuse "
                     f"study found harmless (docs/demo.md); data.views={more} or more keeps it below "
                     f"(cache-targets with it grows this cache)")
    return lines


def start_lines(source: str, total_steps: int, effective_batch: int, usable_images: int, views: int) -> list[str]:
    """`reuse_lines` for a cached run; none for online and pixel targets (they draw their crops: no cached view)."""
    return reuse_lines(total_steps, effective_batch, usable_images, views) if source == "cache" else []
