"""The decode ceiling: how fast batch-1 decoding could go if it only moved weights at the
machine's copy bandwidth. No ROS; used by `llava-phi bench`.

Batch-1 decoding reads every decoder weight once per token (the LM head included), so
tokens/s <= bandwidth / weight bytes. The bandwidth is measured, not taken from a data sheet:
2 x bytes / time of a large device-to-device copy (a copy reads and writes every byte).
"""

from __future__ import annotations

import statistics
import time

import torch

from .model.llava_phi import LlavaPhiForCausalLM

COPY_BYTES = 1 << 30  # the issue asks for a copy of >= 1 GB
COPY_REPEATS = 10


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES,
                   repeats: int = COPY_REPEATS) -> dict[str, float]:
    """Read + write bytes per second of a `nbytes` copy on `device`: the median of `repeats`
    copies after one warm-up (CUDA events on a GPU, a monotonic clock on the CPU)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch pages, lazy CUDA init
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t0)
    del src, dst
    median = statistics.median(seconds)
    return {"bytes": nbytes, "repeats": repeats, "median_s": median,
            "bandwidth_gb_s": 2 * nbytes / median / 1e9}


def decode_weight_bytes(model: LlavaPhiForCausalLM, dtype: torch.dtype) -> int:
    """Weight bytes one decode step reads in `dtype`: every decoder layer, the final norm and
    the LM head, plus one embedding row (the vision tower and projector are not read)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    m = model.model
    modules = [*m.layers, m.final_layernorm, model.lm_head]
    elements = sum(p.numel() for mod in modules for p in mod.parameters())
    return (elements + m.embed_tokens.weight.shape[1]) * itemsize


def decode_ceiling(bandwidth_gb_s: float, weight_bytes: int) -> float:
    """Tokens/s if a step took exactly the time to move its weights at that bandwidth."""
    return bandwidth_gb_s * 1e9 / weight_bytes
