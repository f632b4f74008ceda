"""`tledge export`: the Click command; the work is in :mod:`tledge.exporting` and :mod:`tledge_export`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import click

_HELP = dict(help_option_names=["-h", "--help"], max_content_width=100)


class _Batch(click.ParamType):
    """``dynamic`` (None) or a positive integer."""

    name = "dynamic|N"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Optional[int]:
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "dynamic":
            return None
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'dynamic' nor a batch size", param, ctx)
        if not 1 <= n <= 4096:
            self.fail(f"batch {n} is out of range 1..4096", param, ctx)
        return n


@click.command(context_settings=_HELP)
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Export folder [default: <run folder>/export].")
@click.option("--fp16", is_flag=True, help="Also export fp16 (model.fp16.onnx).")
@click.option("--int8", is_flag=True, help="Also export int8 QDQ calibrated on real images (model.int8.onnx).")
@click.option("--calib", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Calibration images (any folder layout) [default: the run's training split].")
@click.option("--calib-size", type=click.IntRange(1, 100_000), default=300, show_default=True,
              help="Calibration images, sampled evenly over classes/folders.")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="How activation ranges are chosen from the calibration images.")
@click.option("--target", type=click.Choice(["cpu", "tensorrt"]), default="cpu", show_default=True,
              help="int8 flavour: cpu (u8 activations, s8 per-channel weights) or tensorrt (symmetric s8).")
@click.option("--batch", type=_Batch(), default="dynamic", show_default=True,
              help="Batch axis: dynamic, or a fixed batch size N.")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Largest batch of TensorRT profiles and of Triton's batcher.")
@click.option("--opset", type=click.IntRange(13, 21), default=18, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="torch.onnx path: torchscript (fast, default) or dynamo (torch.export).")
@click.option("--bake-preprocess", is_flag=True,
              help="uint8 NHWC input at model size; scaling, mean/std and transpose inside the graph.")
@click.option("--fp16-io", is_flag=True, help="fp16 model takes and returns float16 (default: float32 I/O).")
@click.option("--engine", is_flag=True,
              help="Build TensorRT engines (needs TensorRT and a GPU; verified before written).")
@click.option("--triton", is_flag=True, help="Write a Triton model repository to <out>/triton.")
@click.option("--budget", type=click.FloatRange(0, 100), default=1.0, show_default=True,
              help="int8: accuracy drop allowed against PyTorch, in points.")
@click.option("--min-agreement", type=click.FloatRange(0, 100), default=99.0, show_default=True,
              help="fp16 and int8: top-1 agreement with PyTorch required, in percent.")
@click.option("--max-float-nodes", type=click.IntRange(0, 100_000), default=None,
              help="Accuracy-aware int8: most nodes kept in float [default: a quarter of them; 0: off].")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Image decoding threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(checkpoint: Path, out: Optional[Path], calib: Optional[Path], as_json: bool, **opts: Any) -> None:
    """Export CHECKPOINT to ONNX (fp32, and --fp16 / --int8), each verified against PyTorch.

    Every model is run with ONNX Runtime on the run's held-out images (val + test) next to
    the PyTorch model: max/mean |Δlogit|, top-1 agreement and accuracy Δ are printed, written
    to report.json, and stored inside the model. Budgets: fp32 logits within 1e-4, fp16 at most
    0.1 point of accuracy lost, int8 at most --budget points, both agreeing with PyTorch on at
    least --min-agreement % of the images (accuracy-aware int8: the most sensitive
    nodes stay in float until it holds). A format over budget is not written and the command
    exits with status 1 with the numbers; the other formats are still written.
    """
    from .cli import _setup_logging, echo
    from .exporting import ExportOptions, export_checkpoint

    _setup_logging(quiet=as_json)
    _share_logging("tledge_export")
    result = export_checkpoint(ExportOptions(checkpoint=str(checkpoint), out=str(out) if out else None,
                                             calib=str(calib) if calib else None, **opts))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        echo(result.table())
        written = [f.path.name for f in result.formats if f.ok and f.path]
        echo(f"wrote {result.out}: {', '.join(written) or 'no model'} (+ {result.report.name}"
                   + (", triton/" if result.triton else "") + ")")
    result.raise_for_failures()


def _share_logging(name: str) -> None:
    """Show the export package's log lines exactly like tledge's own (same handler and level)."""
    source, target = logging.getLogger("tledge"), logging.getLogger(name)
    for handler in source.handlers:
        if handler not in target.handlers:
            target.addHandler(handler)
    target.setLevel(source.level)
    target.propagate = False
