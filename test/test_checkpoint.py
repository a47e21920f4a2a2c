"""Checkpoint reading, verification and conversion, on tiny random models written to tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llava_phi_ros.model.checkpoint import (
    BIN_FILE,
    BIN_INDEX,
    LAYOUT_HF_NEW,
    LAYOUT_HF_OLD,
    LAYOUT_ORIGINAL,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    CheckpointError,
    CheckpointMismatchError,
    _verify,
    _WeightSource,
    _write_safetensors,
    convert_checkpoint,
    load_model,
    read_checkpoint,
    save_canonical,
    save_llava_hf_layout,
    save_original_layout,
)
from llava_phi_ros.model.config import ConfigError, tiny_config
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM
from llava_phi_ros.model.preprocess import ImagePreprocessConfig
from llava_phi_ros.model.prompt import IMAGE_TOKEN_INDEX
from llava_phi_ros.model.tokenizer import build_byte_tokenizer, load_tokenizer

from .reference import random_tiny_model

SEED = 1
PROMPT = [5, 17, 3, IMAGE_TOKEN_INDEX, 9, 42, 7, 11]
FC1 = "model.layers.0.mlp.fc1.weight"
POSITION_IDS = "model.vision_tower.vision_model.embeddings.position_ids"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> LlavaPhiForCausalLM:
    return random_tiny_model(seed=SEED)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, 28, 28)


@pytest.fixture(scope="module")
def logits(model, pixels) -> torch.Tensor:
    return all_logits(model, pixels)


def all_logits(model: LlavaPhiForCausalLM, pixels: torch.Tensor) -> torch.Tensor:
    """Logits at every position of PROMPT with the image spliced in."""
    with torch.no_grad():
        embeds = model.embed(PROMPT, model.encode_images(pixels))
        return model.forward_embeds(embeds, model.new_cache(64), 0, last_only=False)[0]


def original_with(tmp_path: Path, model: LlavaPhiForCausalLM, edit) -> Path:
    """An original-layout checkpoint whose state dict went through `edit(dict) -> None`."""
    d = save_original_layout(model, tmp_path / "ckpt")
    state = load_file(d / SAFETENSORS_FILE)
    edit(state)
    save_file(state, d / SAFETENSORS_FILE)
    return d


# ----- every layout loads to the same logits ------------------------------------------------
WRITERS = {
    "original": (lambda m, d: save_original_layout(m, d), LAYOUT_ORIGINAL,
                 (SAFETENSORS_FILE,)),
    "original-3-shards": (lambda m, d: save_original_layout(m, d, shards=3), LAYOUT_ORIGINAL,
                          (SAFETENSORS_INDEX, "model-00001-of-00003.safetensors",
                           "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors")),
    "original-bin": (lambda m, d: save_original_layout(m, d, fmt="bin"), LAYOUT_ORIGINAL,
                     (BIN_FILE,)),
    "original-bin-2-shards": (lambda m, d: save_original_layout(m, d, fmt="bin", shards=2),
                              LAYOUT_ORIGINAL, (BIN_INDEX, "pytorch_model-00001-of-00002.bin",
                                                "pytorch_model-00002-of-00002.bin")),
    "llava-1.5-extra-level": (lambda m, d: save_original_layout(m, d, llava15_vision_tower=True),
                              LAYOUT_ORIGINAL, (SAFETENSORS_FILE,)),
    "hf-new": (lambda m, d: save_llava_hf_layout(m, d, key_style="new"), LAYOUT_HF_NEW,
               (SAFETENSORS_FILE,)),
    "hf-new-vision_model": (lambda m, d: save_llava_hf_layout(m, d, "new",
                                                              clip_vision_model_level=True),
                            LAYOUT_HF_NEW, (SAFETENSORS_FILE,)),
    "hf-old": (lambda m, d: save_llava_hf_layout(m, d, key_style="old"), LAYOUT_HF_OLD,
               (SAFETENSORS_FILE,)),
    "hf-old-no-vision_model": (lambda m, d: save_llava_hf_layout(m, d, "old",
                                                                 clip_vision_model_level=False),
                               LAYOUT_HF_OLD, (SAFETENSORS_FILE,)),
    "hf-old-bin": (lambda m, d: save_llava_hf_layout(m, d, key_style="old", fmt="bin"),
                   LAYOUT_HF_OLD, (BIN_FILE,)),
    "hf-new-3-shards": (lambda m, d: save_llava_hf_layout(m, d, key_style="new", shards=3),
                        LAYOUT_HF_NEW, (SAFETENSORS_INDEX, "model-00001-of-00003.safetensors",
                                        "model-00002-of-00003.safetensors",
                                        "model-00003-of-00003.safetensors")),
    "hf-old-bin-2-shards": (lambda m, d: save_llava_hf_layout(m, d, "old", fmt="bin", shards=2),
                            LAYOUT_HF_OLD, (BIN_INDEX, "pytorch_model-00001-of-00002.bin",
                                            "pytorch_model-00002-of-00002.bin")),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_layout_loads_to_identical_logits(tmp_path, model, pixels, logits, name):
    write, layout, files = WRITERS[name]
    d = write(model, tmp_path / name)
    loaded = load_model(d)
    assert not loaded.training
    assert loaded.checkpoint_info.layout == layout
    assert loaded.checkpoint_info.files == files
    assert loaded.checkpoint_info.num_parameters == sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "cpu" for p in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(all_logits(loaded, pixels), logits)


def test_hf_shards_hold_exactly_the_single_file_tensors(tmp_path, model):
    one = load_file(save_llava_hf_layout(model, tmp_path / "one") / SAFETENSORS_FILE)
    d = save_llava_hf_layout(model, tmp_path / "three", shards=3)
    index = json.loads((d / SAFETENSORS_INDEX).read_text())
    assert set(index["weight_map"]) == set(one)  # stored (transformers) names, not ours
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in one.values())
    sharded: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        part = load_file(d / name)
        assert part and all(index["weight_map"][k] == name for k in part)
        sharded |= part
    assert sharded.keys() == one.keys()
    assert all(torch.equal(sharded[k], one[k]) for k in one)


def test_hf_writer_uses_the_keys_transformers_uses(tmp_path, model):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlavaConfig.from_dict(model.config.to_llava_hf_dict())
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(cfg)
    ours = set(load_file(save_llava_hf_layout(model, tmp_path / "new") / SAFETENSORS_FILE))
    assert ours - set(hf.state_dict()) == {"lm_head.bias"}  # the bias transformers drops
    assert set(hf.state_dict()) - ours == set()


def test_transformers_save_pretrained_output_hits_the_bias_trap(tmp_path, model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig.from_dict(model.config.to_llava_hf_dict()))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointMismatchError, match=r"missing language_model\.lm_head\.bias: "
                                                       r".*transformers >= 4\.52") as err:
        load_model(tmp_path / "hf")
    assert err.value.missing == ["lm_head.bias"]
    assert not err.value.unexpected and not err.value.mismatched  # every other key maps


# ----- conversion -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["original-bin", "hf-old"])
def test_convert_round_trip_gives_identical_logits(tmp_path, model, pixels, logits, layout):
    src = WRITERS[layout][0](model, tmp_path / "src")
    build_byte_tokenizer().save(src)
    info = convert_checkpoint(src, tmp_path / "dst")
    assert info.layout == WRITERS[layout][1]
    dst = tmp_path / "dst"
    assert {p.name for p in dst.iterdir()} >= {"config.json", SAFETENSORS_FILE, "tokenizer.json",
                                               "preprocessor_config.json"}
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llava_phi"
    assert json.loads((dst / "config.json").read_text())["eos_token_id"] == 256
    assert ImagePreprocessConfig.from_dict(
        json.loads((dst / "preprocessor_config.json").read_text())).image_size == 28
    assert load_tokenizer(dst).eos_token_id == 256
    loaded = load_model(dst)
    assert loaded.checkpoint_info.layout == LAYOUT_ORIGINAL
    assert torch.equal(all_logits(loaded, pixels), logits)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs


def test_convert_keeps_source_preprocessing_and_shards(tmp_path, model, pixels, logits):
    pre = ImagePreprocessConfig.for_image_size(28, image_mean=(0.5, 0.5, 0.5))
    src = save_original_layout(model, tmp_path / "src", tokenizer=build_byte_tokenizer(),
                               preprocess_config=pre)
    convert_checkpoint(src, tmp_path / "dst", max_shard_bytes=100_000)
    dst = tmp_path / "dst"
    index = json.loads((dst / SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((dst / s).is_file() for s in shards)
    assert not (dst / SAFETENSORS_FILE).exists()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.state_dict().values())
    assert json.loads((dst / "preprocessor_config.json").read_text()) == pre.to_dict()
    assert torch.equal(all_logits(load_model(dst), pixels), logits)


def test_convert_refuses_a_non_empty_destination_unless_overwrite(tmp_path, model):
    src = save_original_layout(model, tmp_path / "src", tokenizer=build_byte_tokenizer())
    convert_checkpoint(src, tmp_path / "dst")
    with pytest.raises(CheckpointError, match=r"dst is not empty; pass overwrite=True"):
        convert_checkpoint(src, tmp_path / "dst")
    (tmp_path / "dst" / "stale.txt").write_text("old")
    convert_checkpoint(src, tmp_path / "dst", overwrite=True)
    assert not (tmp_path / "dst" / "stale.txt").exists()
    assert load_model(tmp_path / "dst").checkpoint_info.layout == LAYOUT_ORIGINAL
    with pytest.raises(CheckpointError, match="onto itself"):
        convert_checkpoint(src, src, overwrite=True)


def test_failed_convert_leaves_nothing(tmp_path, model):
    src = save_original_layout(model, tmp_path / "src")  # no tokenizer
    with pytest.raises(CheckpointError, match="needs the tokenizer"):
        convert_checkpoint(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_preserves_bf16(tmp_path, model, pixels, logits):
    bf16 = random_tiny_model(seed=SEED).to(torch.bfloat16)
    src = save_original_layout(bf16, tmp_path / "src", tokenizer=build_byte_tokenizer())
    info = convert_checkpoint(src, tmp_path / "dst")
    assert info.dtypes == ("bfloat16",)
    written = load_file(tmp_path / "dst" / SAFETENSORS_FILE)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert all(torch.equal(written[k], t) for k, t in bf16.state_dict().items())
    as_stored = load_model(tmp_path / "dst", dtype=None)
    assert {p.dtype for p in as_stored.parameters()} == {torch.bfloat16}
    assert torch.equal(all_logits(as_stored, pixels), all_logits(bf16, pixels))
    assert load_model(tmp_path / "dst").dtype == torch.float32  # the default upcasts on load


def test_load_in_fp16(tmp_path, model, pixels, logits):
    d = save_original_layout(model, tmp_path / "ckpt")
    half = load_model(d, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    out = all_logits(half, pixels)
    assert torch.isfinite(out).all()
    assert float((out - logits).abs().max() / logits.abs().max()) < 2e-2


def test_save_canonical_writes_atomically_and_refuses_overwrite(tmp_path, model, pixels, logits):
    d = save_canonical(model, tmp_path / "out", tokenizer=build_byte_tokenizer())
    assert {p.name for p in d.iterdir()} >= {"config.json", SAFETENSORS_FILE, "tokenizer.json",
                                             "preprocessor_config.json"}
    with pytest.raises(CheckpointError, match="not empty"):
        save_canonical(model, d)
    save_canonical(model, d, overwrite=True)
    assert torch.equal(all_logits(load_model(d), pixels), logits)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_canonical(model, tmp_path / "file")


def test_progress_bar_only_over_threshold(tmp_path, model, capsys):
    d = save_original_layout(model, tmp_path / "ckpt")
    load_model(d)
    assert capsys.readouterr().err == ""
    load_model(d, progress_threshold_bytes=0)
    assert "reading ckpt" in capsys.readouterr().err


# ----- position_ids --------------------------------------------------------------------------
def test_arange_position_ids_are_dropped(tmp_path, model, pixels, logits):
    d = original_with(tmp_path, model, lambda s: s.update({POSITION_IDS: torch.arange(5)[None]}))
    loaded = load_model(d)
    assert any("position_ids" in n for n in loaded.checkpoint_info.notes)
    assert torch.equal(all_logits(loaded, pixels), logits)


def test_hf_position_ids_are_dropped(tmp_path, model):
    d = save_llava_hf_layout(model, tmp_path / "hf", key_style="old")
    state = load_file(d / SAFETENSORS_FILE)
    state["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    save_file(state, d / SAFETENSORS_FILE)
    assert load_model(d).checkpoint_info.layout == LAYOUT_HF_OLD


@pytest.mark.parametrize("ids", [torch.arange(5).flip(0)[None], torch.arange(6)[None],
                                 torch.arange(5.0)[None]])
def test_other_position_ids_are_refused(tmp_path, model, ids):
    d = original_with(tmp_path, model, lambda s: s.update({POSITION_IDS: ids}))
    with pytest.raises(CheckpointError, match=rf"unexpected keys: {POSITION_IDS} \(a position_ids "
                                              r"buffer that is not arange\(5\)"):
        load_model(d)


# ----- errors ---------------------------------------------------------------------------------
def test_missing_key_is_named(tmp_path, model):
    d = original_with(tmp_path, model, lambda s: s.pop("lm_head.bias"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: lm_head\.bias$"):
        load_model(d)


def test_unexpected_key_is_named(tmp_path, model):
    d = original_with(tmp_path, model, lambda s: s.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: model\.extra\.weight$"):
        load_model(d)


def test_shape_mismatch_names_both_shapes(tmp_path, model):
    d = original_with(tmp_path, model, lambda s: s.update({FC1: torch.zeros(81, 40)}))
    with pytest.raises(CheckpointMismatchError,
                       match=rf"shape mismatches: {FC1} \(expected \(80, 40\), found \(81, 40\)\)"):
        load_model(d)


def test_all_problems_are_reported_together(tmp_path, model):
    def edit(state):
        state.pop("lm_head.bias")
        state.pop("model.final_layernorm.weight")
        state["model.extra.weight"] = torch.ones(2)
        state[FC1] = torch.zeros(81, 40)

    with pytest.raises(CheckpointMismatchError) as err:
        load_model(original_with(tmp_path, model, edit))
    assert sorted(err.value.missing) == ["lm_head.bias", "model.final_layernorm.weight"]
    assert err.value.unexpected == ["model.extra.weight"]
    assert len(err.value.mismatched) == 1
    message = str(err.value)
    assert "\n" not in message
    for name in ("lm_head.bias", "model.final_layernorm.weight", "model.extra.weight", FC1):
        assert name in message


def test_hf_mismatch_names_keys_as_stored(tmp_path, model):
    d = save_llava_hf_layout(model, tmp_path / "hf", key_style="old")
    state = load_file(d / SAFETENSORS_FILE)
    state.pop("language_model.model.final_layernorm.bias")
    state["multi_modal_projector.linear_3.weight"] = torch.ones(1)
    save_file(state, d / SAFETENSORS_FILE)
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing keys: language_model\.model\.final_layernorm\.bias; "
                             r"unexpected keys: multi_modal_projector\.linear_3\.weight$"):
        load_model(d)


@pytest.mark.parametrize("key_style", ["new", "old"])
def test_dropped_lm_head_bias_is_refused_with_the_reason(tmp_path, model, key_style):
    d = save_llava_hf_layout(model, tmp_path / "hf", key_style=key_style, drop_lm_head_bias=True)
    with pytest.raises(CheckpointMismatchError,
                       match=r"lm_head\.bias: .*no lm_head bias.*transformers >= 4\.52 "
                             r"LlavaForConditionalGeneration"):
        load_model(d)


def test_wrong_layout_hints_at_model_type(tmp_path, model):
    d = save_llava_hf_layout(model, tmp_path / "hf")
    cfg = model.config.to_original_dict()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="model_type 'llava_phi' right"):
        load_model(d)


def test_truncated_safetensors_is_corrupt(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt")
    data = (d / SAFETENSORS_FILE).read_bytes()
    (d / SAFETENSORS_FILE).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        load_model(d)


def test_truncated_shard_is_named(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt", shards=3)
    shard = d / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: corrupt"):
        load_model(d)


@pytest.mark.parametrize("content", [b"garbage", None])
def test_corrupt_bin_is_refused(tmp_path, model, content):
    d = save_original_layout(model, tmp_path / "ckpt", fmt="bin")
    data = (d / BIN_FILE).read_bytes()
    (d / BIN_FILE).write_bytes(content if content is not None else data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: corrupt or unsafe"):
        load_model(d)


def test_bin_that_is_not_a_state_dict(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt", fmt="bin")
    torch.save({"state_dict": {"a": torch.ones(1)}}, d / BIN_FILE)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model(d)


def test_index_naming_a_missing_shard(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt", shards=3)
    (d / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json: names shard files that do not "
                                              r"exist: model-00003-of-00003\.safetensors$"):
        load_model(d)


def test_index_naming_the_wrong_shard(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt", shards=3)
    index = json.loads((d / SAFETENSORS_INDEX).read_text())
    index["weight_map"]["lm_head.bias"] = "model-00001-of-00003.safetensors"
    (d / SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"not found in the shard the index names: "
                                              r"lm_head\.bias \(model-00001-of-00003"):
        load_model(d)


def test_unparsable_index(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt", shards=2)
    (d / SAFETENSORS_INDEX).write_text("{")
    with pytest.raises(CheckpointError, match=r"index\.json: cannot parse the index"):
        load_model(d)


def test_no_weight_files_names_what_was_looked_for(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt")
    (d / SAFETENSORS_FILE).unlink()
    looked_for = r"model\.safetensors, model\.safetensors\.index\.json, pytorch_model\.bin, "
    with pytest.raises(CheckpointError, match=rf"no weight files \(looked for {looked_for}"
                                              r"pytorch_model\.bin\.index\.json\)"):
        load_model(d)


def test_config_errors(tmp_path, model):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no config\.json \(the directory is empty\)"):
        load_model(tmp_path / "empty")
    d = save_original_layout(model, tmp_path / "ckpt")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt: no config\.json$"):
        load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot parse config\.json"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config\.json: .*model_type 'bert'") as err:
        load_model(d)
    assert isinstance(err.value, ConfigError)


def test_several_stored_dtypes_need_an_explicit_dtype(tmp_path, model):
    d = original_with(tmp_path, model, lambda s: s.update({FC1: s[FC1].half()}))
    with pytest.raises(CheckpointError, match="several dtypes .*float16, float32"):
        load_model(d, dtype=None)
    assert load_model(d).dtype == torch.float32
    _, state, info = read_checkpoint(d)
    assert state[FC1].dtype == torch.float16 and info.dtypes == ("float16", "float32")


def test_safetensors_preferred_over_bin(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt")
    torch.save({"junk": torch.ones(1)}, d / BIN_FILE)
    assert load_model(d).checkpoint_info.files == (SAFETENSORS_FILE,)
    with safe_open(str(d / SAFETENSORS_FILE), "pt") as f:
        assert "lm_head.bias" in f.keys()  # noqa: SIM118


def test_all_zero_lm_head_bias_is_flagged(tmp_path, model):
    d = original_with(tmp_path, model, lambda s: s["lm_head.bias"].zero_())
    assert any("lm_head.bias is all zeros" in n for n in load_model(d).checkpoint_info.notes)
    assert not any("zeros" in n for n in load_model(save_original_layout(
        model, tmp_path / "ok")).checkpoint_info.notes)


def test_convert_refuses_preprocessing_for_another_image_size(tmp_path, model):
    src = save_original_layout(model, tmp_path / "src", tokenizer=build_byte_tokenizer(),
                               preprocess_config=ImagePreprocessConfig())  # 336 px, model 28 px
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: crop size 336 != the "
                                              r"vision tower's image_size 28"):
        convert_checkpoint(src, tmp_path / "dst")
    (src / "preprocessor_config.json").write_text("[")
    with pytest.raises(CheckpointError, match=r"cannot parse preprocessor_config\.json"):
        convert_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# ----- tensor-by-tensor loading ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(WRITERS))
def test_every_layout_loads_bit_identical_parameters(tmp_path, model, name):
    """What the old read-everything path gave: the saved tensors, cast with .to(dtype)."""
    write = WRITERS[name][0]
    for stored in (torch.float32, torch.bfloat16):
        source = model if stored == torch.float32 else random_tiny_model(seed=SEED).to(stored)
        saved = source.state_dict()
        d = write(source, tmp_path / f"{name}-{stored}")
        for dtype in (torch.float32, torch.float16, torch.bfloat16, None):
            loaded = load_model(d, dtype=dtype).state_dict()
            assert loaded.keys() == saved.keys()
            for key, tensor in saved.items():
                want = tensor if dtype is None else tensor.to(dtype)
                assert loaded[key].dtype == want.dtype, (key, stored, dtype)
                assert torch.equal(loaded[key], want), (key, stored, dtype)


def _record_reads(monkeypatch) -> list[str]:
    """The stored names of every tensor whose data a _WeightSource reads from now on."""
    reads: list[str] = []
    real = _WeightSource.read

    def read(self, stored, staging=None):
        reads.append(stored.name)
        return real(self, stored, staging)

    monkeypatch.setattr(_WeightSource, "read", read)
    return reads


def test_verification_reads_only_the_tiny_tensors(tmp_path, model, monkeypatch):
    d = original_with(tmp_path, model, lambda s: s.update({FC1: torch.zeros(81, 40),
                                                           POSITION_IDS: torch.arange(5)[None]}))
    reads = _record_reads(monkeypatch)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches: model\.layers\.0"):
        load_model(d)
    assert sorted(reads) == ["lm_head.bias", POSITION_IDS]  # the checks' own, nothing else

    reads.clear()
    src = save_original_layout(model, tmp_path / "ok", shards=3, tokenizer=build_byte_tokenizer())
    load_model(src)  # then each tensor exactly once (plus the bias for the all-zero check)
    assert sorted(reads) == sorted([*model.state_dict(), "lm_head.bias"])
    reads.clear()
    convert_checkpoint(src, tmp_path / "dst")  # convert streams the same way
    assert sorted(reads) == sorted([*model.state_dict(), "lm_head.bias"])


def _edit_safetensors(path: Path, header=None, data=None, raw=None) -> None:
    """Rewrite a .safetensors file through edits of its header (a dict), data and whole bytes."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    head, body = json.loads(blob[8:8 + n]), blob[8 + n:]
    head, body = (header or (lambda h: h))(head), (data or (lambda b: b))(body)
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    blob = len(text).to_bytes(8, "little") + text + body
    path.write_bytes((raw or (lambda b: b))(blob))


