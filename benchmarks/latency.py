"""Inference latency of a run: PyTorch eager vs onnxruntime fp32 vs onnxruntime int8, on this CPU.

    python benchmarks/latency.py RUN [--repeats 50] [--batch-repeats 5]

Exports the run to a temporary folder (fp32 and int8, both checked as `transferkit export` checks them),
then times batch-1 calls (p50/p99 milliseconds, images/s) and batch-32 calls (images/s) at the run's input
size, on uint8 input as a deployer feeds it. Prints the machine (CPU model, the SIMD flags that matter) and
a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from transferkit.export import Deployable, export_run
from transferkit.predict import Predictor

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine() -> str:
    """CPU model, cores and the flags that decide fp32/int8 speed."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags] or ["none of " + ", ".join(FLAGS)]
    return f"{model}, {os.cpu_count()} logical cores, flags: {' '.join(have)}"


def timed(call: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds of each of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        out.append(1000 * (time.perf_counter() - start))
    return out


def percentile(ms: list[float], q: float) -> float:
    return float(np.percentile(np.array(ms), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder")
    parser.add_argument("--repeats", type=int, default=50, help="timed batch-1 calls per engine [default: 50]")
    parser.add_argument("--batch-repeats", type=int, default=5, help="timed batch-32 calls per engine [default: 5]")
    parser.add_argument("--check-images", type=int, default=64, help="parity-check images of each export")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads of each engine (on a loaded machine, 1: spinning thread pools collapse there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pred = Predictor.from_run(args.run, device="cpu")
    side = pred.preprocessing.image_size
    eager = Deployable(pred.model.float().eval(), pred.preprocessing).eval()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        int8 = Path(tmp) / "model.int8.onnx"
        export_run(args.run, out=fp32, check_images=args.check_images)
        q = export_run(args.run, out=int8, quantize="int8", max_drop=100, check_images=args.check_images)[0]
        engines: dict[str, Callable[[np.ndarray], object]] = {}

        def torch_call(x: np.ndarray) -> object:
            with torch.inference_mode():
                return eager(torch.from_numpy(x))

        engines["PyTorch eager fp32"] = torch_call
        for name, path in (("onnxruntime fp32", fp32), (f"onnxruntime int8 ({q['quantization']['method']})", int8)):
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = args.threads
            session = onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            engines[name] = lambda x, s=session: s.run(None, {"images": x})
        rng = np.random.default_rng(0)
        one = rng.integers(0, 256, (1, 3, side, side), dtype=np.uint8)
        many = rng.integers(0, 256, (32, 3, side, side), dtype=np.uint8)
        rows = []
        for name, call in engines.items():
            ms1 = timed(lambda c=call: c(one), args.repeats)
            ms32 = timed(lambda c=call: c(many), args.batch_repeats, warmup=1)
            rows.append((name, percentile(ms1, 50), percentile(ms1, 99), 1000 / statistics.mean(ms1),
                         32 * 1000 / statistics.mean(ms32)))
    print(f"machine: {machine()}; onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")
    print(f"run: {args.run} ({pred.model.__class__.__name__}, {side}x{side} input); {args.threads} thread(s) per "
          f"engine, {args.repeats} batch-1 calls, {args.batch_repeats} batch-32 calls per engine; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    qz = q["quantization"]
    print(f"int8: test accuracy {100 * qz['accuracy_fp32']:.2f}% fp32 -> {100 * qz['accuracy_int8']:.2f}% int8 on "
          f"{qz['test_images']} images")
    print("\n| engine | batch 1 p50 ms | batch 1 p99 ms | batch 1 images/s | batch 32 images/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, p50, p99, ips1, ips32 in rows:
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {ips1:.0f} | {ips32:.0f} |")


if __name__ == "__main__":
    main()
