"""`tec-pipeline` command line (typer). Stage modules are imported inside each command.

`fail`, `run_stage`, `split_name`, `OverridesArg` and `VAL_HELP` are shared with the studies'
command line (`python -m experiments`), so both report bad input the same way.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TEC: train a stronger self-supervised ViT from a frozen base model, via a target cache.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see configs/).")
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. model.arch.depth=6 targets.k=9.")
VAL_HELP = ("Score on a held-out fifth of the training digits (whole source digits), not the test split: "
            "what to compare when choosing a setting. Writes report_val.json beside report.json.")


def split_name(val: bool) -> str:
    """The split a --val flag selects."""
    return "val" if val else "test"


def _load(config: Optional[Path], overrides: Optional[List[str]]):
    from .config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        fail(str(err))


def fail(message: str) -> None:
    """Report bad input as one red line on stderr and exit 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


DEBUG_ENV = "TEC_DEBUG"  # set to 1: an unexpected error shows its traceback


def os_error_line(err: OSError, during: str) -> str:
    """An `OSError` as one line: the path(s) it names, the system's reason and the command."""
    reason = err.strerror or str(err) or type(err).__name__
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{paths + ': ' if paths else ''}{reason} (during {during})"


@contextmanager
def guard(during: str = "the command") -> Iterator[None]:
    """Every error a command meets as one red line, exit 2: the package's own (`UserError`) as it
    words them, an `OSError` with the path it names, anything else by its type and first line plus
    how to see its traceback (``TEC_DEBUG=1``, which re-raises it)."""
    from .errors import UserError

    try:
        yield
    except (typer.Exit, typer.Abort):
        raise  # the command line's own exits
    except UserError as err:
        fail(str(err))
    except Exception as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if isinstance(err, OSError):
            fail(os_error_line(err, during))
        first = (str(err).strip().splitlines() or [""])[0]
        fail(f"unexpected {type(err).__name__}{': ' + first if first else ''} (during {during}); "
             f"run with {DEBUG_ENV}=1 for the traceback")
    finally:
        close_process_group()


def close_process_group() -> None:
    """The command's processes leave their group together (the runs of a command share one group:
    `train.loop.end_run`); nothing to do where torch was never imported or no group was made."""
    import sys

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def guarded_command(typer_app: typer.Typer, *args, **kwargs) -> Callable:
    """`typer_app.command`, the command's body under `guard`: no user sees a raw traceback by
    default (the product's commands and the studies' alike)."""
    def register(fn: Callable) -> Callable:
        during = args[0] if args else fn.__name__.replace("_", "-")

        @functools.wraps(fn)
        def guarded(*a, **k):
            with guard(during):
                return fn(*a, **k)
        return typer_app.command(*args, **kwargs)(guarded)
    return register


def command(*args, **kwargs) -> Callable:
    """A `tec-pipeline` command under `guard` (`guarded_command`)."""
    return guarded_command(app, *args, **kwargs)


def run_stage(fn, *args, **kwargs):
    """Call a stage; the user-facing errors of this package become one red line and exit 2 (a
    product command's `guard` reports the rest)."""
    from .errors import UserError

    try:
        return fn(*args, **kwargs)
    except UserError as err:
        fail(str(err))


