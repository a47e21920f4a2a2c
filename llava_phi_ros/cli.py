"""`llava-phi`: ask, chat and convert from the command line.

Exit codes: 0 success, 1 a runtime failure (model, image, inference), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .backends import BACKENDS, DTYPE_NAMES, EXPORT_DTYPES
from .export.quantize import ACCURACY_LEVELS, DEFAULT_ACCURACY_LEVEL, WEIGHT_FORMATS
from .model.builtin import BUILTIN_TINY, BUILTIN_WARNINGS
from .model.generation import GenerationConfig

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure reported as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"checkpoint directory, or {BUILTIN_TINY} (the default: a toy model "
                        "trained on synthetic scenes) or builtin:random-tiny")
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="inference backend (default: torch)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="weights dtype (auto: float32 on CPU, float16 on GPU)")
    p.add_argument("--system-prompt", default=None, help="replace the default system prompt")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    """The `llava-phi` argument parser."""
    parser = argparse.ArgumentParser(prog="llava-phi", description=(
        "LLaVA-Phi vision-language model: ask questions about images, chat, convert checkpoints."))
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer one question about one image")
    _add_model_args(ask)
    ask.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    _add_generation_args(ask)
    ask.add_argument("--choice", action="append", default=[], metavar="TEXT",
                     help="score this answer; repeat for each choice; the best is the answer")
    ask.add_argument("--json", action="store_true",
                     help="print one JSON object as the last stdout line")
    ask.add_argument("question", help="the question")

    chat = sub.add_parser("chat", help="interactive multi-turn conversation about an image")
    _add_model_args(chat)
    chat.add_argument("--image", required=True, help="image file")
    _add_generation_args(chat)

    conv = sub.add_parser("convert", help="write a checkpoint in the project's canonical layout")
    conv.add_argument("--model", required=True, help="source checkpoint directory")
    conv.add_argument("--out", required=True, help="destination directory (must be new or empty)")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    conv.add_argument("--max-shard-size", type=float, default=None, metavar="GB",
                      help="split weights into shards of at most this many GB")

    export = sub.add_parser("export", help="write ONNX graphs (vision, decoder) for the "
                                           "onnxruntime backend and TensorRT")
    export.add_argument("--model", required=True,
                        help="checkpoint directory, builtin:tiny or builtin:random-tiny")
    export.add_argument("--out", required=True, help="destination directory (must be new or empty)")
    export.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES,
                        help="precision of the graphs (default: float32)")
    export.add_argument("--max-context", type=int, default=None,
                        help="KV cache length the decoder graph is built for (default: the "
                             "model's max_position_embeddings)")
    export.add_argument("--weights", default="float", choices=WEIGHT_FORMATS,
                        help="float: every weight in --dtype; int8 / int4: the decoder's linear "
                             "weights quantised (int8 per output channel, int4 in blocks of "
                             "128), dequantized in the graph; +lm_head: lm_head too (for CPUs) "
                             "(default: float)")
    export.add_argument("--accuracy-level", type=int, default=DEFAULT_ACCURACY_LEVEL,
                        choices=ACCURACY_LEVELS,
                        help="onnxruntime's MatMulNBits accuracy for int8/int4 weights: 1 = fp32 "
                             "activations, 4 = int8 activations (faster; default 4)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    engines = sub.add_parser("build-engines", help="build TensorRT engines from an export, on "
                                                   "the GPU that will run them (minutes)")
    engines.add_argument("--onnx", required=True, help="an export directory (llava-phi export)")
    engines.add_argument("--out", default=None,
                         help="engine directory (default: $ROS_HOME/llava_phi_ros/engines/<key>,"
                              " where the node looks when engine_dir is empty)")
    engines.add_argument("--max-prefill", type=int, default=0,
                         help="positions per prefill run (the node's max_prefill; 0 = "
                              "min(1024, max_context))")
    engines.add_argument("--workspace-mb", type=int, default=2048,
                         help="TensorRT builder workspace limit in MiB (default 2048)")
    engines.add_argument("--force", action="store_true",
                         help="rebuild even when engines for this export, GPU and TensorRT exist")

    from .training.evaluate import add_eval_arguments
    from .training.scenes import add_scenes_arguments
    from .training.trainer import add_train_arguments

    add_scenes_arguments(sub.add_parser(
        "scenes", help="render synthetic scenes with LLaVA-format captions, instructions and an "
                       "evaluation split"))
    evaluate = sub.add_parser("eval", help="score a model on a scene set or LLaVA-style "
                                           "question/answer jsonl files")
    _add_model_args(evaluate)
    add_eval_arguments(evaluate, include_model_args=False)
    add_train_arguments(sub.add_parser(
        "train", help="staged training (0: parts alone, 1: projector, 2: projector + LLM)"))
    from .bench import add_bench_arguments

    add_bench_arguments(sub.add_parser(
        "bench", help="time the backends against stock transformers on the same weights"))
    return parser


def _generation_config(args: argparse.Namespace) -> GenerationConfig:
    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed).validate()
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def _load_model(args: argparse.Namespace):
    from .pipeline import ModelLoadError, VisionLanguageModel

    model_path = args.model
    if model_path is None:
        print(f"llava-phi: warning: --model not given, using {BUILTIN_TINY}. "
              f"{BUILTIN_WARNINGS[BUILTIN_TINY]}", file=sys.stderr)
        model_path = BUILTIN_TINY
    elif model_path in BUILTIN_WARNINGS:
        print(f"llava-phi: warning: {BUILTIN_WARNINGS[model_path]}", file=sys.stderr)
    try:
        return VisionLanguageModel.load(model_path, backend=args.backend, device=args.device,
                                        dtype=args.dtype, system_prompt=args.system_prompt)
    except (ModelLoadError, ValueError, OSError, RuntimeError) as exc:
        raise CliError(f"cannot load model {model_path!r}: {exc}") from exc


def _load_image(path: str):
    from .model.preprocess import load_image

    try:
        return load_image(path)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc


def cmd_ask(args: argparse.Namespace) -> int:
    """One question, one image."""
    gen = _generation_config(args)
    image = _load_image(args.image)
    vlm = _load_model(args)
    try:
        result = vlm.ask(image, args.question, generation=gen, choices=args.choice)
    except (ValueError, RuntimeError) as exc:  # bad question or choice; device failures
        raise CliError(str(exc)) from exc
    print(result.text)
    if args.json:
        print(json.dumps(result.to_json_dict() | {"model_id": vlm.description}))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Read questions from stdin; answers stream to stdout. /reset forgets, /quit ends."""
    gen = _generation_config(args)
    image = _load_image(args.image)
    vlm = _load_model(args)
    try:
        encoded = vlm.encode_image(image)
    except (ValueError, RuntimeError) as exc:
        raise CliError(f"cannot encode {args.image}: {exc}") from exc
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    print(f"chatting about {args.image} with {vlm.description}; /reset, /quit", file=sys.stderr)
    while True:
        if interactive:
            print("USER> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        question = line.strip()
        if not question:
            continue
        if question == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        printed = ""

        def stream(text: str, _n: int) -> None:
            nonlocal printed
            text = text.lstrip()
            if text.startswith(printed):  # streamed text only grows (see stable_text)
                print(text[len(printed):], end="", flush=True)
                printed = text

        try:
            result = vlm.ask(encoded, question, history, gen, on_text=stream)
        except (ValueError, RuntimeError) as exc:
            print(f"\nllava-phi: error: {exc}", file=sys.stderr)
            continue
        rest = result.text[len(printed):] if result.text.startswith(printed) else ""
        print(rest, flush=True)
        history.append((question, result.text))


def cmd_convert(args: argparse.Namespace) -> int:
    """Any supported layout -> the canonical layout."""
    from .model.checkpoint import convert_checkpoint

    max_bytes = None if args.max_shard_size is None else int(args.max_shard_size * 1e9)
    try:
        info = convert_checkpoint(args.model, args.out, overwrite=args.overwrite,
                                  max_shard_bytes=max_bytes)
    except (ValueError, OSError) as exc:
        raise CliError(f"cannot convert {args.model!r}: {exc}") from exc
    print(f"wrote {args.out} (from {info})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A model -> a self-contained ONNX export directory."""
    from .export.onnx_export import export_checkpoint, export_model
    from .model.metadata import load_metadata

    try:
        meta = load_metadata(args.model)
        settings = (meta.tokenizer, meta.preprocess, args.out, args.dtype, args.max_context,
                    args.overwrite, args.model, args.weights, args.accuracy_level)
        if meta.build_weights is not None:  # a built-in random model
            manifest = export_model(meta.build_weights(), *settings)
        else:  # a checkpoint: streamed, one tensor in memory at a time
            manifest = export_checkpoint(meta.weights_dir, *settings)
    except (ValueError, OSError, RuntimeError) as exc:
        raise CliError(f"cannot export {args.model!r}: {exc}") from exc
    print(f"wrote {args.out}: {', '.join(manifest['files'])} ({manifest['dtype']}, weights "
          f"{manifest['weights']}, max_context {manifest['max_context']}, opset "
          f"{manifest['opset']['decoder']}, source sha256 "
          f"{manifest['source_sha256'][:12]})")
    check = manifest["tensorrt_10_3_check"]
    for problem in check["problems"]:
        print(f"warning: TensorRT 10.3 would refuse: {problem}", file=sys.stderr)
    print(f"TensorRT 10.3 graph check: {check['nodes']} nodes, {len(check['problems'])} "
          f"problems (against {check['source']})")
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    """An export -> TensorRT engines and their manifest (reused when they already match)."""
    try:
        from .trt.build import build_engines
        from .trt.manifest import MANIFEST_FILE, EngineError

        out = build_engines(args.onnx, args.out, args.max_prefill or None, args.workspace_mb,
                            args.force)
        prefill = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))["max_prefill"]
    except ImportError as exc:
        raise CliError(f"build-engines needs TensorRT's Python module ({exc}); on a Jetson it "
                       "comes with JetPack (python3-libnvinfer)") from exc
    except (ValueError, OSError, EngineError) as exc:
        raise CliError(f"cannot build engines from {args.onnx!r}: {exc}") from exc
    print(f"engines: {out} (the node: backend tensorrt, model_path {args.onnx}, max_prefill "
          f"{prefill}{'' if args.out else ', engine_dir empty'})")
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    """Write a scene set (see llava_phi_ros.training.scenes)."""
    from .training.scenes import run_scenes

    return run_scenes(args)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model through the same code path as `ask` (greedy)."""
    from .training.evaluate import run_eval

    return run_eval(args, _load_model)


def cmd_train(args: argparse.Namespace) -> int:
    """One training stage (see llava_phi_ros.training.trainer)."""
    from .training.trainer import run_train

    return run_train(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """Vision, prefill, first-token, decode and memory figures (see llava_phi_ros.bench)."""
    from .bench import run_bench

    return run_bench(args)  # its BenchError is a CliError


COMMANDS = {"ask": cmd_ask, "chat": cmd_chat, "convert": cmd_convert, "scenes": cmd_scenes,
            "eval": cmd_eval, "train": cmd_train, "bench": cmd_bench, "export": cmd_export,
            "build-engines": cmd_build_engines}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llava-phi` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"llava-phi: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
