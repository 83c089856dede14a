"""Linear probing by Tab. 11 (LARS, BatchNorm without affine, frozen encoder), its resume, Tab. 4's
"+ input adapter FT" variant, and a 2-row `ablate --finetune` sweep that resumes by reading back."""
from __future__ import annotations

import json

import torch

import tec_pipeline.stages.ablate
from helpers import TINY_MODEL_ARGS
from tec_pipeline.stages.ablate import run_ablations
from tec_pipeline.stages.finetune import run_finetune
import test_ablations
import test_export
import test_finetune
from tec_pipeline.export import CHECKPOINT
from tec_pipeline.train.checkpoint import load_checkpoint
from tec_pipeline.finetune.config import load_finetune_config

# Module fixtures of the neighbouring tests: a tiny memory cache and its images, a short TEC run
# with both adapters, the separable toy ImageFolder.
world, tec_run, toy = test_ablations.world, test_export.run, test_finetune.toy
ABLATIONS, config = test_ablations.ABLATIONS, test_finetune.config


def test_linprobe_trains_only_the_head_and_resumes_exactly(toy, tmp_path):
    cut = config(toy, tmp_path / "cut", "optim.epochs=2", "optim.warmup_epochs=1", protocol="linprobe")
    assert (cut.optim.name, cut.model.global_pool, cut.aug.mixup) == ("lars", "token", 0.0)
    whole = run_finetune(config(toy, tmp_path / "whole", "optim.epochs=2", "optim.warmup_epochs=1", protocol="linprobe"))
    run_finetune(cut, stop_after=5)
    resumed = run_finetune(cut, resume=True)
    a, b = load_checkpoint(tmp_path / "whole" / CHECKPOINT), load_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and resumed["epochs"] == whole["epochs"]
    assert "head.0.running_mean" in a["model"] and "head.0.weight" not in a["model"]  # BatchNorm1d(affine=False)
    start = run_finetune(config(toy, tmp_path / "start", "train.max_steps=1", protocol="linprobe"))
    assert start["step"] == 1
    s = load_checkpoint(tmp_path / "start" / CHECKPOINT)["model"]
    frozen = [k for k in a["model"] if not k.startswith("head.")]
    assert frozen and all(torch.equal(a["model"][k], s[k]) for k in frozen)  # the same init (seed), never trained
    assert not torch.equal(a["model"]["head.1.weight"], s["head.1.weight"])


def test_input_adapter_variant_trains_the_cls_mlp_with_the_probe(tec_run, toy, tmp_path):
    cfg = config(toy, tmp_path / "ada", f"model.checkpoint={tec_run / CHECKPOINT}", "model.input_adapter=true",
                 "optim.epochs=1", "optim.warmup_epochs=0", protocol="linprobe")
    assert run_finetune(cfg)["finished"]
    before = load_checkpoint(tec_run / CHECKPOINT)["model"]
    after = load_checkpoint(tmp_path / "ada" / CHECKPOINT)["model"]
    assert not torch.equal(after["tec.input_adapter.mlp.fc1.weight"], before["input_adapter.mlp.fc1.weight"])
    assert torch.equal(after["tec.encoder.blocks.0.attn.qkv.weight"], before["encoder.blocks.0.attn.qkv.weight"])


def test_ablate_finetune_sweep_prints_top1_and_reads_finished_rows_back(world, toy, tmp_path, capsys,
                                                                        monkeypatch):
    ft = tmp_path / "ft.yaml"
    ft.write_text(json.dumps({"data": {"train": str(toy / "train"), "val": str(toy / "val"), "img_size": 32,
                                       "batch_size": 4, "num_workers": 0}, "optim": {"epochs": 1, "warmup_epochs": 0}}))
    assert load_finetune_config(ft, ["model.checkpoint=x"]).data.batch_size == 4
    paths = [ABLATIONS / "a1_patchnorm.yaml", ABLATIONS / "c1_norm_none.yaml"]
    args = [*TINY_MODEL_ARGS, "data.num_workers=0", f"data.path={world['root']}"]
    rows = run_ablations(paths, world["cache"], args, output=str(tmp_path / "abl"), finetune=ft)
    assert [r["status"] for r in rows] == ["done", "done"] and all(0 <= r["top1"] <= 100 for r in rows)
    assert (tmp_path / "abl" / "a1_patchnorm" / "encoder.safetensors").is_file()
    table = capsys.readouterr().out
    assert "top-1" in table and "Tab. 6(c)" in table
    assert json.loads((tmp_path / "abl" / "finetune.json").read_text())[1]["top1"] == rows[1]["top1"]

    def no_finetune(*args, **kwargs):
        raise AssertionError("a finished row was fine-tuned again")

    monkeypatch.setattr(tec_pipeline.stages.ablate, "run_finetune", no_finetune)
    again = run_ablations(paths, world["cache"], args, output=str(tmp_path / "abl"), finetune=ft)
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]