def _last_tensor(head: dict) -> str:
    return max((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"])


def _shift_last(head: dict) -> dict:
    begin, end = head[_last_tensor(head)]["data_offsets"]
    head[_last_tensor(head)]["data_offsets"] = [begin - 4, end - 4]
    return head


CORRUPTIONS = {
    "too short": ({"raw": lambda b: b[:5]}, r"5 bytes, too short for the 8-byte header length"),
    "header length": ({"raw": lambda b: (10**6).to_bytes(8, "little") + b[8:]},
                      r"a header of 1000000 bytes in a file of \d+ bytes"),
    "not json": ({"raw": lambda b: b[:8] + b"{nope" + b[13:]}, r"the header is not JSON"),
    "not an object": ({"header": lambda h: [h]}, r"the header is not a JSON object"),
    "metadata": ({"header": lambda h: {**h, "__metadata__": [1]}},
                 r"__metadata__ is not a JSON object"),
    "dtype": ({"header": lambda h: {**h, FC1: {**h[FC1], "dtype": "X16"}}},
              rf"tensor {FC1}: unsupported dtype 'X16'"),
    "negative": ({"header": lambda h: {**h, FC1: {**h[FC1], "shape": [-80, 40]}}},
                 rf"tensor {FC1}: bad shape \[-80, 40\]"),
    "size": ({"header": lambda h: {**h, FC1: {**h[FC1], "shape": [81, 40]}}},
             rf"tensor {FC1}: data_offsets \[\d+, \d+\] hold 12800 bytes, but shape \[81, 40\] of "
             r"F32 needs 12960"),
    "overlap": ({"header": _shift_last}, r"tensor \S+: data starts at byte \d+ of the data "
                                         r"section, expected \d+ \(overlap\)"),
    "trailing bytes": ({"data": lambda b: b + bytes(8)},
                       r"the header describes \d+ bytes of tensor data, the file holds \d+$"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_safetensors_header_is_refused(tmp_path, model, name):
    edits, detail = CORRUPTIONS[name]
    d = save_original_layout(model, tmp_path / "ckpt")
    _edit_safetensors(d / SAFETENSORS_FILE, **edits)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: corrupt safetensors file: "
                                              rf"{detail}"):
        load_model(d)
    with pytest.raises(SafetensorError):  # the safetensors library refuses the file too
        with safe_open(str(d / SAFETENSORS_FILE), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118


def test_file_shrunk_after_verification_is_corrupt(tmp_path, model):
    d = save_original_layout(model, tmp_path / "ckpt")
    ckpt = _verify(d)
    with ckpt.source:
        (d / SAFETENSORS_FILE).write_bytes((d / SAFETENSORS_FILE).read_bytes()[:-10])
        last = max(ckpt.state.values(), key=lambda s: s.offset)
        with pytest.raises(CheckpointError, match=rf"model\.safetensors: corrupt safetensors file:"
                                                  rf" it ends inside tensor {last.name}"):
            ckpt.source.read(last)


def test_streaming_writer_is_byte_identical_to_save_file(tmp_path, model):
    state = {**model.state_dict(), "h": torch.randn(3).half(), "b": torch.randn(2).bfloat16(),
             "i": torch.arange(4), "t": torch.randn(4, 3).t(), "s": torch.tensor(1.5),
             "e": torch.ones(0, 2), "q": torch.ones(2, dtype=torch.bool)}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lib.safetensors",
              metadata={"format": "pt"})
    _write_safetensors(tmp_path / "ours.safetensors", state, metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == \
        (tmp_path / "lib.safetensors").read_bytes()


# A model of ~170 MB in fp16 (~340 MB in fp32): Phi layers of width 768, tiny vision tower.
MEMORY_CFG = tiny_config().with_text(vocab_size=8192, hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=10, num_attention_heads=8)
# Runs in a fresh interpreter: peak RSS of one load_model above the peak before it, as JSON.
# The peak is the process's own (VmHWM): ru_maxrss would start at this test process's peak,
# which Linux carries over into a child through fork and exec.
MEASURE_LOAD = r"""
import json, sys, tempfile
import torch
from llava_phi_ros.model.checkpoint import load_model, save_canonical
from llava_phi_ros.model.config import tiny_config
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM

def peak_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

stored, target = getattr(torch, sys.argv[2]), getattr(torch, sys.argv[3])
# Warm up on a tiny checkpoint with the same dtypes: torch's one-off costs (thread pools,
# library code paged in on first use: ~80 MB) belong to the baseline, not to the model.
with tempfile.TemporaryDirectory() as tmp:
    tiny = save_canonical(LlavaPhiForCausalLM(tiny_config()).to(stored), tmp + "/tiny")
    load_model(tiny, "cpu", target)
base = peak_bytes()
model = load_model(sys.argv[1], "cpu", target)
print(json.dumps({"peak_bytes": peak_bytes() - base,
                  "weight_bytes": sum(t.nbytes for t in model.state_dict().values())}))
"""


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory) -> Path:
    with torch.device("meta"):
        big = LlavaPhiForCausalLM(MEMORY_CFG)
    big.half().rebuild_buffers("cpu")  # the rotary tables cannot be moved off meta
    big.to_empty(device="cpu")  # fp16 from the start: no fp32 copy
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in big.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return save_canonical(big, tmp_path_factory.mktemp("big") / "fp16")


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc/self/status")
def test_loading_peaks_near_one_copy_of_the_weights(fp16_checkpoint):
    """Host memory: ~the model plus one tensor (the old path held the stored weights too).

    fp16 -> fp16 reads each tensor into its parameter; fp16 -> fp32 goes through the staging
    buffer. Both run at once, each in its own interpreter.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    procs = {target: subprocess.Popen(
        [sys.executable, "-c", MEASURE_LOAD, str(fp16_checkpoint), "float16", target],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        for target in ("float16", "float32")}
    for target, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        ratio = result["peak_bytes"] / result["weight_bytes"]
        assert result["weight_bytes"] > 150e6 * (2 if target == "float32" else 1)
        assert 0.9 < ratio < 1.3, (target, result)  # above 0.9: the measurement sees the model
