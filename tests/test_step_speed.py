"""The training step as a GPU wants it: compiled into one graph with the eager step's numbers, and no
read of the device between log records (checked on the CPU by counting every host read of a tensor
that the project's own code makes)."""
from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from helpers import TINY_BASE, tiny_arch
from tec_pipeline.base_targets import compute_targets
from tec_pipeline.config import TargetConfig
from tec_pipeline.models.base import load_base_model
from tec_pipeline.models.tec import TECModel
from tec_pipeline.step import tec_losses

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "tec_pipeline"), str(ROOT / "stages"))
# float32 sums reassociated by the compiler's fused kernels: a few ulps of the loss, more of a gradient
LOSS_RTOL, GRAD_ATOL = 1e-5, 1e-5


def tiny_step_inputs(seed: int = 0):
    torch.compiler.reset()  # no graph cached by an earlier test may stand in for this one
    torch.manual_seed(seed)
    model = TECModel(tiny_arch(depth=3), feat_dim=32, attn_dim=32, attn_heads=2, decoder_dim=32, decoder_heads=2)
    base = load_base_model(TINY_BASE, None)
    images = torch.randn(4, 3, 32, 32)
    targets = compute_targets(base, images, last_layers=2, k=3)
    noise = torch.rand(4, model.encoder.patch_embed.num_patches)
    return model, images, targets, noise


def losses_and_grads(step, model, images, targets, noise):
    losses = step(model, images, targets, TargetConfig(k=3, tau=1.0), 0.75, noise)
    losses["loss"].backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()
                                                          if p.grad is not None}


def test_the_compiled_step_gives_the_eager_losses_and_gradients():
    model, images, targets, noise = tiny_step_inputs()
    twin = copy.deepcopy(model)
    eager_losses, eager_grads = losses_and_grads(tec_losses, model, images, targets, noise)
    step = torch.compile(tec_losses, fullgraph=True)  # fullgraph: a graph break raises here
    losses, grads = losses_and_grads(step, twin, images, targets, noise)
    assert losses.keys() == eager_losses.keys() == {"loss", "loss_fea", "loss_att"}
    for name, value in eager_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=LOSS_RTOL, atol=0, msg=name)
    assert grads.keys() == eager_grads.keys() and len(grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=GRAD_ATOL, msg=name)


def test_a_graph_break_in_the_step_fails_under_fullgraph(monkeypatch):
    """The check itself: a host read inside the forward breaks the graph, and fullgraph refuses it."""
    model, images, targets, noise = tiny_step_inputs()
    forward = TECModel.forward

    def with_a_host_read(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if out.feat.sum().item() > 1e30:  # a data-dependent branch: dynamo must stop here
            raise AssertionError
        return out

    monkeypatch.setattr(TECModel, "forward", with_a_host_read)
    with pytest.raises(Exception, match="(?i)graph break|unsupported|item"):
        losses_and_grads(torch.compile(tec_losses, fullgraph=True), model, images, targets, noise)


# ---------------------------------------------------------------- device reads
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def counted_reads(calls: list):
    """Record every host read of a tensor made directly by code under tec_pipeline/ or stages/,
    with the step the loop was at (a read in a library's own code is not ours to remove)."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        real = saved[name]

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OURS):
                calls.append((name, caller, sys._getframe(1).f_lineno))
            return real(self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield calls
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)


@contextmanager
def reads_outside_records(monkeypatch, record_steps: tuple[int, ...]):
    """(reads, outside): every host read of a tensor by our code (`counted_reads`), and those made
    in the loops outside the end of a step in `record_steps` (its record, evaluation, checkpoint):
    a step's own work, or another step's end."""
    import tec_pipeline.stages.finetune as finetune_driver
    import tec_pipeline.stages.train as train_driver
    from tec_pipeline.finetune import loop as finetune_loop
    from tec_pipeline.train import loop

    reads, outside, booked = [], [], []  # booked: the reads made at steps' ends

    def at_step_end(module, name: str, step_end: bool = True) -> None:
        real = getattr(module, name)

        def wrapper(run, *args, **kwargs):  # reads here belong to the record / checkpoint of run.step
            before = len(reads)
            try:
                return real(run, *args, **kwargs)
            finally:
                booked.extend(range(before, len(reads)))
                if step_end and run.step not in record_steps:
                    outside.extend(reads[before:])
        monkeypatch.setattr(module, name, wrapper)

    def in_loop(module, name: str) -> None:
        real = getattr(module, name)

        def wrapper(*args, **kwargs):  # a step's own work: everything the loop reads but at steps' ends
            before = len(reads)
            try:
                return real(*args, **kwargs)
            finally:
                at_ends = set(booked)
                outside.extend(reads[i] for i in range(before, len(reads)) if i not in at_ends)
        monkeypatch.setattr(module, name, wrapper)

    for module, names in ((loop, ("end_step", "watch", "save")), (finetune_loop, ("end_step", "save", "score_epoch"))):
        for name in names:
            at_step_end(module, name)
    at_step_end(finetune_loop, "epoch_loader", step_end=False)  # an epoch's order, drawn between steps
    in_loop(train_driver, "train_tec")
    in_loop(finetune_driver, "train_classifier")
    with counted_reads(reads):
        yield reads, outside


@pytest.mark.parametrize("stage", ["train", "finetune"])
def test_no_device_reads_between_log_records(stage, tmp_path, monkeypatch):
    """Over 8 steps logged every 4 and saved only at the end, our code reads tensors on the host only
    inside the records and checkpoints of steps 4 and 8, never in a step's own work."""
    run = {"train": _train_eight_steps, "finetune": _finetune_eight_steps}[stage]
    with reads_outside_records(monkeypatch, (4, 8)) as (reads, outside):
        steps = run(tmp_path)
    assert steps == 8
    assert outside == [], outside
    assert reads, "the records must read the losses at least once: the counter sees nothing"


def _train_eight_steps(tmp_path: Path) -> int:
    from dataclasses import replace

    from helpers import build_memory_cache, write_images
    from tec_pipeline.stages.train import run_train
    from tec_pipeline.config import Config, TrainConfig
    from tec_pipeline.data.sources import ImageFolderSource

    images = write_images(tmp_path / "images", 8, classes=2)
    cache = build_memory_cache(load_base_model(TINY_BASE, None), ImageFolderSource(images), 32, views=1, seed=0,
                               k_max=3, images_per_shard=4, source_path=str(images))
    cfg = Config(seed=0, output=str(tmp_path / "run"))
    cfg.base = replace(cfg.base, arch=TINY_BASE)
    cfg.model = replace(cfg.model, arch=tiny_arch(depth=3), decoder_dim=32, decoder_depth=1, decoder_heads=2,
                        init_from_base=False)
    cfg.targets = replace(cfg.targets, k=3)
    cfg.data = replace(cfg.data, path=str(images), img_size=32, batch_size=2, num_workers=0)
    cfg.train = TrainConfig(max_steps=8, log_every=4, checkpoint_every=100)
    return run_train(cfg, reader=cache)["step"]


def _finetune_eight_steps(tmp_path: Path) -> int:
    from tec_pipeline.stages.finetune import run_finetune
    from test_finetune import config, halves_folder  # the fine-tuning tests' toy folders and tiny config

    halves_folder(tmp_path / "toy" / "train", 8, seed=0)
    halves_folder(tmp_path / "toy" / "val", 4, seed=1)
    cfg = config(tmp_path / "toy", tmp_path / "ft", "train.max_steps=8", "train.log_every=4",
                 "train.checkpoint_every=100", "optim.epochs=100")
    return run_finetune(cfg)["step"]
