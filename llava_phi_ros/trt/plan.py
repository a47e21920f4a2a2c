"""TensorRT decisions that need no TensorRT: the optimisation profiles, what is bound to which
tensor at each step, how the new keys/values go back into the cache, and how prefill is split.

Read off the exported decoder graph (its inputs' symbolic dims: S, C_plus_S, K) and the build
settings (max_context, max_prefill). One decoder engine holds two profiles sharing its weights:
"prefill" (S in 1..max_prefill, K in 1..max_prefill logit rows) and "decode" (S = K = 1). The
past keys/values are fixed at max_context in both. A prompt longer than max_prefill is prefilled
in chunks (the graph takes any start position), so max_prefill bounds activation memory only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from ..export.graphs import new_names, past_names

PROFILES = ("prefill", "decode")  # optimisation profile index = position here
DYNAMIC_DIMS = ("S", "C_plus_S", "K")  # the exporter's names of the decoder's dynamic axes

Shape = tuple[int, ...]
SymbolicShape = tuple["int | str", ...]


@dataclass(frozen=True)
class GraphIO:
    """The decoder graph's inputs and outputs: name -> shape (an int or a dynamic dim's name)."""

    inputs: dict[str, SymbolicShape]
    outputs: dict[str, SymbolicShape]
    num_layers: int
    max_context: int  # the past keys/values' fixed length

    @classmethod
    def read(cls, decoder_path: str | Path) -> GraphIO:
        """From decoder.onnx without its weights."""
        model = onnx.load(str(decoder_path), load_external_data=False)
        initializers = {t.name for t in model.graph.initializer}
        inputs = {i.name: _dims(i) for i in model.graph.input if i.name not in initializers}
        outputs = {o.name: _dims(o) for o in model.graph.output}
        return cls.from_shapes(inputs, outputs)

    @classmethod
    def from_shapes(cls, inputs: dict[str, SymbolicShape],
                    outputs: dict[str, SymbolicShape]) -> GraphIO:
        """Checked: the step's inputs, one past/new pair per layer, a fixed-length cache."""
        pasts = [n for n in inputs if n.startswith("past_")]
        num_layers = len(pasts) // 2
        expected_in = ["inputs_embeds", "position_ids", "attention_bias", "logit_positions",
                       *past_names(num_layers)]
        expected_out = ["logits", *new_names(num_layers)]
        if list(inputs) != expected_in or list(outputs) != expected_out:
            raise ValueError(f"not this project's decoder graph: inputs {list(inputs)}, "
                             f"outputs {list(outputs)}")
        lengths = {inputs[n][2] for n in pasts}
        if len(lengths) != 1 or not isinstance(next(iter(lengths)), int):
            raise ValueError(f"the past keys/values must have one fixed length, got {lengths}")
        return cls(dict(inputs), dict(outputs), num_layers, int(next(iter(lengths))))


@dataclass(frozen=True)
class StepPlan:
    """One run of the decoder engine: the profile, every tensor's shape, the cache write-back."""

    profile: str
    start_pos: int
    length: int  # S
    logit_rows: int  # K
    shapes: dict[str, Shape]  # every input and output name -> its concrete shape
    writeback: tuple[tuple[str, str], ...]  # (new output, past input) pairs, layer by layer

    @property
    def positions(self) -> range:
        """The cache positions this step's new keys/values are written to."""
        return range(self.start_pos, self.start_pos + self.length)


def decoder_profiles(io: GraphIO, max_prefill: int,
                     typical_prompt: int) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """Each profile: input name -> (min, opt, max) shapes, as IOptimizationProfile.set_shape
    takes them. `typical_prompt` (image + a question) is the prefill profile's opt S."""
    check_prefill(max_prefill, io.max_context)
    opt = max(1, min(typical_prompt, max_prefill))
    out: dict[str, dict[str, tuple[Shape, Shape, Shape]]] = {}
    for profile, (s_min, s_opt, s_max) in (("prefill", (1, opt, max_prefill)),
                                           ("decode", (1, 1, 1))):
        out[profile] = {name: (_concrete(dims, s_min, s_min, io.max_context),
                               _concrete(dims, s_opt, s_opt, io.max_context),
                               _concrete(dims, s_max, s_max, io.max_context))
                        for name, dims in io.inputs.items()}
    return out


def plan_step(io: GraphIO, start_pos: int, length: int, all_logits: bool,
              max_prefill: int, decode: bool = False) -> StepPlan:
    """A prefill run (S <= max_prefill; K = S or 1), or a decode step (S = K = 1)."""
    if decode and (length != 1 or all_logits):
        raise ValueError("the decode profile runs one position with one logit row")
    if length < 1 or start_pos < 0 or start_pos + length > io.max_context:
        raise ValueError(f"positions {start_pos}..{start_pos + length - 1} do not fit the KV "
                         f"cache of {io.max_context}")
    if length > max_prefill:
        raise ValueError(f"{length} positions in one step; the prefill profile takes at most "
                         f"{max_prefill} (split it: prefill_chunks)")
    rows = length if all_logits else 1
    profile = "decode" if decode else "prefill"
    shapes = {name: _concrete(dims, length, rows, io.max_context)
              for name, dims in (*io.inputs.items(), *io.outputs.items())}
    pairs = tuple(zip(new_names(io.num_layers), past_names(io.num_layers), strict=True))
    return StepPlan(profile, start_pos, length, rows, shapes, pairs)


def prefill_chunks(start_pos: int, length: int, max_prefill: int) -> list[tuple[int, int]]:
    """(start, length) runs of at most max_prefill covering start_pos..start_pos+length-1."""
    if max_prefill < 1:
        raise ValueError(f"max_prefill must be >= 1, got {max_prefill}")
    return [(p, min(max_prefill, start_pos + length - p))
            for p in range(start_pos, start_pos + length, max_prefill)]


def check_prefill(max_prefill: int, max_context: int) -> None:
    """max_prefill in 1..max_context (ValueError naming both otherwise)."""
    if not 1 <= max_prefill <= max_context:
        raise ValueError(f"max_prefill must be in 1..max_context ({max_context}), "
                         f"got {max_prefill}")


def _concrete(dims: SymbolicShape, s: int, k: int, context: int) -> Shape:
    values = {"S": s, "C_plus_S": context + s, "K": k}
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif d in values:
            out.append(values[d])
        else:
            raise ValueError(f"unknown dynamic dim {d!r} (the exporter names {DYNAMIC_DIMS})")
    return tuple(out)


def _dims(info: onnx.ValueInfoProto) -> SymbolicShape:
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                 for d in info.type.tensor_type.shape.dim)
