"""The fused decode step and its kernels: Triton (under TRITON_INTERPRET=1 on the CPU, or on a
GPU with LLAVA_PHI_TEST_DEVICE=cuda) against the torch references, and the fused step against
the unfused static step with teacher forcing (the same tokens fed to both)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from llava_phi_ros.model import fused_ops
from llava_phi_ros.model.config import tiny_config
from llava_phi_ros.model.fused_ops import TorchOps, TritonOps
from llava_phi_ros.model.fused_step import FusedDecoder, fuse_layer_weights
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM

DEVICE = torch.device(os.environ.get("LLAVA_PHI_TEST_DEVICE", "cpu"))
# Teacher-forced log-prob tolerances of the fused step (the targets on a GPU)
LOGPROB_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def triton_ops() -> TritonOps:
    """TritonOps on DEVICE; on the CPU the interpreter must be on (pytest sets it: conftest)."""
    reason = fused_ops.triton_available(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    return TritonOps(DEVICE)


def phi2_like(heads: int = 4, head_dim: int = 80, rotary: int = 32):
    """Phi-2's head geometry (Dh 80, rotary 32: neither a power of two) at a small width."""
    return dict(h=heads, dh=head_dim, rotary=rotary)


def _tables(s_max: int, rotary: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    freqs = torch.outer(torch.arange(s_max, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_rotary_cache_kernel_matches_the_reference(dtype):
    g = phi2_like()
    h, dh, s, inter = g["h"], g["dh"], 64, 96
    torch.manual_seed(0)
    y = torch.randn(1, 3 * h * dh + inter, device=DEVICE).to(dtype)
    bias = torch.randn(y.shape[1], device=DEVICE).to(dtype)
    cos, sin = _tables(s, g["rotary"])
    position = torch.tensor([37], device=DEVICE)
    results = []
    for ops in (TorchOps(), triton_ops()):
        keys = torch.zeros(h, s, dh, dtype=dtype, device=DEVICE)
        values = torch.zeros_like(keys)
        q = ops.qkv_rotary_cache(y, bias, cos, sin, position, keys, values, g["rotary"])
        results.append((q, keys, values))
    (q0, k0, v0), (q1, k1, v1) = results
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q1, q0, atol=atol, rtol=1e-3)
    torch.testing.assert_close(k1, k0, atol=atol, rtol=1e-3)
    torch.testing.assert_close(v1, v0, atol=0, rtol=0)  # a plain add: bit-identical
    assert k1[:, 37].abs().sum() > 0 and k1[:, :37].abs().sum() == 0  # only position 37


@pytest.mark.parametrize("length", [1, 5, 33, 200, 256])
def test_split_k_attention_reads_only_the_valid_keys(length):
    g = phi2_like()
    h, dh, s = g["h"], g["dh"], 256
    torch.manual_seed(length)
    q = torch.randn(h, dh, device=DEVICE) * dh ** -0.5
    keys = torch.randn(h, s, dh, device=DEVICE)
    values = torch.randn(h, s, dh, device=DEVICE)
    keys[:, length:] = float("nan")  # what lies past the position must never be read
    values[:, length:] = float("nan")
    position = torch.tensor([length - 1], device=DEVICE)
    expected = torch.empty(1, h * dh, device=DEVICE)
    TorchOps().decode_attention(q, keys[:, :length].contiguous(), values[:, :length].contiguous(),
                                position, expected)
    got = torch.empty_like(expected)
    triton_ops().decode_attention(q, keys, values, position, got)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_bias_gelu_and_add_layernorm_kernels_match_the_reference():
    torch.manual_seed(1)
    d, inter = 160, 300
    y = torch.randn(1, 3 * d + inter, device=DEVICE)
    bias = torch.randn(y.shape[1], device=DEVICE)
    ref, ops = TorchOps(), triton_ops()
    out0, out1 = torch.empty(1, inter, device=DEVICE), torch.empty(1, inter, device=DEVICE)
    ref.bias_gelu(y, bias, 3 * d, out0)
    ops.bias_gelu(y, bias, 3 * d, out1)
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
    x, z, b = (torch.randn(1, d, device=DEVICE) for _ in range(3))
    w, lb = torch.randn(d, device=DEVICE), torch.randn(d, device=DEVICE)
    for got, expected in zip(ops.add_layernorm(x, z, b, w, lb, 1e-5),
                             ref.add_layernorm(x, z, b, w, lb, 1e-5), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _model(dtype: torch.dtype, seed: int = 0) -> LlavaPhiForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = LlavaPhiForCausalLM(cfg)
    for p in model.parameters():  # weights big enough that logits are far from flat
        p.data.normal_(0, 0.2)
    return model.to(DEVICE, dtype).eval()


def test_fusing_shares_the_storage_and_keeps_the_unfused_model_identical():
    model = _model(torch.float32)
    before = copy.deepcopy(model)
    ids = torch.tensor([[5, 9, 2, 77, 31]], device=DEVICE)
    expected = before(ids, before.new_cache(32))
    n_params = sum(p.numel() for p in model.parameters())
    layers = fuse_layer_weights(model)
    w_in = layers[0][0]
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == w_in.data_ptr()
    assert model.model.layers[0].mlp.fc2.weight.untyped_storage().data_ptr() == \
        layers[0][2].untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == n_params
    torch.testing.assert_close(model(ids, model.new_cache(32)), expected, atol=0, rtol=0)


@torch.inference_mode()
def _teacher_forced(model: LlavaPhiForCausalLM, step, prompt: torch.Tensor,
                    forced: list[int]) -> torch.Tensor:
    """Prefill the prompt (unfused), then feed `forced` one by one through step(token, pos);
    log-probs (len(forced), V) of each step."""
    cache = model.new_cache(64)
    logits = model(prompt, cache, last_only=True)[0]
    out = [torch.log_softmax(logits.double(), -1)]
    token = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    position = torch.zeros(1, dtype=torch.long, device=DEVICE)
    for i, t in enumerate(forced[:-1]):
        token.fill_(t)
        position.fill_(prompt.shape[1] + i)
        out.append(torch.log_softmax(step(cache, token, position).double(), -1))
    return torch.stack(out)


def _unfused(model):
    def step(cache, token, position):
        embeds = model.model.embed_tokens(token)
        return model.step(embeds, cache, position)[0]
    return step


def _fused(model, ops):
    decoders = {}

    def step(cache, token, position):
        if id(cache) not in decoders:
            decoders[id(cache)] = FusedDecoder(model, cache, ops)
        return decoders[id(cache)].step(token, position)
    return step


@pytest.mark.parametrize("ops_name", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_step_matches_the_unfused_step_with_teacher_forcing(ops_name, dtype):
    if DEVICE.type == "cpu" and dtype != torch.float32 and ops_name == "triton":
        pytest.skip("half precision Triton kernels are checked on the GPU (gpu_check.sh)")
    ops = TorchOps() if ops_name == "torch" else triton_ops()
    model = _model(dtype)
    reference = copy.deepcopy(model)
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]], device=DEVICE)
    forced = [int(t) for t in torch.randint(0, model.config.text.vocab_size, (24,),
                                            generator=torch.Generator().manual_seed(2))]
    expected = _teacher_forced(reference, _unfused(reference), prompt, forced)
    got = _teacher_forced(model, _fused(model, ops), prompt, forced)
    targets = torch.tensor(forced, device=DEVICE)[:, None]
    delta = (got.gather(1, targets) - expected.gather(1, targets)).abs().max().item()
    assert delta <= LOGPROB_TOLERANCE[dtype], f"max |delta log-prob| {delta}"
    top2 = expected.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-2  # where the top-1 is not a near tie
    assert decided.any()
    assert torch.equal(got.argmax(-1)[decided], expected.argmax(-1)[decided])


@pytest.mark.parametrize("arch,dtype", [(90, "float16"), (90, "bfloat16"), (87, "float16")])
def test_every_kernel_compiles_to_a_cubin(arch, dtype):
    """H100/H200 (sm_90) and Jetson Orin (sm_87): lowered and assembled with no GPU here."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py")),
                          str(arch), dtype], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("cubin") == 5, run.stdout


def test_decode_paths_resolve_or_refuse_with_a_reason():
    from llava_phi_ros.backends.base import BackendError
    from llava_phi_ros.backends.torch_backend import resolve_decode_path

    cpu = torch.device("cpu")
    assert resolve_decode_path("auto", cpu) == "eager"
    assert resolve_decode_path(None, cpu) == "eager"
    assert resolve_decode_path("fused", cpu) == "fused"  # torch references, no graphs
    with pytest.raises(BackendError, match="needs a CUDA device"):
        resolve_decode_path("graph", cpu)
    with pytest.raises(BackendError, match="unknown decode_path 'fast'"):
        resolve_decode_path("fast", cpu)


def test_builtin_tiny_greedy_answers_are_identical_on_every_decode_path():
    """The trained tiny model through VisionLanguageModel.ask: eager and fused (on DEVICE)
    give the same greedy tokens on real scenes; graph too, where there is a GPU."""
    import random

    from llava_phi_ros.model.generation import GenerationConfig
    from llava_phi_ros.pipeline import VisionLanguageModel
    from llava_phi_ros.training.scenes import generate_scenes, make_question, render_scene

    paths = ["eager", "fused"] + (["graph"] if DEVICE.type == "cuda" else [])
    # fp32 everywhere (auto would be fp16 on a GPU): this compares the paths' arithmetic, and
    # the fp16 rounding is held to its tolerance by the teacher-forcing test above
    models = {p: VisionLanguageModel.load("builtin:tiny", device=str(DEVICE), dtype="float32",
                                          backend_options={"decode_path": p}) for p in paths}
    assert {p: m.backend.describe()["decode_path"] for p, m in models.items()} == \
        {p: p for p in paths}
    rng = random.Random(4)
    greedy = GenerationConfig(max_new_tokens=24)
    for scene in generate_scenes(4, seed=11):
        image = render_scene(scene)
        question = make_question(scene, "colour", rng) or make_question(scene, "count", rng)
        answers = {p: m.ask(image, question.question, generation=greedy)
                   for p, m in models.items()}
        tokens = {p: a.token_ids for p, a in answers.items()}
        assert all(t == tokens["eager"] for t in tokens.values()), tokens
        # the answers are a word or two: also 24 greedy steps past the stop token
        forced = {p: _greedy_past_stop(m, image, question.question, 24) for p, m in models.items()}
        assert all(t == forced["eager"] for t in forced.values()), forced


def _greedy_past_stop(vlm, image, question: str, steps: int) -> list[int]:
    """`steps` greedy tokens through the backend's prefill and decode_step (no stop token)."""
    from llava_phi_ros.model.generation import embed_prompt

    backend = vlm.backend
    with torch.inference_mode():
        embeds = embed_prompt(backend, vlm.prompt_ids(question), vlm.encode_image(image).features)
        tokens = [int(backend.prefill(embeds, 0).argmax())]
        for pos in range(embeds.shape[0], embeds.shape[0] + steps - 1):
            tokens.append(int(backend.decode_step(tokens[-1], pos).argmax()))
    vlm.prefix_cache.clear()  # the KV cache no longer holds what the cache recorded
    return tokens


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (gpu_check.sh runs "
                    "this with LLAVA_PHI_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("path", ["graph", "fused"])
def test_graph_replay_is_bit_identical_to_the_eager_kernels(path):
    """The captured step replays the same kernels as running them eagerly: equal bits."""
    from llava_phi_ros.backends.torch_backend import TorchBackend

    model = _model(torch.float16)
    eager = TorchBackend(copy.deepcopy(model), 128, decode_path=path)
    eager._graphs = eager._vision_graph = None  # the same steps, op by op
    captured = TorchBackend(model, 128, decode_path=path)
    size = model.config.vision.image_size
    pixels = torch.randn(3, size, size, generator=torch.Generator().manual_seed(5)).numpy()
    for _ in range(2):  # captured on the first call, replayed on the second
        assert torch.equal(captured.encode_image(pixels), eager.encode_image(pixels))
    with torch.inference_mode():
        for backend in (eager, captured):
            backend.prefill(backend.embed_tokens([3, 1, 4, 1, 5]), 0)
        token = 7
        for pos in range(5, 45):
            a, b = eager.decode_step(token, pos), captured.decode_step(token, pos)
            assert torch.equal(a, b), f"position {pos}: max |delta| {(a - b).abs().max()}"
            token = int(a.argmax())
    assert len(captured._graphs) == 1  # fused: one graph for all; graph: 45 < one window block
