"""`python -m experiments NAME`: the studies' command line, run from the repository root.

Bad input and unexpected errors are reported as `tec-pipeline` reports them (one red line, exit 2;
`TEC_DEBUG=1` for a traceback): the helpers are the product CLI's own. Each study module is
imported inside its command, so `--help` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tec_pipeline.cli import VAL_HELP, OverridesArg, guarded_command, run_stage, split_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Studies on the built-in demo: several seeds, the shipped base, fine-tuning, what caching costs.")


@guarded_command(app, "demo-seeds")
def demo_seeds(seeds: List[int] = typer.Option([0, 1, 2], "--seed", help="Seeds to run; repeat the option."),
               out: Path = typer.Option(Path("runs/demo_seeds"), help="One sub-folder per seed, and seeds.json."),
               val: bool = typer.Option(False, "--val", help=VAL_HELP),
               overrides: Optional[List[str]] = OverridesArg):
    """The demo over several seeds: mean and spread of k-NN and linear accuracy per model."""
    from experiments.demo_seeds import run_demo_seeds

    run_stage(run_demo_seeds, list(seeds), out, overrides=overrides or [], split=split_name(val))


@guarded_command(app, "demo-base")
def demo_base(out: Path = typer.Option(Path("assets/demo_base"), help="Where the base's encoder and model go."),
              overrides: Optional[List[str]] = OverridesArg):
    """Train the demo's MAE base with this pipeline (configs/demo_base.yaml) and export it."""
    from experiments.demo_base import make_demo_base

    run_stage(make_demo_base, out, overrides=overrides or [])


@guarded_command(app, "demo-finetune")
def demo_finetune(run: Path = typer.Option(Path("runs/demo"), help="A finished demo run folder (its tec/ and control/), "
                                                                   "or a demo-seeds folder: seed N then uses its seed<N>/."),
                  seeds: List[int] = typer.Option([0], "--seed", help="Fine-tuning seeds; repeat the option."),
                  out: Optional[Path] = typer.Option(None, help="Where the fine-tunes go (default RUN/finetune, "
                                                                "RUN/finetune_val with --val)."),
                  val: bool = typer.Option(False, "--val", help="Train on four fifths of the training digits and score "
                                                                "the held-out fifth (whole source digits): the split "
                                                                "to choose a recipe on."),
                  overrides: Optional[List[str]] = OverridesArg):
    """Fine-tune base, control and TEC of a demo run (configs/finetune_demo.yaml); TEC's paired margins."""
    from experiments.demo_finetune import run_demo_finetune

    run_stage(run_demo_finetune, run, list(seeds), out, overrides=overrides or [], split=split_name(val))


@guarded_command(app, "caching-costs")
def caching_costs(seeds: List[int] = typer.Option([0, 1, 2], "--seed", help="Seeds to run; repeat the option."),
                  out: Path = typer.Option(Path("runs/caching_costs"), help="One sub-folder per seed and variant, and costs.json."),
                  only: Optional[List[str]] = typer.Option(None, "--only", help="Run only these variants (a margin needs its reference run too); repeat the option."),
                  val: bool = typer.Option(False, "--val", help=VAL_HELP),
                  tec_set: Optional[List[str]] = typer.Option(None, "--set", help="A dotted override for every TEC variant, e.g. optim.epochs=15 (the control trains as many steps); repeat the option.")):
    """What caching costs TEC on the demo: cached views V=1/2/4/6 against fresh crops online,
    float32/float16/int8 caches, and the control with fresh against cycled views."""
    from experiments.caching_costs import run_caching_costs

    run_stage(run_caching_costs, list(seeds), out, only=only, split=split_name(val), tec_overrides=list(tec_set or []))


@guarded_command(app, "reuse")
def reuse(seeds: List[int] = typer.Option([0, 1, 2], "--seed", help="Seeds to run; repeat the option."),
          out: Path = typer.Option(Path("runs/reuse"), help="The image subset, caches/, one sub-folder per seed and arm, and reuse.json."),
          only: Optional[List[str]] = typer.Option(None, "--only", help="Run only these arms (a margin needs the fresh arm too); repeat the option. V24-grown runs only when named.")):
    """Reuse at ImageNet's rate: TEC on 32 digits for 120 steps of 32, fresh crops online against caches
    whose views are each seen 120, 40, 15 and 5 times; paired margins against fresh."""
    from experiments.reuse import run_reuse

    run_stage(run_reuse, list(seeds), out, only=only)


if __name__ == "__main__":
    app()
