"""On a CUDA GPU (skipped without one; benchmarks/gpu.sh runs these): a training step there is the CPU's step,
and precision auto trains in bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torchvision

from transferkit import models
from transferkit.data.preprocess import Preprocessing
from transferkit.data.transforms import TrainTransform
from transferkit.runtime import resolve_precision
from transferkit.training import engine

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible (CPU-only machine)")]


def _step(device: torch.device, precision: str) -> tuple[dict[str, torch.Tensor], list[torch.dtype], float,
                                                         torch.Tensor]:
    """One transferkit training step of a small ResNet on fixed images: the weights after it, the dtypes its
    first convolution computed in (one per pass), the loss and the step's update of the weights."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    model.to(device)
    dtypes: list[torch.dtype] = []
    model.conv1.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
    opt = torch.optim.SGD(models.param_groups(model, "fc", 0.1, 1.0, 0.0), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    images = torch.randint(0, 256, (32, 3, 40, 40), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    pre = Preprocessing(32, 36)
    setup = engine.StepSetup(TrainTransform(pre), device, precision, micro_batch=16, label_smoothing=0.1)
    # The crops are drawn on the cpu from one seed, so both devices train on the same pixels.
    fig = engine.train_step(model, opt, sched, images, labels, setup, torch.Generator().manual_seed(2))
    after = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    update = torch.cat([(after[k] - before[k]).flatten() for k in before if k.endswith("weight")])
    return after, dtypes, fig.loss.item() / 32, update


def test_a_cuda_step_equals_the_cpu_step_and_auto_precision_is_bf16_autocast():
    cuda = torch.device("cuda")
    cpu_weights, cpu_dtypes, cpu_loss, cpu_update = _step(torch.device("cpu"), "fp32")
    gpu_weights, gpu_dtypes, gpu_loss, _ = _step(cuda, "fp32")
    assert cpu_dtypes == gpu_dtypes == [torch.float32, torch.float32]  # two passes of 16
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-3)
    for k, v in cpu_weights.items():  # cuDNN may use TF32 convolutions: close, not bit-equal
        assert torch.allclose(gpu_weights[k], v, rtol=1e-2, atol=1e-3), k
    precision = resolve_precision("auto", cuda)
    assert precision == "bf16"  # an H100/H200 computes bf16 natively
    _, bf16_dtypes, bf16_loss, bf16_update = _step(cuda, precision)
    assert bf16_dtypes == [torch.bfloat16, torch.bfloat16]
    assert bf16_loss == pytest.approx(cpu_loss, rel=5e-2)
    # the bf16 step goes where the fp32 one goes, to bf16's precision (0.93 measured with CPU bf16)
    assert torch.nn.functional.cosine_similarity(bf16_update, cpu_update, dim=0) > 0.9
