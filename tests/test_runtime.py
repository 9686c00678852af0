"""runtime.depthwise_in_fp32: a speed change for bf16 training on CPUs that must change nothing else."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from transferkit.runtime import Fp32DepthwiseConv2d, depthwise_in_fp32

CPU = torch.device("cpu")


@pytest.fixture
def pair():
    torch.manual_seed(0)
    plain = torchvision.models.mobilenet_v2(num_classes=10)
    fast = copy.deepcopy(plain)
    assert depthwise_in_fp32(fast, CPU, "bf16") == 17  # one depthwise convolution in each inverted residual block
    return plain, fast


def test_only_bf16_on_a_cpu_is_changed():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    assert depthwise_in_fp32(model, CPU, "fp32") == 0
    assert depthwise_in_fp32(model, torch.device("cuda"), "bf16") == 0
    assert not any(isinstance(m, Fp32DepthwiseConv2d) for m in model.modules())


def test_the_weights_and_fp32_outputs_are_the_same(pair):
    plain, fast = pair
    a, b = plain.state_dict(), fast.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # a saved model loads anywhere
    x = torch.randn(2, 3, 48, 48)
    plain.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), fast(x))


def test_a_bf16_training_step_gets_gradients_at_least_as_close_to_fp32(pair):
    plain, fast = (m.features[1:5] for m in pair)  # blocks with a strided and unstrided depthwise convolution
    x = torch.randn(8, 32, 28, 28)

    def grads(blocks, bf16):
        blocks.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = blocks(x)
        out.float().square().mean().backward()
        return out.dtype, torch.cat([p.grad.flatten() for p in blocks.parameters()])

    _, exact = grads(copy.deepcopy(plain), bf16=False)
    dtype_plain, g_plain = grads(plain, bf16=True)
    dtype_fast, g_fast = grads(fast, bf16=True)
    assert dtype_plain == dtype_fast == torch.bfloat16  # what follows each convolution still runs in bf16
    err_plain, err_fast = ((g - exact).norm() / exact.norm() for g in (g_plain, g_fast))
    assert err_fast < 0.05 and err_fast <= err_plain * 1.05, (err_fast, err_plain)


def test_without_a_backward_pass_the_bf16_kernel_runs(pair):
    _, fast = pair
    conv = next(m for m in fast.modules() if isinstance(m, Fp32DepthwiseConv2d))
    x = torch.randn(1, conv.in_channels, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x.bfloat16()).dtype == torch.bfloat16  # computed in fp32, handed on as its input came
