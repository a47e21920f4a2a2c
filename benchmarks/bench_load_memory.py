"""Benchmark: peak host memory of load_model on the real LLaVA-Phi-3B geometry (random weights).

The checkpoint has the llava-phi-3b geometry (LlavaPhiConfig's defaults: CLIP ViT-L/14-336,
mlp2x_gelu projector, Phi-2 with 2560 hidden and 32 layers; about 3.1 B parameters) and random
weights, fp16 unless --stored says otherwise. It is written tensor by tensor (never the whole
model in memory; the .bin copy of --bin is, torch.save takes a dict) into a temporary directory
(6.2 GB in fp16, twice that with --bin), and each case loads it with
`load_model(dir, "cpu", dtype)` in a fresh interpreter.

Peak = ru_maxrss after load_model minus ru_maxrss after `import torch` and the package imports
(so torch's one-off costs on first use, ~80 MB, count as the model's). VmHWM (the process's own
peak, Linux) is reported too: Linux carries a parent's ru_maxrss into its children through fork
and exec, so this script's own process imports no torch, and the two agree. "used" is the same
peak once every tensor has been read: a loader that leaves parameters as views of a file mmap
(the old one did when the dtype did not change: safetensors' get_tensor maps the file) shows its
real footprint only then. For safetensors the loader should peak at ~1x the loaded model, plus
its largest tensor when casting (the embedding or lm_head: 250 MiB in fp16); a .bin is mapped
and its pages stay resident until loading ends (clean page cache the kernel can reclaim).

    .venv/bin/python benchmarks/bench_load_memory.py [--layers 32] [--dir /tmp] [--bin]
        [--stored float16] [--targets float16,float32] [--source-tree PATH] [--keep]
        [--json FILE]

--source-tree measures the llava_phi_ros of another checkout (e.g. an older commit, for a
before/after comparison) on the same checkpoint; it is written with this checkout's package.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter (the source tree first on sys.path): writes the checkpoint.
WRITE = r"""
import json, sys, time
from pathlib import Path
import torch
from llava_phi_ros.model.checkpoint import BIN_FILE, CONFIG_FILE, _LazyTensors, _write_canonical
from llava_phi_ros.model.config import LlavaPhiConfig
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM

out, layers, fmt = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
stored = getattr(torch, sys.argv[4])
cfg = LlavaPhiConfig().with_text(num_hidden_layers=layers)
with torch.device("meta"):
    specs = {k: (stored, tuple(t.shape)) for k, t in LlavaPhiForCausalLM(cfg).state_dict().items()}
generator = torch.Generator().manual_seed(0)

def produce(key):
    return torch.empty(specs[key][1], dtype=stored).normal_(0.0, 0.02, generator=generator)

start = time.perf_counter()
if fmt == "safetensors":  # the project's own writer: one tensor in memory at a time
    _write_canonical(_LazyTensors(specs, produce), cfg, out, tokenizer=None,
                     preprocess_config=None, max_shard_bytes=None, overwrite=True)
else:  # torch.save needs the whole state dict
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_original_dict()))
    torch.save({k: produce(k) for k in specs}, out / BIN_FILE)
numels = [int(torch.Size(shape).numel()) for _, shape in specs.values()]
print(json.dumps({"seconds": time.perf_counter() - start,
                  "weight_bytes": sum(numels) * stored.itemsize,
                  "largest_bytes": max(numels) * stored.itemsize, "tensors": len(specs),
                  "parameters": sum(numels)}))
"""

# Runs in a fresh interpreter: one load_model, its peak host memory over the post-import one.
MEASURE = r"""
import json, resource, sys, time
import torch
import llava_phi_ros.model.checkpoint as checkpoint
from llava_phi_ros.model.checkpoint import load_model

def hwm():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None

def maxrss():  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                 else 1024)

