"""The task a model answers: one class per image (softmax) or any set of labels (sigmoid).

Every rule that differs between the two lives here: the loss, the probabilities, test-time
augmentation, the metrics, what validation records and which figure heads a report. A model's
task is `ModelCard.task`; a split's labels say it too: (N,) class indices for one class per
image, (N, C) rows of 0/1 for multi-label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data.splits import multi_hot

SINGLE, MULTILABEL = "single", "multilabel"
TASKS = (SINGLE, MULTILABEL)
# the --select-by figures each task's epoch rows hold (training.state.SELECTION names their keys)
SELECT_BY = {SINGLE: ("accuracy", "balanced-accuracy", "macro-f1", "loss"),
             MULTILABEL: ("map", "macro-f1", "loss")}


# the asymmetric loss (Ridnik et al., ICCV 2021) at the paper's settings: negatives' loss focused
# by p^4 and shifted by 0.05 (an easy negative costs nothing), positives' plain
ASL_GAMMA_NEG, ASL_GAMMA_POS, ASL_CLIP = 4.0, 0.0, 0.05


@dataclass(frozen=True)
class Task:
    name: str
    multilabel_loss: str = "bce"  # or "asl" (--multilabel-loss); training alone uses it

    @property
    def multilabel(self) -> bool:
        return self.name == MULTILABEL

    def loss(self, logits: torch.Tensor, y: torch.Tensor, *, weights: torch.Tensor | None = None,
             smoothing: float = 0.0) -> torch.Tensor:
        """The summed loss of a batch: cross-entropy (weighted by class, smoothed), or binary
        cross-entropy (or the asymmetric loss) summed over the labels (`weights`: each label's
        positive weight; smoothing moves every 0/1 target `smoothing / 2` toward the other)."""
        if not self.multilabel:
            return F.cross_entropy(logits, y, weight=weights, label_smoothing=smoothing,
                                   reduction="sum")
        target = y.to(logits.dtype) * (1 - smoothing) + smoothing / 2
        if self.multilabel_loss == "asl":
            return _asymmetric(logits, target, weights)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weights,
                                                  reduction="sum")

    def norm(self, labels: torch.Tensor, weights: torch.Tensor | None) -> float:
        """What a batch's summed loss is divided by: its images (or, weighted single-label, the
        sum of its images' class weights, as a weighted mean cross-entropy is)."""
        if weights is None or self.multilabel:
            return float(labels.shape[0])
        return weights[labels].sum().item()

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Right answers in a batch: the top class, or (multi-label) every label's yes/no at 0.5."""
        if not self.multilabel:
            return (logits.argmax(1) == y).sum()
        return ((logits > 0) == y.bool()).all(1).sum()

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """softmax(logits / temperature), or each label's sigmoid."""
        if self.multilabel:
            return torch.sigmoid(logits.float())
        return (logits.float() / temperature).softmax(1)

    @staticmethod
    def answered(probabilities: torch.Tensor, thresholds: list[float] | None) -> torch.Tensor:
        """Multi-label: each label's yes/no (N, C), its probability >= its threshold (None: the
        default 0.5 each), as report.multilabel predicts them."""
        from .report.multilabel import DEFAULT_THRESHOLD
        cut = [DEFAULT_THRESHOLD] * probabilities.shape[1] if thresholds is None else thresholds
        return probabilities.double() >= torch.tensor(cut, dtype=torch.float64)

    def tta(self, logits: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
        """Scores of an image and its mirror image together: logits whose probabilities are the
        mean of the two's."""
        mean = (self.probabilities(logits) + self.probabilities(mirrored)) / 2
        return torch.logit(mean, eps=1e-7) if self.multilabel else mean.log()

    def mean_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """The plain loss per image (no smoothing, no weights): val_loss."""
        if not self.multilabel:  # torch's mean, in float32, as every earlier run recorded it
            return F.cross_entropy(logits.float(), labels).item()
        return self.loss(logits.float(), labels).item() / max(len(labels), 1)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                thresholds: list[float] | None = None) -> dict[str, Any]:
        """What a report shows of a split (report.metrics or report.multilabel), with "task"."""
        from .report import metrics, multilabel
        if self.multilabel:
            m = multilabel.multilabel_metrics(logits, labels, classes, thresholds)
        else:
            m = metrics.classification_metrics(logits, labels, classes)
        return {"task": self.name, **m}

    def val_figures(self, logits: torch.Tensor, labels: torch.Tensor,
                    classes: list[str]) -> dict[str, float | None]:
        """The epoch row's validation figures: what --select-by can choose from."""
        if labels.numel() == 0:
            return self.no_val_figures()
        if self.multilabel:  # at the thresholds this epoch's weights would be given
            from .report.multilabel import choose_thresholds
            chosen = choose_thresholds(logits, labels, classes, say=False)
            m = self.metrics(logits, labels, classes, chosen)
            return {"val_map": m["map"], "val_micro_f1": m["micro_f1"],
                    "val_macro_f1": m["macro_f1"], "val_exact_match": m["exact_match"],
                    "val_loss": self.mean_loss(logits, labels)}
        m = self.metrics(logits, labels, classes)
        return {"val_acc": m["accuracy"], "val_balanced_acc": m["balanced_accuracy"],
                "val_macro_f1": m["macro_f1"], "val_loss": self.mean_loss(logits, labels)}

    def no_val_figures(self) -> dict[str, None]:
        keys = (("val_map", "val_micro_f1", "val_macro_f1", "val_exact_match", "val_loss")
                if self.multilabel else
                ("val_acc", "val_balanced_acc", "val_macro_f1", "val_loss"))
        return dict.fromkeys(keys)