@command("cache-targets")
def cache_targets(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
                  overwrite: bool = typer.Option(False, help="Replace an existing cache made with another config."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Print bytes per view, total size and free space; write nothing.")):
    """Stage one: run the frozen base model over views of a dataset and write the target cache."""
    cfg = _load(config, overrides)
    from tec_pipeline.stages.cache_targets import run_cache_targets

    run_stage(run_cache_targets, cfg, overwrite=overwrite, dry_run=dry_run)


@command()
def train(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
          resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint.")):
    """Stage two: train the new model from a target cache (or online with targets.source=online)."""
    cfg = _load(config, overrides)
    from tec_pipeline.stages.train import run_train

    run_stage(run_train, cfg, resume=resume)


@command()
def export(run: Path = typer.Argument(..., help="A training run directory."),
           out: Optional[Path] = typer.Option(None, help="Output file (default RUN/encoder.safetensors, "
                                                         "RUN/encoder_mae.pth with --format mae)."),
           fmt: str = typer.Option("timm", "--format", help="timm: safetensors a timm ViT loads strictly; mae: "
                                                            "{'model': state_dict} as MAE's main_finetune.py --finetune reads.")):
    """Write the trained encoder (input adapter folded into cls) for timm or MAE's fine-tuning code."""
    from .export import export_run

    path = run_stage(export_run, run, out, fmt)
    typer.echo(f"exported {path}")


def _load_ft(config: Optional[Path], overrides: Optional[List[str]], protocol: str):
    from .config import ConfigError
    from .finetune.config import load_finetune_config

    try:
        return load_finetune_config(config, overrides or [], protocol)
    except ConfigError as err:
        fail(str(err))


def _score(config: Optional[Path], overrides: Optional[List[str]], resume: bool, protocol: str) -> None:
    cfg = _load_ft(config, overrides, protocol)
    from tec_pipeline.stages.finetune import run_finetune

    result = run_stage(run_finetune, cfg, resume=resume)
    typer.echo(f"{protocol}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  best top-1 "
               f"{result['best_top1']:.2f} (epoch {result['best_epoch']:g}) -> {cfg.output}/result.json")


@command()
def finetune(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
             resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint.")):
    """Full fine-tuning of an encoder by Tab. 10 (AdamW, layer decay, RandAugment, Mixup/CutMix); top-1/top-5."""
    _score(config, overrides, resume, "finetune")


@command()
def linprobe(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg,
             resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint.")):
    """Linear probing by Tab. 11 (LARS, BatchNorm before the head); model.input_adapter=true: Tab. 4's variant."""
    _score(config, overrides, resume, "linprobe")


@command()
def inspect(cache: str = typer.Argument(..., help="Cache path or fsspec URL.")):
    """Print a cache's metadata, counts, bytes per view and completeness."""
    from .cache.inspect import describe_cache

    typer.echo(run_stage(describe_cache, cache))


@command()
def verify(cache: str = typer.Argument(..., help="Cache path or fsspec URL."),
           sample: int = typer.Option(8, "--sample", help="Views to re-render and recompute."),
           seed: int = typer.Option(0, help="Which views are sampled.")):
    """Recompute a random sample of views with the base model and compare with the cache."""
    from tec_pipeline.stages.verify import verify_cache

    ok = run_stage(verify_cache, cache, sample=sample, seed=seed)
    raise typer.Exit(0 if ok else 1)


@command("eval")
def evaluate(model: List[str] = typer.Option(..., "--model", "-m",
                                             help="NAME=CHECKPOINT; repeat. A tec-pipeline export needs no --arch."),
             train_dir: Path = typer.Option(..., help="Labelled ImageFolder to fit k-NN and the linear probe on."),
             test_dir: Optional[Path] = typer.Option(None, help="Labelled ImageFolder to score on (not with --val)."),
             val: bool = typer.Option(False, "--val", help="Score on a held-out fifth of --train-dir instead (whole "
                                                           "groups with --groups): the split to tune on."),
             groups: Optional[Path] = typer.Option(
                 None, "--groups", help="CSV with header image,group: the group of every image of --train-dir "
                                        "(image: its path under --train-dir, e.g. 3/00012.png). The probe's held-out "
                                        "fifth and --val then hold out whole groups (default: stratified by label)."),
             arch: Optional[str] = typer.Option(None, help="timm architecture of checkpoints that do not record one."),
             pool: str = typer.Option("cls", help="cls token or mean of patch tokens."),
             img_size: Optional[int] = typer.Option(None, help="Encoder image size (default: the architecture's)."),
             k: int = typer.Option(20, help="Neighbours of the weighted k-NN."),
             probe_c: Optional[float] = typer.Option(
                 None, help="Inverse L2 strength of the linear probe (default: chosen per model from "
                            "1e-4..1 on a held-out fifth of the training set)."),
             out: Optional[Path] = typer.Option(None, help="Write the table as JSON here.")):
    """Frozen-feature k-NN and linear-probe accuracy, with the raw-pixel and random-init floors."""
    if pool not in ("cls", "mean"):
        fail(f"--pool '{pool}': expected cls or mean")
    if (test_dir is None) != val:
        fail("give --test-dir to score on a test split, or --val to score on a held-out fifth of --train-dir")
    pairs = []
    for item in model:
        name, sep, checkpoint = item.partition("=")
        if not sep or not name or not checkpoint:
            fail(f"--model '{item}' is not of the form NAME=CHECKPOINT")
        pairs.append((name, arch, checkpoint))
    if test_dir is not None and test_dir.resolve() == train_dir.resolve():  # k-NN would find each image itself
        fail(f"--test-dir {test_dir} is --train-dir: scored on the images it fits on, the scores say nothing; "
             f"give another split, or --val to hold out a fifth of --train-dir")
    train_groups = None if groups is None else run_stage(_train_groups, groups, train_dir)
    from .evaluate.report import run_eval  # after the checks: a typo costs no torch import

    run_stage(run_eval, pairs, train_dir, test_dir, pool=pool, img_size=img_size, output=out, k=k, probe_C=probe_c,
              echo=typer.echo, split=split_name(val), train_groups=train_groups)


def _train_groups(groups: Path, train_dir: Path):
    """The group of each image of `train_dir`, in the order the evaluation reads it."""
    from .data.sources import ImageFolderSource
    from .evaluate.groups import read_groups

    return read_groups(groups, ImageFolderSource(train_dir))


@command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="Where the run's cache, models, table and pictures go."),
         seed: int = typer.Option(0, help="Seed of the cache views, masks and initialisation (TEC and control)."),
         second_round: bool = typer.Option(False, "--second-round", help="Also train TEC from the exported TEC (Tab. 7)."),
         val: bool = typer.Option(False, "--val", help=VAL_HELP),
         overrides: Optional[List[str]] = OverridesArg):
    """The main job on the built-in demo: cache-targets, train TEC and the control, evaluate against the base."""
    from tec_pipeline.stages.demo import run_demo

    run_stage(run_demo, out, seed=seed, second_round=second_round, overrides=overrides or [], split=split_name(val))


def ablation_items(items: List[str]) -> tuple[list[Path], list[str]]:
    """`ablate`'s arguments as (ablation YAMLs, a directory's *.yaml sorted; key=value overrides)."""
    paths: list[Path] = []
    overrides: list[str] = []
    for item in items:
        p = Path(item)
        if "=" in item and not p.exists():
            overrides.append(item)
        elif p.is_dir():
            found = sorted(p.glob("*.yaml"))
            if not found:
                fail(f"{p}: no *.yaml ablation configs in this directory")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            fail(f"{item}: ablation config not found (expected a YAML, a directory of them, or key=value)")
    if not paths:
        fail("no ablation configs given (e.g. configs/ablations)")
    return paths, overrides


@command()
def ablate(items: List[str] = typer.Argument(..., metavar="CONFIGS",
                                             help="Ablation YAMLs, or a directory of them (its *.yaml, sorted), "
                                                  "e.g. configs/ablations; then dotted overrides (key=value) applied to every run."),
           cache: str = typer.Option(..., "--cache", help="The one stage-one cache every run reads (path or fsspec URL)."),
           config: Optional[Path] = typer.Option(None, "--config", "-c",
                                                 help="Full config each ablation YAML is layered on (e.g. configs/vitb_mae_in1k.yaml)."),
           output: Path = typer.Option(Path("runs/ablations"), "--output", "-o",
                                       help="Each run goes to OUTPUT/<yaml stem> and resumes there."),
           finetune: Optional[Path] = typer.Option(None, "--finetune", help="Also export and fine-tune each row with "
                                                   "this fine-tune config; the table is then top-1."),
           ft_set: List[str] = typer.Option([], "--ft-set", help="A key=value override of the fine-tune config; repeat.")):
    """Tab. 6 ablations: train one run per YAML from the same cache, then print a table of final losses.

    Layers, last wins: --config, the ablation YAML, cache.path=CACHE and targets.source=cache, the overrides.

    A row the cache cannot serve (e.g. targets.k > k_max) is marked refused and the others still run; the exit status is then 1.

    With --finetune FT_CONFIG each trained row is exported and fine-tuned (OUTPUT/<stem>/finetune) and the
    table is top-1, also written to OUTPUT/finetune.json; finished fine-tunes are read back.
    """
    paths, overrides = ablation_items(items)
    _load(config, overrides)  # a bad --config or override: one line naming the key, before any run starts
    if "://" not in cache and not Path(cache).exists():
        fail(f"--cache {cache}: not found (run cache-targets first)")
    from tec_pipeline.stages.ablate import run_ablations

    if finetune is not None:
        _load_ft(finetune, [*ft_set, "model.checkpoint=row"], "finetune")  # a bad fine-tune config fails first too
    rows = run_stage(run_ablations, paths, cache, overrides, config, str(output), finetune, ft_set)
    raise typer.Exit(0 if all(r["status"] == "done" for r in rows) else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
