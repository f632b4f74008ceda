"""The `tledge` command line: a thin map from options to the Python API.

Each command turns its options into arguments of one library call; the error convention, logging and
safe printing they share are in :mod:`tledge.cli.common`. ``finetune``, ``export`` and ``benchmark`` live
in their own modules (``finetune``, ``export``, ``benchmark`` in this folder) and are registered here.
Heavy imports (torch, ...) happen inside the commands so `--help` is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from tledge import __version__
from tledge.arch_names import ARCH_NAMES
from tledge.cli.benchmark import benchmark
from tledge.cli.common import HELP, Group, echo, emit_json, setup_logging
from tledge.cli.export import export
from tledge.cli.finetune import finetune


@click.group(cls=Group, context_settings=HELP)
@click.version_option(__version__, "-V", "--version", prog_name="tledge")
def main() -> None:
    """Fine-tune an ImageNet classifier on your images, export it to ONNX / TensorRT at
    fp32, fp16 and int8 with every export verified against PyTorch, and run it on the edge.

    \b
    Typical session:
      tledge data elpv data/elpv                 # a real dataset, offline
      tledge finetune data/elpv --out runs/elpv  # -> runs/elpv/best.pt, plots, metrics
      tledge evaluate runs/elpv/best.pt data/elpv
    """


# --- data -----------------------------------------------------------------------------------------

@main.group(cls=Group, context_settings=HELP)
def data() -> None:
    """Prepare datasets."""


@data.command("elpv", context_settings=HELP)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--test-split", type=click.FloatRange(0.05, 0.5), default=0.25, show_default=True,
              help="Fraction of images held out for testing (stratified by class and module type).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it is not empty.")
def data_elpv(out: Path, test_split: float, seed: int, overwrite: bool) -> None:
    """Write the ELPV solar-cell dataset (pip install elpv-dataset) to OUT as an image folder.

    OUT/{train,test}/{functional,defective}/*.png, defective = defect probability >= 0.5,
    plus OUT/labels.csv with each cell's probability and module type. License: CC BY-NC-SA 4.0.
    """
    from tledge.data.elpv import materialize

    summary = materialize(out, test_split=test_split, seed=seed, overwrite=overwrite)
    for split, counts in summary.counts.items():
        click.echo(f"{split:5s}: " + ", ".join(f"{n} {c}" for c, n in counts.items()))
    echo(f"wrote {summary.out}")


# --- evaluate -------------------------------------------------------------------------------------

@main.command(context_settings=HELP)
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Which split of a DATA/{train,val,test} layout [default: test, else val].")
@click.option("--batch-size", "-b", type=click.IntRange(1, 8192), default=32, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the confusion matrix as a PNG here.")
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one CSV row per image here: path,true,pred, then one probability column per class.")
@click.option("--operating-point", metavar="CLASS:recall=R|CLASS:precision=P", default=None,
              help="Binary tasks: choose the threshold for CLASS that reaches this recall (or precision) on the run's "
                   "validation split and report DATA at it [default: the checkpoint's own, if it has one].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate(checkpoint: Path, data: Path, split: Optional[str], batch_size: int, device: str,
             plot: Optional[Path], predictions: Optional[Path], operating_point: Optional[str], as_json: bool) -> None:
    """Accuracy, per-class precision/recall/F1 and confusion matrix of CHECKPOINT on DATA.

    Images go through the device's own preprocessing (tledge_runtime), so --predictions holds the
    probabilities an exported fp32 model gives on a device, up to float rounding. With an operating
    point (the checkpoint's, or --operating-point), DATA is also reported decided at it.
    """
    from tledge.evaluation.evaluate import evaluate as run_evaluate
    from tledge.report.metrics import format_report

    setup_logging(quiet=as_json)
    result = run_evaluate(checkpoint, data, split=split, batch_size=batch_size, device=device, plot=plot,
                          predictions=predictions, operating_point=operating_point)
    point = result.operating_point
    if as_json:
        emit_json({**result.report, "data": str(result.data), "skipped": len(result.skipped),
                   "operating_point": dict(vars(point)) if point else None,
                   "at_operating_point": result.at_operating_point})
        return
    echo(f"{result.data}")
    echo(format_report(result.report))  # per-class rows are named by the checkpoint's classes
    if point is not None:
        echo(f"\nat the operating point ({point.describe()}; {point.measured}):")
        echo(format_report(result.at_operating_point))
    if result.skipped_line:
        echo(result.skipped_line)
    for written in (result.plot, result.predictions):
        if written:
            echo(f"wrote {written}")


@main.command(context_settings=HELP)
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=Path("data/elpv"), show_default=True,
              help="A DATA/{train,test}/<class> folder; written from the elpv-dataset package if missing.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder [default: runs/demo, runs/demo2, ...].")
@click.option("--arch", type=click.Choice(ARCH_NAMES), default=None,
              help="Backbone [default: efficientnet_lite0, offline].")
@click.option("--img-size", type=click.IntRange(16, 1024), default=None, help="Input size [default: 160].")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=None, help="Total epochs [default: 10].")
@click.option("--freeze-epochs", type=click.IntRange(0, 10_000), default=None, help="Head-only epochs [default: 2].")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=None,
              help="Training seed: head initialisation, shuffling, augmentation [default: 0]. The split is the data's.")
@click.option("--iters", type=click.IntRange(5, 100_000), default=50, show_default=True,
              help="Timed calls per benchmark row.")
def demo(data: Path, out: Optional[Path], arch: Optional[str], img_size: Optional[int], epochs: Optional[int],
         freeze_epochs: Optional[int], seed: Optional[int], iters: int) -> None:
    """The whole toolchain on the ELPV solar-cell dataset, offline: fine-tune EfficientNet-Lite0,
    export fp32/fp16/int8 (each verified against PyTorch), benchmark every format on the
    test split, and recommend the one to ship. About 6 minutes on a quiet 2-core CPU."""
    from tledge.demo import DemoConfig, summary, with_overrides
    from tledge.demo import demo as run_demo

    setup_logging()
    cfg = with_overrides(DemoConfig(data=str(data), out=str(out) if out else None, bench_iters=iters),
                         arch=arch, img_size=img_size, epochs=epochs, freeze_epochs=freeze_epochs, seed=seed)
    result = run_demo(cfg)
    echo(summary(result))
    if result.export.ok:
        echo(result.export.summary_line())
    result.export.raise_for_refusals()  # a refused format: one error line, status 1


for command in (finetune, export, benchmark):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    main()
