#!/usr/bin/env python3
"""Training throughput of a trial on the current device, side by side in one run.

1. images/s of the training step of ``resnet20`` and ``resnet18`` (sweep's step: on-device
   uint8 batch -> crop/flip -> normalise -> forward -> backward -> SGD, LR written every step,
   no host sync until the end) in these variants:
   ``fp32`` (NCHW, no autocast), ``cl`` (fp32 channels_last: what sweep runs on the CPU),
   ``bf16+cl`` (bf16 autocast and channels_last: what sweep runs on CUDA; on the CPU autocast
   to bf16 as well, for comparison), and ``bf16+cl+compile``
   (``torch.compile`` of the model; compile time printed separately, not counted);
2. aggregate images/s of 1, 2 and 4 concurrent trials (processes) of ``resnet20`` on the one
   device, each in sweep's own variant for that device (CPU: fp32 channels_last; each process
   gets ``threads // K`` torch threads, at least 1).

CPU runs are small and quick (a few steps); ``--device cuda`` is the GPU benchmark (targets,
issue 5: resnet20 bf16+channels_last >= 2x fp32; 4 concurrent resnet20 >= 2.5x one).

    python scripts/bench_throughput.py [--device cpu|cuda] [--compile] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("fp32", "cl", "bf16+cl", "bf16+cl+compile")


def make_step(model_name: str, variant: str, device_name: str, batch: int):
    """A closure running one training step, and the compile time (s)."""
    import torch
    from torch import nn

    from sweep.training.data import Normalizer, augment
    from sweep.training.models import build_model

    device = torch.device(device_name)
    channels_last = variant != "fp32"
    bf16 = variant.startswith("bf16")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    normalize = Normalizer(device, channels_last)
    generator = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (4 * batch,), device=device)
    forward = model
    compile_seconds = 0.0

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    state = {"t": 0}

    def step():
        i = state["t"] % 4
        state["t"] += 1
        x = normalize(augment(data[i * batch: (i + 1) * batch], generator))
        for group in opt.param_groups:  # the LR is a Python float: no recompile, no sync
            group["lr"] = 0.1 * (1 - state["t"] / 1e6)
        with autocast():
            loss = nn.functional.cross_entropy(forward(x), labels[i * batch: (i + 1) * batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if variant.endswith("compile"):
        began = time.perf_counter()
        forward = torch.compile(model)
        step()  # compiles forward and backward
        sync(device)
        compile_seconds = time.perf_counter() - began
    return step, compile_seconds, device


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(model: str, variant: str, device: str, batch: int, steps: int,
                      warmup: int = 2) -> tuple[float, float]:
    step, compile_seconds, dev = make_step(model, variant, device, batch)
    for _ in range(warmup):
        step()
    sync(dev)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return batch * steps / (time.perf_counter() - began), compile_seconds


def _concurrent_child(model, variant, device, batch, steps, threads, barrier, results):
    import torch

    torch.set_num_threads(threads)
    step, _, dev = make_step(model, variant, device, batch)
    for _ in range(2):
        step()
    sync(dev)
    barrier.wait()
    began = time.time()
    for _ in range(steps):
        step()
    sync(dev)
    results.put((began, time.time(), batch * steps))


def concurrent(k: int, model: str, variant: str, device: str, batch: int, steps: int,
               threads: int) -> float:
    """Aggregate images/s of ``k`` processes training at once (from the first start to the
    last end, after all of them have built and warmed their model)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_child,
                         args=(model, variant, device, batch, steps, threads, barrier, results))
             for _ in range(k)]
    for p in procs:
        p.start()
    got = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(n for _, _, n in got) / (max(e for _, e, _ in got) - min(b for b, _, _ in got))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="resnet20,resnet18")
    parser.add_argument("--batch-size", type=int, help="default 64 on CPU, 512 on CUDA")
    parser.add_argument("--steps", type=int, help="timed steps (default: 6 on CPU, 50 on CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile (default: on CUDA only; on the CPU it "
                             "needs a C++ compiler and minutes)")
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    batch = args.batch_size or (512 if cuda else 64)
    steps = args.steps or (50 if cuda else 6)
    use_compile = cuda if args.compile is None else args.compile
    variants = VARIANTS if use_compile else VARIANTS[:3]
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {threads} torch threads"
    print(f"device {args.device} ({name}); batch {batch}, {steps} timed steps after 2 warm-up "
          f"steps; torch {torch.__version__}")
    print(f"{'model':10}" + "".join(f"{v:>18}" for v in variants) + f"{'ratio bf16+cl/fp32':>21}")
    for model in args.models.split(","):
        # resnet18 is ~10x slower than resnet20 on a CPU: fewer steps keep the run short
        n = steps if cuda or model != "resnet18" else max(2, steps // 3)
        rates, compiled = {}, {}
        for variant in variants:
            rates[variant], compiled[variant] = images_per_second(model, variant, args.device,
                                                                  batch, n)
        line = f"{model:10}" + "".join(f"{rates[v]:>12,.0f} img/s" for v in variants)
        print(line + f"{rates['bf16+cl'] / rates['fp32']:>20.2f}x" + (
            f"   (compile {compiled['bf16+cl+compile']:.0f} s, not counted)" if use_compile else ""))
    own = "bf16+cl" if cuda else "fp32 cl"
    rates = {}
    for k in (int(x) for x in args.concurrency.split(",")):
        per = threads if cuda else max(1, threads // k)
        rates[k] = concurrent(k, "resnet20", "bf16+cl" if cuda else "cl", args.device, batch,
                              steps * (1 if cuda else 2), per)
        print(f"{k} concurrent resnet20 trial(s) ({own}, {per} thread(s) each): "
              f"{rates[k]:,.0f} img/s aggregate = {rates[k] / rates[min(rates)]:.2f}x one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
