"""The words a run's log and report use for its setup: the report's "Setup" section, its strategy,
augmentation and validation lines."""

from __future__ import annotations

import inspect
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

from .. import runfiles
from ..checkpoint import ModelCard
from ..config import RECIPE_MODELS, TrainConfig, requested_from
from ..data.splits import DataSource
from ..data.transforms import TrainTransform
from ..runtime import Compute
from .plan import choose_strategy
from .state import TrainState, selection_score


def setup_section(cfg: TrainConfig, card: ModelCard, state: TrainState, data: DataSource,
                  hw: Compute, out: Path, cached: bool) -> dict[str, Any]:
    """The report's "Setup" section (`cached`: training ran on cached features)."""
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    score = selection_score(best, cfg.select_by)
    shown = ("" if score is None else f"{-score:.4f}" if cfg.select_by == "loss"
             else f"{100 * score:.2f}%")
    where = "" if data.val is None or not shown else \
        f", val {cfg.select_by} {shown} on {len(data.val):,} images"
    last = state.history[-1]["epoch"] if state.history else 0
    early = (f"stopped early after epoch {last}: val {cfg.select_by} did not improve by more than "
             f"{cfg.min_delta:g} for {cfg.patience} epochs; "
             if state.stopped_early(cfg.patience) and last < cfg.epochs else "")
    decay = f", layer decay {cfg.layer_decay:g}" if cfg.layer_decay != 1 else ""
    loss = "asymmetric loss (--multilabel-loss asl)" if cfg.multilabel_loss == "asl" else \
        "binary cross-entropy"
    task = {"task": f"multi-label: one sigmoid per label, {loss}" + (
        " with each label's positives weighted by its negatives / positives (--class-weights "
        "auto)" if cfg.class_weights == "auto" else "")} if card.task == "multilabel" else {}
    return {
        **task,
        "model": f"{cfg.model}, weights {card.weights}", "strategy": strategy_line(cfg, data, out),
        "epochs": f"{cfg.epochs} ({early}selected: epoch {state.best_epoch}{where})",
        "sampler": "balanced (each class drawn equally often)" if cfg.sampler == "balanced" else
        "none (each image once per epoch)",
        "train images": f"{len(data.train):,}" + (
            f" ({len(data.skipped):,} unreadable or refused file(s) of the data left out at the "
            f"start, listed in {runfiles.SKIPPED})" if data.skipped else ""),
        "optimizer": f"{cfg.optimizer}, {lr_words(cfg, out)}, backbone x{cfg.backbone_lr_mult:g}"
        f"{decay}, {cfg.schedule}, label smoothing {cfg.label_smoothing:g}",
        "batch size": cfg.batch_size if not hw.dist.on else
        f"{cfg.batch_size} ({hw.dist.world} processes)",
        "precision": f"{card.precision} on {hw.device}",
        "augmentation": augmentation_line(cfg, cached),
        "weights averaged": f"exponential moving average, decay {cfg.ema:g} a step (--ema): "
        "validated and saved" if cfg.ema else "no",
        "test-time augmentation": "mirror image (--tta)" if cfg.tta else "none",
        "normalization": card.preprocessing.normalization,
        "recipe": cfg.recipe or "defaults",
    }


def lr_words(cfg: TrainConfig, out: Path) -> str:
    """'lr 0.003', or with --lr auto where the suggestion came from, and the range test's caution
    (lr_find.json) where it gave one."""
    if requested_from(out / runfiles.CONFIG).get("lr") != "auto":
        return f"lr {cfg.lr:g}"
    found = out / runfiles.LR_FIND_JSON
    caution = json.loads(found.read_text()).get("caution") if found.is_file() else ""
    return (f"lr {cfg.lr:g} (--lr auto: the LR range test's suggestion, {runfiles.LR_FIND_PNG}"
            + (f"; caution: {caution}" if caution else "") + ")")


