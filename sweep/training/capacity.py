"""How many trials a worker trains as one fused pack: the measured throughput knee, the memory
one slot needs (a probe on CUDA), and whether trials go through a pack at all."""

from __future__ import annotations

import sys

import torch

from sweep.study.model_ref import is_import_path
from sweep.study.specs import TrainSpec
from sweep.training.fused import fusion_problem


#: ``scripts/bench_fused.py --what throughput`` on an H100 (FACTS.md; ResNet-20, batch 128 per
#: trial, bf16, CUDA graphs): training images/s summed over K slots. Re-measure and update.
MEASURED_THROUGHPUT = {1: 49.6e3, 8: 125.0e3, 16: 140.7e3, 32: 149.0e3}
KNEE_SHARE = 0.9  # the knee: the smallest K within 10% of the best measured throughput


def throughput_knee(throughput: dict[int, float], share: float = KNEE_SHARE) -> int:
    """The smallest K whose images/s reach ``share`` of the best K's."""
    best = max(throughput.values())
    return min(k for k, rate in throughput.items() if rate >= share * best)


def auto_fuse(device: torch.device, model: str, width: int, batch_size: int) -> int:
    """How many trials to fuse when a study says ``fuse: auto`` (before the budget bound).

    * CPU: 1. On this project's 2-core CPU (resnet8, batch 128, bench_fused.py) a fused pack
      trained fewer images/s in all than one unfused trial: K=2 0.78x, K=4 0.59x
      (docs/performance.md). The cores are already busy with one model; fusion only adds work.
    * CUDA: the knee of the measured throughput (``MEASURED_THROUGHPUT``): 16 on the H100,
      where K=32 trained only 6% more images/s than K=16 while a TPE study of 40 trials fused
      32 at a time would sample almost blind (half its budget proposed before any result).
      Memory did not bind (6.6 GB of 80 at K=16); it stays a cap for small GPUs: each slot
      needs about one model's training step, measured here, and at most half of the free
      memory goes to the pack.
    """
    if device.type != "cuda" or is_import_path(model):  # a model by path is never fused
        return 1
    want = throughput_knee(MEASURED_THROUGHPUT)
    per_slot = _step_bytes(device, model, width, batch_size)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(want, int(free * 0.5 // max(per_slot, 1))))


def _step_bytes(device: torch.device, model: str, width: int, batch_size: int) -> int:
    """Peak memory of one training step of one model (weights, activations, gradients)."""
    from sweep.training.models import build_model

    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    net = build_model(model, width).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last)
    net(x).float().sum().backward()
    peak = torch.cuda.max_memory_allocated(device) - before
    del net, x
    torch.cuda.empty_cache()
    return peak


def pack_capacity(t: TrainSpec, device: torch.device, remaining: int) -> int:
    """The K a worker fuses: ``train.fuse`` (``auto``: ``auto_fuse``), at most the ``remaining``
    trials of the budget; 1 (said once on stderr) when the study's model cannot be fused."""
    wanted = auto_fuse(device, t.model, t.width, t.batch_size) if t.fuse == "auto" else t.fuse
    capacity = max(1, min(wanted, remaining))
    if capacity > 1:
        problem = fusion_problem(t.model, t.width)
        if problem is not None:
            print(f"train.fuse={t.fuse}: {problem}; training one trial at a time",
                  file=sys.stderr, flush=True)
            return 1
    return capacity


def trains_as_pack(t: TrainSpec, device: torch.device, capacity: int) -> bool:
    """Whether trials go through ``run_pack``: when K > 1, and on CUDA also for K = 1, since the
    pack's step runs as one CUDA graph, compiled with ``train.compile`` (FACTS.md, H200: one
    ResNet-20 step 51k img/s captured against 21.5k eager); on the CPU one trial trains through
    ``train()`` (compiled there with ``train.compile: true``)."""
    return capacity > 1 or (device.type == "cuda" and fusion_problem(t.model, t.width) is None)
