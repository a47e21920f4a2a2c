"""Benchmark: where an onnxruntime decode step's time goes (Phi-2 geometry, random weights).

Exports LLaVA-Phi-3B's geometry with --layers decoder layers (random, seeded) at --weights and
--accuracy-level, then times one decode step at position --position three ways on 2 threads:
the backend's `decode_step` (its real, I/O-bound cache), the same session's `session.run` on a
zero cache and on a filled one (without profiling), and onnxruntime's own profiler over the
filled one, grouped by op (lm_head apart). A zero cache's untouched pages all map to the
kernel's one zero page, so reading it hits CPU caches, not DRAM: the zero/filled gap is the
cost of reading a real fixed-length cache.

    .venv/bin/python benchmarks/bench_decode_profile.py --weights int4 [--layers 4]
        [--accuracy-level 4] [--max-context 2048] [--position 800] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from llava_phi_ros.export.quantize import ACCURACY_LEVELS, WEIGHT_FORMATS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="int4", choices=WEIGHT_FORMATS)
    parser.add_argument("--accuracy-level", type=int, default=4, choices=ACCURACY_LEVELS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--position", type=int, default=800)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    from llava_phi_ros.bench import base_config

    cfg, init_std = base_config("llava-phi-3b")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(
        cfg.text, num_hidden_layers=args.layers))
    root = Path(tempfile.mkdtemp(prefix="bench_decode_profile-", dir=args.dir))
    try:
        return _measure(args, cfg, init_std, root / "export")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _measure(args: argparse.Namespace, cfg, init_std: float, out: Path) -> int:
    import onnxruntime as ort

    from llava_phi_ros.backends.onnxruntime_backend import OnnxRuntimeBackend
    from llava_phi_ros.bench import random_model
    from llava_phi_ros.export.graphs import attention_bias, past_names
    from llava_phi_ros.export.onnx_export import export_model
    from llava_phi_ros.model.metadata import load_metadata
    from llava_phi_ros.model.preprocess import ImagePreprocessConfig
    from llava_phi_ros.model.tokenizer import build_byte_tokenizer

    t, context, pos = cfg.text, args.max_context, args.position
    tokenizer = build_byte_tokenizer()
    export_model(random_model(cfg, 0, init_std, tokenizer.vocab_size), tokenizer,
                 ImagePreprocessConfig.for_image_size(cfg.vision.image_size), out,
                 weights=args.weights, accuracy_level=args.accuracy_level, max_context=context)

    def per_step_ms(step) -> float:
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.perf_counter() - start) / args.steps * 1000

    backend = OnnxRuntimeBackend(load_metadata(str(out)), out)
    backend_ms = per_step_ms(lambda: backend.decode_step(5, pos))
    backend.close()

    def session(profile: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                         str(args.accuracy_level))
        options.enable_profiling = profile
        options.profile_file_prefix = str(out / "profile")
        return ort.InferenceSession(str(out / "decoder.onnx"), options,
                                    providers=["CPUExecutionProvider"])

    shape = (1, t.num_attention_heads, context, t.head_dim)
    small = {"inputs_embeds": np.random.rand(1, 1, t.hidden_size).astype(np.float32),
             "position_ids": np.array([[pos]]),
             "attention_bias": attention_bias(pos, 1, context).numpy(),
             "logit_positions": np.array([0])}
    zero = {n: np.zeros(shape, np.float32) for n in past_names(args.layers)}
    rng = np.random.default_rng(0)
    filled = {n: rng.standard_normal(shape, dtype=np.float32) for n in past_names(args.layers)}
    plain = session(False)
    zero_ms = per_step_ms(lambda: plain.run(None, {**small, **zero}))
    filled_ms = per_step_ms(lambda: plain.run(None, {**small, **filled}))
    profiled = session(True)
    per_step_ms(lambda: profiled.run(None, {**small, **filled}))
    events = json.loads(Path(profiled.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            by_op["lm_head" if "lm_head" in event["name"] else op] += event["dur"]
    runs = args.steps + 3
    print(f"{args.layers} layers, weights {args.weights}, accuracy level "
          f"{args.accuracy_level}, max_context {context}, position {pos}, 2 threads")
    print(f"backend decode_step (real cache):  {backend_ms:6.1f} ms  "
          f"({1000 / backend_ms:.1f} tokens/s)")
    print(f"session.run, zero cache:           {zero_ms:6.1f} ms")
    print(f"session.run, filled cache:         {filled_ms:6.1f} ms  (profiled below)")
    total = sum(by_op.values())
    for op, us in by_op.most_common(8):
        print(f"  {op:24s} {us / runs / 1000:6.2f} ms  {us / total * 100:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
