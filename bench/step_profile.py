"""Where a training step's time goes, and how near this CPU's peak its convolutions run.

Times the plain training step of bench/throughput.py (the next augmented batch, forward, loss,
backward, optimizer and schedule steps) for the configured model, batch and precision, then
profiles it: the kernels that take the time, and the convolutions' rate against a large matrix
multiplication in the same precision, the fastest this CPU computes. If the convolutions ran at
that rate and nothing else took any time, a step could be at most `bound` times faster.

usage: python bench/step_profile.py [--data data/prepared] [OVERRIDE ...]
       python bench/step_profile.py --tiny      # random data, seconds: the CI smoke test
Overrides are Hydra overrides of conf/ (e.g. trainer.precision=32-true loader.batch_size=256).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import console
import torch
from throughput import cifar_like, plain_step, quiet_profiler, step_config
from torch import nn

from cnnpipe.data.prepared import Prepared, write_random
from cnnpipe.training import build


def matmul_rate(dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n matrix product: about the most this CPU computes in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats, start = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def conv_flops(net: nn.Module, step) -> float:
    """The FLOPs of one step's convolutions: forward, the weights' gradient, and the input's
    gradient where the input needs one (not for the first convolution, whose input is the
    image)."""
    total = []

    def count(conv: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        n, c_out, h, w = output.shape
        macs = n * c_out * h * w * conv.in_channels // conv.groups * conv.weight[0, 0].numel()
        total.append(2 * macs * (3 if inputs[0].requires_grad else 2))

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, nn.Conv2d)]
    step()
    for hook in hooks:
        hook.remove()
    return sum(total)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--tiny", action="store_true", help="random data and a few steps")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernels", type=int, default=10, help="rows of the kernel table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = step_config(args.overrides)
    steps, rounds, side = args.steps, args.rounds, 2048
    data = Path(args.data)
    if args.tiny:
        data = Path(tempfile.mkdtemp()) / "prepared"
        write_random(data, train=256, test=0)
        cfg.loader.batch_size, steps, rounds, side = 32, 3, 2, 256
    build.reuse_freed_memory()  # as training has it
    precision = build.precision(cfg)
    module = build.module(cfg, cifar_like(cfg))
    step = plain_step(cfg, module, Prepared.open(data), 6 + 2 * rounds * steps)
    flops = conv_flops(module, step)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    for _ in range(5):
        step()
    # A shared VM's speed drifts: each round times the steps, profiles them and times the matrix
    # product, one after the other, and the medians over rounds are compared.
    ms, conv_ms, peaks, profiles = [], [], [], []
    for _ in range(rounds):
        ms.append(1e3 * sum(step() for _ in range(steps)) / steps)
        with quiet_profiler(record_shapes=True) as prof:
            for _ in range(steps):
                step()
        kernels = prof.key_averages(group_by_input_shape=True)
        per_step = {k: e.self_cpu_time_total / steps / 1e3 for k, e in enumerate(kernels)}
        conv_ms.append(sum(t for k, t in per_step.items() if "convolution" in kernels[k].key))
        profiles.append((kernels, per_step))
        peaks.append(matmul_rate(dtype, side))
    ms, peak = statistics.median(ms), statistics.median(peaks)
    kernels, per_step = profiles[conv_ms.index(statistics.median_low(conv_ms))]
    conv_ms = statistics.median_low(conv_ms)

    print(f"\n{console.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"model {cfg.model._target_}, batch {cfg.loader.batch_size}, precision {precision}, "
        f"channels_last {cfg.loader.channels_last}"
    )
    print(f"a training step: {ms:.1f} ms (median of {rounds} rounds of {steps} steps)")
    print("\nthe profile of the round with the median convolution time:")
    print(f"{'op, first input':<60} {'ms/step':>8} {'share':>6}")
    profiled = sum(per_step.values())
    for k, t in sorted(per_step.items(), key=lambda kt: -kt[1])[: args.kernels]:
        shapes = kernels[k].input_shapes
        name = f"{kernels[k].key} {shapes[0] if shapes and shapes[0] else ''}"
        print(f"{name[:60]:<60} {t:8.2f} {t / profiled:6.0%}")
    rate, ideal = flops / (conv_ms / 1e3), flops / peak * 1e3
    print(
        f"\nconvolutions: {flops / 1e9:.2f} GFLOP in {conv_ms:.1f} ms = {rate / 1e9:.0f} GFLOP/s; "
        f"a {side}x{side} matmul in {str(dtype).removeprefix('torch.')}: "
        f"{peak / 1e9:.0f} GFLOP/s ({rate / peak:.0%})"
    )
    print(
        f"at the matmul's rate, with nothing else, a step would take {ideal:.1f} ms: "
        f"bound = {ms / ideal:.2f}x faster at most"
    )


if __name__ == "__main__":
    console.run(main)
