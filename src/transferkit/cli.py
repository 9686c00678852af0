"""Command line: parse into a TrainConfig or a call, print results. No training logic here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import RECIPES, TrainConfig
from .errors import Interrupted, TransferkitError

HELP = {
    "data": "cifar10 | cifar100 | fashion-mnist | mnist | an image folder (root/<class>/ or root/train/<class>/)",
    "data_dir": "where named data sets live / are downloaded (default ~/.cache/transferkit/data)",
    "model": "any torchvision classification model, e.g. resnet18, mobilenet_v2, convnext_tiny",
    "weights": "imagenet (default: ImageNet weights, preferring ones on this machine) | DEFAULT | a "
               "torchvision weights name such as IMAGENET1K_V1 | path.pth/.safetensors | none",
    "strategy": "linear: frozen backbone, head only; finetune: all layers (backbone at --backbone-lr-mult); "
                "gradual: head only for --head-epochs, then all",
    "lr": "peak learning rate of the head (per batch of --batch-size)",
    "image_size": "model input side in pixels (default: what the weights were trained at)",
    "tta": "the final evaluation averages each image's prediction with its mirror image's (as eval --tta; "
           "twice its compute, training and model selection unchanged)",
    "val_split": "fraction of train held out for model selection when there is no val/ folder",
    "max_train_images": "train on a stratified subset of this many images",
    "precision": "auto: bf16 where the hardware has native bf16, else fp32",
    "out": "run folder (default runs/<data>-<model>-<time>)",
    "recipe": f"preset settings, overridden by explicit flags: {', '.join(RECIPES)} (seed: the classic tutorial; "
              "demo: the offline default job; fast: a 3-epoch full fine-tune at 112 px with mirror TTA)",
    "log_every": "also log the running loss every N batches",
    "batch_size": "images per step over all processes (under torchrun each of N processes takes 1/N of it)",
    "trainable_blocks": "train only the backbone's last K blocks and the head; the frozen blocks' activations are "
                        "cached (one un-augmented view) unless --no-feature-cache",
    "stream": "image folders: auto streams from the files (DataLoader workers) when the decoded images would "
              "take over a quarter of the memory; always; never (decode all into memory, cached on disk)",
    "micro_batch": "images per forward/backward pass; the step still averages over --batch-size (less memory). "
                   "0: auto, on a CPU 16 images at 224 px (more at smaller sizes), on a GPU the whole batch",
    "batchnorm": "train: batch statistics; frozen: keep the pretrained statistics (small batches); "
                 "sync: SyncBatchNorm across the GPUs of a torchrun job",
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args and type(None) in args else kind
        extra: dict = {"default": None, "help": HELP.get(f.name, "") + f" (default: {f.default})"}
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **extra)
        elif typing.get_origin(base) is typing.Literal:
            p.add_argument(flag, choices=typing.get_args(base), **extra)
        elif typing.get_origin(base) is tuple:
            p.add_argument(flag, type=float, nargs=3, metavar=("R", "G", "B"), **extra)
        else:
            p.add_argument(flag, type=base, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferkit", description="Transfer learning for image classification on PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final result")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a pretrained backbone on a data set")
    _add_config_flags(t)
    t.add_argument("--config", type=Path, help="YAML file of settings (a run's config.yaml works); flags win")
    t.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this folder")
    t.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")

    e = sub.add_parser("eval", help="evaluate a run on a data set with the same classes")
    e.add_argument("run", type=Path)
    e.add_argument("--data", help="data set (default: the one the run was trained on)")
    e.add_argument("--data-dir")
    e.add_argument("--split", choices=("train", "val", "test"), help="default: test, else val, else all")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_test_time_options(e)

    pr = sub.add_parser("predict", help="classify image files and folders with a run")
    pr.add_argument("run", type=Path)
    pr.add_argument("paths", nargs="+", help="image files and/or folders")
    pr.add_argument("--topk", type=int, default=3)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_test_time_options(pr)

    d = sub.add_parser("demo", help="offline default job: ImageNet MobileNetV2 fine-tuned on Fashion-MNIST")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int)

    sub.add_parser("models", help="list backbones and whether their weights are on this machine")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except Interrupted as e:
        if e.main:  # under torchrun, rank 0 speaks for the job
            print(str(e), file=sys.stderr)
        return 130
    except TransferkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_train(args: argparse.Namespace) -> int:
    from .fit import train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.resume is None and args.config is None and "data" not in flags and flags.get("recipe") != "demo":
        raise TransferkitError("train needs --data: an image folder (root/<class>/ or root/train/<class>/) or one "
                               "of cifar10, cifar100, fashion-mnist, mnist; 'transferkit demo' runs the offline "
                               "default job")
    if args.resume is not None:
        result = train(resume=args.resume, **flags)
    elif args.config is not None:
        result = train(TrainConfig.from_yaml(args.config, **flags), overwrite=args.overwrite)
    else:
        recipe = flags.pop("recipe", None)
        result = train(TrainConfig.create(recipe=recipe, **flags), overwrite=args.overwrite)
    _print_result(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .fit import train

    cfg = TrainConfig.create(recipe="demo", out=args.out, epochs=args.epochs)
    result = train(cfg, overwrite=True)
    _print_result(result)
    return 0


def _print_result(result) -> None:
    from .report import top_label

    if not result.main:  # under torchrun, rank 0 speaks for the job
        return
    m = result.metrics
    print(f"accuracy {100 * m['accuracy']:.2f}% ({top_label(m)} {100 * m['top5']:.2f}%) on "
          f"{result.measured_on}; {result.seconds / 60:.1f} min")
    print(f"run folder: {result.out_dir}  report: {result.out_dir / 'report.md'}")


def add_test_time_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="model input side (default: the one trained at); a model trained on random-resized crops "
                        "often scores higher a little above it")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each image's prediction with its mirror image's "
                        "(twice the compute)")


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import read_card
    from .data.sources import is_named
    from .predict import evaluate_run
    from .report import top_label

    data = args.data or read_card(args.run).data
    if not data:
        raise TransferkitError("pass --data: the run does not record its data set")
    if not args.data and not is_named(data) and not Path(data).exists():
        raise TransferkitError(f"the run's data folder {data} (recorded in {args.run}/model.json) is missing; if it "
                               "moved, pass its new place with --data NEWPATH")
    metrics, measured_on, report = evaluate_run(args.run, data, data_dir=args.data_dir, split=args.split,
                                                batch_size=args.batch_size, device=args.device,
                                                image_size=args.image_size, tta=args.tta)
    if args.json:
        print(json.dumps(dict(metrics, measured_on=measured_on), indent=2))
        return 0
    print(f"accuracy {100 * metrics['accuracy']:.2f}% ({top_label(metrics)} {100 * metrics['top5']:.2f}%) "
          f"on {measured_on}")
    width = max(len(r["class"]) for r in metrics["per_class"])
    for r in metrics["per_class"]:
        print(f"  {r['class']:<{width}}  precision {100 * r['precision']:5.1f}%  recall {100 * r['recall']:5.1f}%"
              f"  F1 {100 * r['f1']:5.1f}%  ({r['support']} images)")
    print(f"report: {report}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import Predictor

    if args.topk < 1:
        raise TransferkitError("--topk must be at least 1")
    predictor = Predictor.from_run(args.run, device=args.device, image_size=args.image_size, tta=args.tta)
    missing = [str(p) for p in args.paths if not Path(p).exists()]
    if missing:  # named on the command line: a typo, not a file to skip
        raise TransferkitError(f"no such file or folder: {', '.join(missing)}")
    results, errors = predictor.predict_paths(args.paths, topk=args.topk)
    for path, reason in errors:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps({"predictions": results,
                          "errors": [{"file": p, "reason": r} for p, r in errors]}, indent=2))
    else:
        for r in results:
            tops = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"])
            print(f"{r['file']}: {tops}")
    if not results:
        print("error: no image could be read", file=sys.stderr)
        return 2
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from torchvision.models import get_model_weights

    from .models import available_models, local_weight_file

    print(f"{'model':<22} {'weights on this machine':<28} other weights (need a download or --weights FILE)")
    for name in available_models():
        try:
            entries = list(get_model_weights(name))
        except (KeyError, ValueError):
            entries = []
        here = [w.name for w in entries if local_weight_file(w) is not None]
        other = [w.name for w in entries if w.name not in here]
        print(f"{name:<22} {', '.join(here) or '-':<28} {', '.join(other) or '-'}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo, "models": cmd_models}


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)  # stdout carries only results (and --json)
    handler.setFormatter(_Format("%(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    logger = logging.getLogger("transferkit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)  # the run's train.log gets everything
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