def _asymmetric(logits: torch.Tensor, target: torch.Tensor,
                weights: torch.Tensor | None) -> torch.Tensor:
    """The summed asymmetric loss: -(y (1-p)^g+ log p + (1-y) pm^g- log(1-pm)), pm = max(p-m, 0)."""
    p = torch.sigmoid(logits)
    shifted = (p - ASL_CLIP).clamp(min=0)
    positive = target * (1 - p) ** ASL_GAMMA_POS * F.logsigmoid(logits)
    if weights is not None:
        positive = positive * weights
    negative = (1 - target) * shifted ** ASL_GAMMA_NEG * torch.log((1 - shifted).clamp(min=1e-8))
    return -(positive + negative).sum()


ONE_CLASS = Task(SINGLE)


def task_of(of: Any) -> Task:
    """The task of a name, a ModelCard, a Split or a labels tensor (2-D labels: multi-label)."""
    if isinstance(of, Task):
        return of
    if isinstance(of, str):
        return Task(of if of in TASKS else SINGLE)
    if isinstance(of, torch.Tensor):
        return Task(MULTILABEL if multi_hot(of) else SINGLE)
    if hasattr(of, "labels"):
        return task_of(of.labels)
    return Task(getattr(of, "task", SINGLE))


def settle(cfg: Any, multilabel: bool, requested: dict[str, Any]) -> Any:
    """The settings with the data's task resolved (`cfg.task` as the data showed it, and
    --select-by accuracy as map for multi-label), what was asked kept in `requested` (config.yaml
    keeps it, so a torchrun restart or a resume compares what was asked); or one sentence for a
    setting the task cannot honour."""
    settled = _settled(cfg, multilabel)
    for name in ("task", "select_by"):
        if getattr(settled, name) != getattr(cfg, name):
            requested.setdefault(name, getattr(cfg, name))
    return settled


def _settled(cfg: Any, multilabel: bool) -> Any:
    from .errors import TransferkitError
    # a --task the data cannot give is refused where the data is read (data.sources.load_source)
    task = MULTILABEL if multilabel else SINGLE
    if not multilabel:
        if cfg.select_by == "map":
            raise TransferkitError("--select-by map is for multi-label data; use accuracy, "
                                   "balanced-accuracy, macro-f1 or loss")
        return cfg.replace(task=task)
    if cfg.select_by not in SELECT_BY[MULTILABEL] + ("accuracy",):
        raise TransferkitError(f"--select-by {cfg.select_by} is for one class per image; a "
                               "multi-label run selects by map, macro-f1 or loss")
    refused = {"sampler": ("balanced", "--sampler balanced draws images by their class, and a "
                           "multi-label image has several; use --class-weights auto (each label's "
                           "positives weighted by its negatives over its positives) instead"),
               "calibrate": (True, "--calibrate fits one softmax temperature, and a multi-label "
                             "model answers with one sigmoid per label, its threshold chosen on "
                             "validation; drop --calibrate")}
    for name, (value, why) in refused.items():
        if getattr(cfg, name) == value:
            raise TransferkitError(why)
    return cfg.replace(task=task, select_by="map" if cfg.select_by == "accuracy"
                       else cfg.select_by)