def strategy_line(cfg: TrainConfig, data: DataSource, out: Path) -> str:
    """The report's strategy: 'linear', 'finetune of the last K blocks ...', or with --strategy auto
    'linear (chosen by --strategy auto: why)'."""
    for_model = RECIPE_MODELS.get(cfg.recipe or "", {}).get(cfg.model, {})
    source = (f", as in --recipe {cfg.recipe}"
              if for_model.get("trainable_blocks") == cfg.trainable_blocks else "")
    what = cfg.strategy + (f", the last {cfg.trainable_blocks} backbone blocks and the head "
                           f"(--trainable-blocks {cfg.trainable_blocks}{source})"
                           if cfg.trainable_blocks else "")
    if requested_from(out / runfiles.CONFIG).get("strategy") != "auto":
        return what
    why = choose_strategy(cfg.replace(strategy="auto"), len(data.train))[1]
    return f"{what} (chosen by --strategy auto: {why})"


def augmentation_line(cfg: TrainConfig, cached: bool) -> str:
    """The report's line on what changed the training images (`cached`: nothing did, training read
    their features)."""
    if cached:
        return ("none: trained on cached features of one un-augmented view (--no-feature-cache "
                "trains on the images)")
    parts = [crop_line(cfg.crop_scale) + (" + flip" if cfg.flip else "")] if cfg.augment else []
    parts += [cfg.augment_policy] if cfg.augment_policy != "none" else []
    parts += [f"random erasing p {cfg.random_erasing:g}"] if cfg.random_erasing else []
    parts += [f"{n} {getattr(cfg, n):g}" for n in ("mixup", "cutmix") if getattr(cfg, n)]
    parts += [f"progressive {cfg.progressive} px -> {cfg.image_size} px"] if cfg.progressive else []
    return ", ".join(parts) or "none"


def crop_line(crop_scale: float) -> str:
    """What the random-resized crop keeps of each image: the area drawn from [crop_scale, 1] and
    the aspect from the transform's ratio range, each side then clamped to the image, so even
    --crop-scale 1 keeps less than the whole of most images (the demo's 87-100%)."""
    ratio = inspect.signature(TrainTransform).parameters["ratio"].default

    def kept(area: float, aspect: float) -> float:  # of a square stored image
        return min(1.0, math.sqrt(area * aspect)) * min(1.0, math.sqrt(area / aspect))

    least = min(kept(crop_scale, r) for r in ratio)
    aspects = "-".join(str(Fraction(r).limit_denominator(16)) for r in ratio)
    what = ("aspect jitter only: a crop of the whole width or height" if crop_scale == 1
            else "random-resized crop")
    return (f"{what}, {100 * least:.0f}-100% of the image, aspect {aspects}, resized to the input "
            f"(--crop-scale {crop_scale:g})")


def val_line(val: dict[str, float | None], select_by: str) -> str:
    """'val_acc 91.20%  val_bal_acc 88.10%' (and the selection metric where it is another);
    multi-label: 'val_mAP 81.20%  val_macro_f1 70.10%'."""
    if "val_map" in val:
        if val["val_map"] is None:
            return "val_mAP -"
        f1 = val["val_macro_f1"]
        line = (f"val_mAP {100 * val['val_map']:.2f}%  val_macro_f1 "
                + ("-" if f1 is None else f"{100 * f1:.2f}%"))
        return line + (f"  val_loss {val['val_loss']:.4f}" if select_by == "loss" else "")
    if val["val_acc"] is None:
        return "val_acc -"
    line = f"val_acc {100 * val['val_acc']:.2f}%  val_bal_acc {100 * val['val_balanced_acc']:.2f}%"
    if select_by == "macro-f1":
        line += f"  val_macro_f1 {100 * val['val_macro_f1']:.2f}%"
    elif select_by == "loss":
        line += f"  val_loss {val['val_loss']:.4f}"
    return line