base, base_hwm = maxrss(), hwm()
start = time.perf_counter()
model = load_model(sys.argv[1], "cpu", getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
peak, peak_hwm = maxrss(), hwm()
with torch.no_grad():  # first use: a parameter that is a view of a file mmap is paged in now
    for t in model.state_dict().values():
        t.sum()
print(json.dumps({
    "module": checkpoint.__file__, "seconds": seconds, "baseline_bytes": base,
    "peak_bytes": peak - base, "peak_hwm_bytes": None if base_hwm is None else peak_hwm - base_hwm,
    "touched_peak_bytes": maxrss() - base,
    "model_bytes": sum(t.nbytes for t in model.state_dict().values())}))
"""


def _run(code: str, args: list[str], source_tree: Path) -> dict:
    """Run `code` in a fresh interpreter with source_tree first on sys.path; its JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(source_tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=source_tree)
    if proc.returncode != 0:
        raise SystemExit(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32,
                        help="Phi layers (32 = LLaVA-Phi-3B; fewer when disk or RAM is short)")
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where the temporary checkpoint goes (default: the temp dir)")
    parser.add_argument("--bin", action="store_true",
                        help="also measure a pytorch_model.bin copy (6.2 GB more disk)")
    parser.add_argument("--source-tree", type=Path, default=REPO,
                        help="checkout whose llava_phi_ros is measured (default: this one)")
    parser.add_argument("--stored", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="dtype the checkpoint is written in (default: float16)")
    parser.add_argument("--targets", default="float16,float32",
                        help="comma-separated dtypes to load into (default: float16,float32)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    # ~2 bytes per parameter: 6.2 GB for 32 layers, (2560 * 2560 * 12 * 2 B = 157 MB per layer)
    need = int((1.15e9 + args.layers * 0.1575e9) * (2 if args.bin else 1) * 1.05)
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB; "
                         "pass --dir elsewhere or fewer --layers")
    root = Path(tempfile.mkdtemp(prefix="bench_load_memory-", dir=args.dir))
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                f"python {platform.python_version()}",
                     "layers": args.layers, "source_tree": str(args.source_tree), "cases": []}
    try:
        formats = ["safetensors", *(["bin"] if args.bin else [])]
        for fmt in formats:
            written = _run(WRITE, [str(root / fmt), str(args.layers), fmt, args.stored], REPO)
            results[f"written_{fmt}"] = written
            print(f"wrote {fmt}: {written['parameters'] / 1e9:.3f} B parameters, "
                  f"{written['weight_bytes'] / 2**30:.2f} GiB {args.stored} in "
                  f"{written['tensors']} tensors (largest "
                  f"{written['largest_bytes'] / 2**20:.0f} MiB), {written['seconds']:.1f} s",
                  flush=True)
            if hasattr(os, "sync"):
                os.sync()  # the file's writeback would otherwise slow the first load down
            for target in args.targets.split(","):
                m = _run(MEASURE, [str(root / fmt), target], args.source_tree)
                m |= {"format": fmt, "stored": args.stored, "target": target,
                      "ratio": m["peak_bytes"] / m["model_bytes"],
                      "over_model_bytes": m["peak_bytes"] - m["model_bytes"]}
                results["cases"].append(m)
                print(f"  measured {fmt} -> {target} ({m['seconds']:.1f} s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nload_model(dir, 'cpu', dtype), {args.layers} Phi layers, stored {args.stored}; "
          f"llava_phi_ros from {args.source_tree}; {results['machine']}")
    head = (f"{'format':<12} {'target':<8} {'model GiB':>9} {'peak GiB':>9} {'peak/model':>10} "
            f"{'over MiB':>9} {'VmHWM GiB':>9} {'used GiB':>8} {'load s':>7}")
    print(head)
    print("-" * len(head))
    for c in results["cases"]:
        hwm = "n/a" if c["peak_hwm_bytes"] is None else f"{c['peak_hwm_bytes'] / 2**30:.2f}"
        print(f"{c['format']:<12} {c['target']:<8} {c['model_bytes'] / 2**30:>9.2f} "
              f"{c['peak_bytes'] / 2**30:>9.2f} {c['ratio']:>10.3f} "
              f"{c['over_model_bytes'] / 2**20:>9.0f} {hwm:>9} "
              f"{c['touched_peak_bytes'] / 2**30:>8.2f} {c['seconds']:>7.1f}")
    print("peak = ru_maxrss after load_model - ru_maxrss after the imports; over = peak - the "
          "loaded model's bytes;\nused = the same peak once every tensor has been read (sum()), "
          "which pages in parameters that are views of a file mmap")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"total {time.perf_counter() - start:.0f} s")
    sys.exit(code)
