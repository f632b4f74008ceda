"""`tledge export`: the Click command; the work is in :mod:`tledge.exporting` and :mod:`tledge_export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from tledge.cli.common import HELP, config_option, echo, setup_logging
from tledge.train.config import CalibrationSource
from tledge_export.config import EXPORTERS, METHODS, QAT_MODES, TARGETS, default


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


option = config_option(default)


@click.command(context_settings=HELP)
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Export folder [default: <run folder>/export].")
@option("--fp16", field="fp16", is_flag=True, help="Also export fp16 (model.fp16.onnx).")
@option("--int8", field="int8", is_flag=True, help="Also export int8 QDQ calibrated on real images (model.int8.onnx).")
@click.option("--calib", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Calibration images (any folder layout) [default: the run's training split].")
@click.option("--calib-size", type=click.IntRange(1, 100_000), default=CalibrationSource.size, show_default=True,
              help="Calibration images, sampled evenly over classes/folders.")
@option("--calib-method", field="calib_method", type=click.Choice(METHODS),
        help="How activation ranges are chosen from the calibration images.")
@option("--target", field="target", type=click.Choice(TARGETS),
        help="int8 flavour: cpu (u8 activations, s8 per-channel weights) or tensorrt (symmetric s8).")
@click.option("--batch", type=_Batch(), default="dynamic", show_default=True,
              help="Batch axis: dynamic, or a fixed batch size N.")
@option("--max-batch", field="max_batch", type=click.IntRange(1, 4096),
        help="Largest batch of TensorRT profiles and of Triton's batcher.")
@option("--opset", field="opset", type=click.IntRange(13, 21), help="ONNX opset.")
@option("--exporter", field="exporter", type=click.Choice(EXPORTERS),
        help="torch.onnx path: torchscript (fast, default) or dynamo (torch.export).")
@option("--bake-preprocess", field="bake_preprocess", is_flag=True,
        help="uint8 NHWC input at model size; scaling, mean/std and transpose inside the graph.")
@option("--fp16-io", field="fp16_io", is_flag=True, help="fp16 model takes and returns float16 (default: float32 I/O).")
@option("--engine", field="engine", is_flag=True,
        help="Build TensorRT engines (needs TensorRT and a GPU; verified before written).")
@option("--triton", field="triton", is_flag=True, help="Write a Triton model repository to <out>/triton.")
@option("--sign-key", field="sign_key", type=click.Path(exists=True, dir_okay=False),
        help="Sign the export folder and each Triton version folder (model.sig, OpenSSF model-signing) with "
             "this EC private key (PEM, mode 0600; an encrypted key reads TLEDGE_SIGN_KEY_PASSWORD).")
@option("--budget", field="budget", type=click.FloatRange(0, 100),
        help="int8: accuracy drop allowed against PyTorch, in points.")
@option("--min-agreement", field="min_agreement", type=click.FloatRange(0, 100),
        help="fp16 and int8: top-1 agreement with PyTorch required, in percent.")
@option("--max-class-drop", field="max_class_drop", type=click.FloatRange(0, 100),
        help="fp16 and int8: accuracy drop allowed in any single class, in points [default: not checked].")
@option("--qat", field="qat", type=click.Choice(QAT_MODES),
        help="int8 quantization-aware training with the fp32 model as teacher: auto (when post-training int8 "
             "misses the budget), on (always), off (never).")
@option("--qat-epochs", field="qat_epochs", type=click.FloatRange(0.1, 100),
        help="Passes of quantization-aware training over the calibration images.")
@option("--max-float-nodes", field="max_float_nodes", type=click.IntRange(0, 100_000),
        help="Accuracy-aware int8: most nodes kept in float [default: a quarter of them; 0: off].")
@option("--reference-images", field="reference_images", type=click.IntRange(0, 64),
        help="Held-out images embedded in each model for `tledge-runtime check` (0: synthetic inputs only).")
@click.option("--no-reference-images", "reference_images", flag_value=0,
              help="Embed no image of your data, only synthetic inputs (still checks the numerics).")
@option("--coverage", field="coverage", type=click.FloatRange(0, 1, min_open=True, max_open=True),
        help="Refit the prediction sets on the run's validation split for this coverage [default: the run's own].")
@option("--ood-keep", field="ood_keep", type=click.FloatRange(0, 1, min_open=True, max_open=True),
        help="Refit the 'unknown' threshold to keep this share of held-out images [default: the run's own].")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Image decoding threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(checkpoint: Path, out: Optional[Path], calib: Optional[Path], calib_size: int, workers: int,
           as_json: bool, **opts: Any) -> None:
    """Export CHECKPOINT to ONNX (fp32, and --fp16 / --int8), each verified against PyTorch.

    Every model is run with ONNX Runtime on the run's held-out images (val + test) next to
    the PyTorch model: max/mean |Δlogit|, top-1 agreement, images that changed class in each
    direction, the worst class's accuracy Δ and McNemar's p are printed, written to report.json,
    and stored inside the model. Budgets: fp32 logits within 1e-4, fp16 at most 0.1 point of
    accuracy lost, int8 at most --budget points, both agreeing with PyTorch on at least
    --min-agreement % of the images (accuracy-aware int8: the most sensitive nodes stay in float
    until it holds). A format over budget is not written and the command exits with status 1
    with the numbers; the other formats are still written.
    """
    from tledge.exporting import export_checkpoint
    from tledge_export import ExportConfig

    setup_logging(quiet=as_json)
    config = ExportConfig(out=str(out) if out else None, **opts)
    source = CalibrationSource(folder=str(calib) if calib else None, size=calib_size)
    result = export_checkpoint(checkpoint, config, calibration=source, workers=workers)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        echo(result.table())
        if result.signed_by:
            echo(f"signed {result.out} (model.sig) with key {result.signed_by[:16]}")
        if result.ok:
            echo(result.summary_line())
    result.raise_for_refusals()
