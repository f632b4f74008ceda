"""`tledge benchmark`: the Click command; the work is in :mod:`tledge.evaluation.benchmark`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from tledge.cli.common import HELP, echo, setup_logging


def _backends(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    from tledge_runtime.backends.loader import BACKENDS

    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n != "auto" and n not in BACKENDS]
    if unknown or not names:
        raise click.BadParameter(f"unknown backend(s) {unknown}; choose from auto, {', '.join(BACKENDS)}")
    return names


def _batches(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """`--batch 1,8`: batch 1 is always measured for latency; the largest value sets the throughput batch."""
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of integers, e.g. 1,8") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 4096:
        raise click.BadParameter("batch sizes must be in 1..4096")
    return max(sizes)


@click.command(context_settings=HELP)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Labelled images: DATA/<class>/* (or a split layout: its test/ split).")
@click.option("--backend", "backends", default="auto", show_default=True, callback=_backends,
              help="Comma-separated: auto, ort-cpu, ort-cuda, ort-tensorrt, openvino (engines always use tensorrt).")
@click.option("--batch", "batch", default="1,8", show_default=True, callback=_batches,
              help="Latency at batch 1, throughput at the largest size given.")
@click.option("--warmup", type=click.IntRange(0, 10_000), default=5, show_default=True)
@click.option("--iters", type=click.IntRange(5, 100_000), default=50, show_default=True,
              help="Timed single-image calls per row (p50/p99 come from these).")
@click.option("--threads", type=click.IntRange(1, 512), default=None, help="CPU threads for every backend.")
@click.option("--max-images", type=click.IntRange(1), default=None, help="Use at most this many images (stratified).")
@click.option("--budget-int8", type=click.FloatRange(0), default=1.0, show_default=True, help="Accuracy budget, points.")
@click.option("--budget-fp16", type=click.FloatRange(0), default=0.1, show_default=True, help="Accuracy budget, points.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG of accuracy against latency with the Pareto front, and the table beside it as .md and .json "
                   "[default: benchmark.png in the run folder, else beside the models].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
def benchmark(paths: tuple[Path, ...], data: Path, backends: tuple[str, ...], batch: int, warmup: int, iters: int,
              threads: Optional[int], max_images: Optional[int], budget_int8: float, budget_fp16: float,
              plot: Optional[Path], as_json: bool) -> None:
    """Compare the PyTorch checkpoint and every exported format on the same images.

    PATHS: a run folder (best.pt + export/), an export folder, or model files. Prints one
    row per format and backend: size, accuracy, delta vs PyTorch, top-1 agreement, p50/p99
    latency at batch 1, throughput at the larger batch, and a status (ok / over budget /
    failed / missing), then the fastest format within its budget.
    """
    from tledge.evaluation.bench_table import to_markdown
    from tledge.evaluation.benchmark import benchmark as run_benchmark
    from tledge.evaluation.benchmark import discover

    setup_logging(quiet=as_json)
    if plot is None:
        found = discover(paths)  # the run folder when there is one: the plot and tables belong to the run
        anchor = found.checkpoint.parent if found.checkpoint is not None else found.models[0].parent
        plot = anchor / "benchmark.png"
    result = run_benchmark(paths, data, backends=backends, batch=batch, warmup=warmup, iters=iters, threads=threads,
                           max_images=max_images, budgets={"int8": budget_int8, "fp16": budget_fp16}, plot=plot)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    m = result.machine
    echo(f"{result.images} images ({result.skipped} skipped); reference: {result.reference or 'none'}; "
               f"{m['cpu']}, {m['cores']} cores; preprocessing {result.preprocess_ms:.1f} ms/image (same for all rows)")
    echo(to_markdown(result))  # rows are named by model files
    echo(f"recommendation: {result.recommendation}")
    if result.plot:
        echo(f"wrote {', '.join(str(p) for p in [result.plot, *result.saved])}")
