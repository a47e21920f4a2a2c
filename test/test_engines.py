"""The engine seam: one registry, metadata without weights, close() that frees memory."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import shutil

import numpy as np
import pytest

from llava_phi_ros.backends import BACKENDS, create_backend, implemented_backends
from llava_phi_ros.backends.base import BackendError
from llava_phi_ros.model.builtin import BUILTIN_TINY_DIR
from llava_phi_ros.model.config import tiny_config
from llava_phi_ros.model.generation import GenerationConfig
from llava_phi_ros.model.llava_phi import LlavaPhiForCausalLM
from llava_phi_ros.model.metadata import ModelLoadError, ModelMetadata, load_metadata
from llava_phi_ros.model.preprocess import ImagePreprocessConfig
from llava_phi_ros.model.tokenizer import build_byte_tokenizer
from llava_phi_ros.pipeline import VisionLanguageModel


def test_registry_names_every_backend_once():
    assert set(implemented_backends()) <= set(BACKENDS) and "torch" in implemented_backends()
    meta = load_metadata("builtin:random-tiny")
    with pytest.raises(BackendError, match="unknown backend 'nonsense'"):
        create_backend("nonsense", meta)
    for name in set(BACKENDS) - set(implemented_backends()):
        with pytest.raises(BackendError, match="not implemented yet"):
            create_backend(name, meta)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        VisionLanguageModel.load("builtin:random-tiny", dtype="float8")


@pytest.mark.skipif(BUILTIN_TINY_DIR is None, reason="builtin:tiny is not shipped")
def test_metadata_loads_without_weights(tmp_path):
    for name in os.listdir(BUILTIN_TINY_DIR):  # everything but the weights
        if not name.startswith(("model.safetensors", "pytorch_model")):
            src = BUILTIN_TINY_DIR / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    meta = load_metadata(str(tmp_path))
    assert meta.config == load_metadata("builtin:tiny").config
    assert meta.tokenizer.vocab_size > 0 and meta.weights_dir == tmp_path
    with pytest.raises(ValueError, match="no weight files"):  # a CheckpointError
        VisionLanguageModel.from_metadata(meta, "torch")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_close_then_a_new_backend_twenty_times_keeps_memory_flat():
    base = tiny_config(vocab_size=8192, image_size=28)
    cfg = dataclasses.replace(base, text=dataclasses.replace(
        base.text, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8)).validate()
    template = LlavaPhiForCausalLM(cfg)
    weights_mb = sum(p.numel() for p in template.parameters()) * 4 / 2**20
    assert weights_mb > 25  # a leak of one model per round would stand out
    meta = ModelMetadata("leak-check", cfg, build_byte_tokenizer(),
                         ImagePreprocessConfig.for_image_size(28),
                         build_weights=lambda: copy.deepcopy(template))  # new tensors each time
    img = np.zeros((28, 28, 3), np.uint8)
    samples = []
    for _ in range(20):
        vlm = VisionLanguageModel.from_metadata(meta, "torch")
        vlm.ask(img, "What is there?", generation=GenerationConfig(max_new_tokens=4))
        vlm.close()
        del vlm
        gc.collect()
        samples.append(rss_mb())
    growth = samples[-1] - samples[4]  # after warm-up (allocator pools, lazy imports)
    assert growth < weights_mb / 2, (samples, weights_mb)
