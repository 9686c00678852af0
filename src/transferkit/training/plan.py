"""The transfer policy as a value: which strategy, which blocks train in which
epoch, on images or on cached features, at what size. `make_plan` decides; the
epoch loop and the report read the `Plan`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from .. import models
from ..config import AUTO_FINETUNE_FROM, TrainConfig
from ..data.preprocess import Preprocessing
from ..data.splits import DataSource
from ..data.transforms import EvalTransform, TrainTransform
from ..errors import TransferkitError
from ..runtime import Compute
from . import engine
from .features import Stage, activations_fit, cached_stage, supports_feature_cache
from .layerwise import layer_decay_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Who trains when, on what: the run's transfer policy, decided once."""

    strategy: str  # linear | finetune | gradual (auto resolved)
    frozen_blocks: tuple[str, ...]  # --trainable-blocks: the first blocks, never trained
    on: Literal["images", "features", "activations"]  # what training reads (the last two cached)
    head_epochs: int
    epochs: int
    image_size: int
    progressive: int | None

    @property
    def cached(self) -> bool:
        return self.on != "images"

    def backbone_frozen(self, epoch: int) -> bool:
        """Whether the backbone stays frozen in `epoch`
        (a probe always; gradual for its head epochs)."""
        return self.strategy == "linear" or (self.strategy == "gradual"
                                             and epoch <= self.head_epochs)

    def size(self, epoch: int) -> int:
        """The side `epoch` trains at (--progressive grows it)."""
        return progressive_size(epoch, self.epochs, self.progressive, self.image_size)


def choose_strategy(cfg: TrainConfig, train_images: int) -> tuple[str, str]:
    """--strategy auto: the strategy for this training split, and why, in words for the log."""
    if cfg.strategy != "auto":
        return cfg.strategy, "asked for"
    if cfg.weights.lower() == "none":
        return "finetune", "random weights (--weights none) give no features to probe"
    needs_backbone = [flag for flag, on in (
        ("--trainable-blocks", cfg.trainable_blocks is not None),
        ("--layer-decay", cfg.layer_decay != 1),
    ) if on]
    needs_backbone += image_options(cfg)
    if needs_backbone:
        return "finetune", f"{', '.join(needs_backbone)} train(s) the backbone on augmented images"
    if train_images < AUTO_FINETUNE_FROM:
        return "linear", (f"{train_images:,} training images, fewer than {AUTO_FINETUNE_FROM:,}: "
                          "on this little data the frozen pretrained features, probed on cached "
                          "features, beat a full fine-tune in a fraction of its time")
    return "finetune", (f"{train_images:,} training images, {AUTO_FINETUNE_FROM:,} or more: "
                        "a full fine-tune")


def resolve_strategy(cfg: TrainConfig, train_images: int, requested: dict[str, Any]) -> TrainConfig:
    """Resolve --strategy auto by the training split;
    config.yaml keeps `auto` under requested:, so a resumed run goes on with what was chosen."""
    if cfg.strategy != "auto":
        return cfg
    strategy, why = choose_strategy(cfg, train_images)
    alternative = "--strategy finetune to train the whole network" if strategy == "linear" else \
        "--strategy linear for a probe on cached features"
    log.info("strategy %s (auto): %s; %s", strategy, why, alternative)
    requested["strategy"] = "auto"
    return cfg.replace(strategy=strategy)


def frozen_blocks(cfg: TrainConfig, bb: models.Backbone) -> tuple[str, ...]:
    """The blocks --trainable-blocks leaves frozen (none without it)."""
    if not cfg.trainable_blocks:
        return ()
    return tuple(models.frozen_prefix(bb.model, bb.head, cfg.trainable_blocks))


def make_plan(cfg: TrainConfig, bb: models.Backbone, pre: Preprocessing, data: DataSource,
              device: torch.device, frozen: tuple[str, ...]) -> Plan:
    """The policy of a run whose strategy is resolved:
    what trains in which epoch, on what (`frozen`: frozen_blocks)."""
    linear = (cfg.strategy == "linear" and cfg.feature_cache
              and supports_feature_cache(bb.model, bb.head))
    images = sum(len(s) for s in (data.train, data.val, data.test) if s is not None)
    trunk = bool(frozen) and cfg.feature_cache and models.caches_activations(bb.model) and \
        activations_fit(bb.model, frozen[-1], pre.image_size, device, images)
    on = "features" if linear else "activations" if trunk else "images"
    if on != "images":
        check_uncached(cfg)
    elif frozen:  # (the cached case says so when the cache is made)
        log.info("training the last %d blocks and the head; the blocks up to %s stay frozen and "
                 "run every step on the augmented images", cfg.trainable_blocks, frozen[-1])
    return Plan(cfg.strategy, frozen, on, cfg.head_epochs, cfg.epochs, pre.image_size,
                cfg.progressive)


