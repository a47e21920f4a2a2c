"""Benchmark: peak host memory and time of `llava-phi export` on the real LLaVA-Phi-3B geometry.

A random-weight checkpoint of the llava-phi-3b geometry (as bench_load_memory.py writes it,
fp16, tensor by tensor) is exported with `export_checkpoint` in a fresh interpreter, which
streams the checkpoint one tensor at a time into the graphs' external data files. Peak =
ru_maxrss after the export minus ru_maxrss after the imports (VmHWM too). The export is then
checked as CI checks the small ones: `onnx.checker` by path and the TensorRT 10.3 graph check
(export/trt_check.py), and its files are listed.

    .venv/bin/python benchmarks/bench_export_memory.py [--layers 32] [--dtypes float16,float32]
        [--weights float,int8,int4] [--dir /tmp] [--keep] [--json FILE]

Disk: the checkpoint (6.2 GB) plus each export (6.2 GB fp16, 12.4 GB fp32), one export at a
time. Prints a table; asserts nothing but that each export passes its checks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load_memory import REPO, WRITE, _run  # noqa: E402

# Runs in a fresh interpreter: one export_checkpoint and its peak over the post-import one.
MEASURE = r"""
import json, resource, sys, time
import onnx, onnxruntime, torch
from llava_phi_ros.export.onnx_export import export_checkpoint
from llava_phi_ros.model.preprocess import ImagePreprocessConfig
from llava_phi_ros.model.tokenizer import build_byte_tokenizer

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

src, out, dtype, weights = sys.argv[1:5]
base, base_hwm = maxrss(), hwm()
start = time.perf_counter()
manifest = export_checkpoint(src, build_byte_tokenizer(), ImagePreprocessConfig(), out, dtype,
                             weights=weights)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_bytes": maxrss() - base,
                  "peak_hwm_bytes": hwm() - base_hwm, "manifest": manifest}))
"""

# Runs in a fresh interpreter: the checks CI runs on the small exports.
CHECK = r"""
import json, sys, time
from pathlib import Path
import onnx
from llava_phi_ros.export.trt_check import check_export
start = time.perf_counter()
out = Path(sys.argv[1])
for name in ("vision.onnx", "decoder.onnx"):
    onnx.checker.check_model(str(out / name))
report = check_export(out)
split = {"quantized": 0, "float": 0}  # decoder.onnx.data: int8/int4 weights + scales, the rest
for init in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.initializer:
    length = int(next(e.value for e in init.external_data if e.key == "length"))
    quantized = init.name.endswith((".quantized", ".scale"))
    split["quantized" if quantized else "float"] += length
print(json.dumps({"check_seconds": time.perf_counter() - start, "graph_check": report,
                  "decoder_data_bytes": split,
                  "files": {f.name: f.stat().st_size for f in sorted(out.iterdir())}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="Phi layers (32 = LLaVA-Phi-3B)")
    parser.add_argument("--dtypes", default="float16,float32", help="export precisions")
    parser.add_argument("--weights", default="float",
                        help="weight formats, each exported in every dtype (float,int8,int4)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and exports")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_export_memory-", dir=args.dir))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {ram:.0f} GiB, "
                                f"python {platform.python_version()}",
                     "layers": args.layers, "cases": []}
    try:
        written = _run(WRITE, [str(root / "ckpt"), str(args.layers), "safetensors", "float16"],
                       REPO)
        results["checkpoint"] = written
        print(f"wrote the checkpoint: {written['parameters'] / 1e9:.3f} B parameters, "
              f"{written['weight_bytes'] / 2**30:.2f} GiB fp16", flush=True)
        os.sync()
        for dtype, weights in [(d, w) for d in args.dtypes.split(",")
                               for w in args.weights.split(",")]:
            out = root / f"export-{dtype}-{weights}"
            m = _run(MEASURE, [str(root / "ckpt"), str(out), dtype, weights], REPO)
            m |= _run(CHECK, [str(out)], REPO) | {"dtype": dtype, "weights": weights}
            m["export_bytes"] = sum(m["files"].values())
            results["cases"].append(m)
            print(f"  exported {dtype} {weights} in {m['seconds']:.0f} s", flush=True)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nexport_checkpoint, {args.layers} Phi layers, checkpoint fp16; {results['machine']}")
    head = (f"{'dtype':<8} {'weights':<7} {'export GiB':>10} {'decoder q/float GB':>18} "
            f"{'peak GiB':>9} {'VmHWM GiB':>9} {'export s':>8}  check")
    print(head)
    print("-" * len(head))
    for c in results["cases"]:
        check = c["graph_check"]
        split = c["decoder_data_bytes"]
        print(f"{c['dtype']:<8} {c['weights']:<7} {c['export_bytes'] / 2**30:>10.2f} "
              f"{split['quantized'] / 1e9:>8.3f} / {split['float'] / 1e9:<7.3f} "
              f"{c['peak_bytes'] / 2**30:>9.2f} {c['peak_hwm_bytes'] / 2**30:>9.2f} "
              f"{c['seconds']:>8.0f}  {check['nodes']} nodes, {len(check['problems'])} problems")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
