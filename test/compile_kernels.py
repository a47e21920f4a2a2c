"""Compile every Triton kernel of the fused step for a CUDA architecture, with no GPU: Triton
lowers to PTX and runs ptxas (bundled with it) to a cubin. `python compile_kernels.py 90 float16`
prints one line per kernel and exits 1 if any fails. Run without TRITON_INTERPRET (under the
interpreter nothing is compiled)."""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llava_phi_ros.model import fused_ops

TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def kernels(t: str) -> dict[str, tuple[dict[str, str], dict[str, object]]]:
    """Kernel name -> (signature, constexprs) at Phi-2's geometry, weights of pointer type t."""
    f32, i64 = "*fp32", "*i64"
    return {
        "_qkv_rotary_cache_kernel": (
            {"y": t, "bias": t, "cos_table": f32, "sin_table": f32, "position": i64, "keys": t,
             "values": t, "q_out": t, "D": "i32", "DH": "i32", "S": "i32",
             "ROTARY": "constexpr", "BLOCK_D": "constexpr", "SCALE": "constexpr"},
            {"ROTARY": 32, "BLOCK_D": 128, "SCALE": 80 ** -0.5}),
        "_attention_split_kernel": (
            {"q": t, "keys": t, "values": t, "position": i64, "part_out": f32, "part_max": f32,
             "part_sum": f32, "DH": "i32", "S": "i32", "CHUNK": "i32", "SPLITS": "constexpr",
             "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
            {"SPLITS": fused_ops.ATTENTION_SPLITS, "BLOCK_N": fused_ops.ATTENTION_BLOCK,
             "BLOCK_D": 128}),
        "_attention_reduce_kernel": (
            {"part_out": f32, "part_max": f32, "part_sum": f32, "out": t, "DH": "i32",
             "SPLITS": "constexpr", "BLOCK_D": "constexpr"},
            {"SPLITS": fused_ops.ATTENTION_SPLITS, "BLOCK_D": 128}),
        "_bias_gelu_kernel": (
            {"y": t, "bias": t, "out": t, "start": "i32", "n": "i32", "BLOCK": "constexpr"},
            {"BLOCK": 1024}),
        "_add_layernorm_kernel": (
            {"x": t, "z": t, "bias": t, "weight": t, "ln_bias": t, "x_out": t, "h_out": t,
             "n": "i32", "eps": "fp32", "BLOCK": "constexpr"},
            {"BLOCK": 4096}),
    }


def main(arch: int, dtype: str) -> int:
    failed = 0
    for name, (signature, constants) in kernels(TYPES[dtype]).items():
        try:
            compiled = triton.compile(ASTSource(getattr(fused_ops, name), signature, constants),
                                      target=GPUTarget("cuda", arch, 32))
            print(f"{name}: sm_{arch} {dtype} cubin {len(compiled.asm['cubin'])} bytes")
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"{name}: FAILED {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