def build_stage(plan: Plan, cfg: TrainConfig, bb: models.Backbone, pre: Preprocessing,
                data: DataSource, hw: Compute) -> Stage:
    """What trains and evaluates: the whole network on images, or the rest on cached features."""
    micro = engine.micro_batch_for(cfg.micro_batch, hw.device, pre.image_size)
    train_tf = TrainTransform(pre, augment=cfg.augment, flip=cfg.flip, scale=(cfg.crop_scale, 1.0),
                              channels_last=cfg.channels_last, policy=cfg.augment_policy,
                              erasing=cfg.random_erasing)
    stage = Stage(bb.model, data.train, data.val, data.test, train_tf,
                  EvalTransform(pre, cfg.channels_last), micro,
                  engine.eval_batch_for(cfg.batch_size, hw.dist, micro))
    if not plan.cached:
        return stage
    # the mirror image needs the whole model: the final evaluation reads the test images
    if cfg.tta:
        stage = replace(stage, test=None)
    key = {"arch": cfg.model, "weights": bb.weights, "build": bb.build_kwargs,
           "preprocessing": pre.to_dict()}
    frozen = [] if plan.on == "features" else list(plan.frozen_blocks)
    stage = cached_stage(stage, bb.model, bb.head, frozen, key, device=hw.device,
                         precision=hw.precision, use_cache=cfg.cache, dist=hw.dist,
                         workers=cfg.workers,
                         eval_batch=engine.eval_batch_for(cfg.batch_size, hw.dist, None))
    if plan.on == "activations":
        log.info("training the last %d blocks on cached activations of %s (one un-augmented view)",
                 cfg.trainable_blocks, plan.frozen_blocks[-1])
    return stage


def progressive_size(epoch: int, epochs: int, start: int | None, size: int) -> int:
    """--progressive: the side epoch `epoch` of `epochs` trains at: `start` first, `size` last, in
    between the straight line rounded to a multiple of 32 px."""
    if start is None or epoch >= epochs:
        return size
    if epoch == 1:
        return start
    between = start + (size - start) * (epoch - 1) / (epochs - 1)
    return min(size, max(start, 32 * round(between / 32)))


def check_progressive(cfg: TrainConfig, bb: models.Backbone, size: int) -> None:
    """Refuse a --progressive start the model or the input size cannot take."""
    if cfg.progressive is None:
        return
    if cfg.progressive >= size:
        raise TransferkitError(f"--progressive {cfg.progressive} must be smaller than the input "
                               f"size ({size} px); lower it or raise --image-size")
    if cfg.model.startswith(models.FIXED_SIZE):
        raise TransferkitError(f"{cfg.model} takes {size} px inputs only; --progressive needs a "
                               "convolutional model (resnet, mobilenet, efficientnet, convnext...)")
    models.check_side(cfg.model, cfg.progressive, size)


def image_options(cfg: TrainConfig) -> list[str]:
    """The flags given that change the training images (beyond crop and flip), which cached features
    cannot."""
    return [flag for flag, on in (("--augment-policy", cfg.augment_policy != "none"),
                                  ("--random-erasing", cfg.random_erasing > 0),
                                  ("--mixup", cfg.mixup > 0), ("--cutmix", cfg.cutmix > 0),
                                  ("--progressive", cfg.progressive is not None))
            if on]


def check_uncached(cfg: TrainConfig) -> None:
    """Refuse what transforms training images where
    training runs on cached features (there are none)."""
    asked = image_options(cfg)
    if asked:
        raise TransferkitError(f"{', '.join(asked)} change(s) the training images, and this run "
                               "trains on cached features of them (--strategy linear "
                               "or --trainable-blocks); add --no-feature-cache to train on the "
                               "images, or drop " + ", ".join(asked))


def param_groups(cfg: TrainConfig, model: torch.nn.Module, head: str) -> list[dict]:
    """The optimizer's groups: head and backbone, or with --layer-decay one per backbone block."""
    if cfg.layer_decay == 1:
        return models.param_groups(model, head, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    try:
        blocks = models.block_names(model, head)
    except TransferkitError:
        raise TransferkitError(f"--layer-decay needs a backbone built from a sequence of blocks "
                               f"(ResNet, RegNet, MobileNet, EfficientNet, ConvNeXt...), not "
                               f"{type(model).__name__}; drop --layer-decay") from None
    return layer_decay_groups(model, head, blocks, lr=cfg.lr, backbone_lr_mult=cfg.backbone_lr_mult,
                              layer_decay=cfg.layer_decay, weight_decay=cfg.weight_decay)
