"""`llava-phi bench` on the tiny config: the JSON's structure, the same greedy ids as stock
transformers on the same weights (fp32), the plot, and bad flags refused with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava_phi_ros import bench
from llava_phi_ros.cli import main

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 4
REPEATS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "llava_phi_ros.cli", "bench", "--config", "tiny",
         "--random-weights", "--backend", "torch,transformers", "--repeats", str(REPEATS),
         "--new-tokens", str(NEW_TOKENS), "--threads", "1", "--json", str(out / "b.json"),
         "--plot", str(out / "b.png")],
        capture_output=True, text=True, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


@pytest.fixture(scope="module")
def report(run) -> dict:
    return json.loads((run[1] / "b.json").read_text())


def test_json_records_the_run(report):
    assert report["command"].startswith("llava-phi bench --config tiny --random-weights")
    assert report["versions"]["torch"] and report["versions"]["transformers"]
    assert report["machine"]["cpu"] and report["machine"]["torch_threads"] == 1
    cfg = report["config"]
    assert (cfg["decoder_layers"], cfg["dtype"], cfg["device"]) == (2, "float32", "cpu")
    assert cfg["parameters"]["total"] == sum(v for k, v in cfg["parameters"].items()
                                             if k != "total")
    assert cfg["new_tokens"] == NEW_TOKENS and cfg["repeats"] == REPEATS
    assert "byte" in cfg["tokenizer"]


def test_json_has_every_sample_median_and_ratio(report):
    keys = [m["key"] for m in report["metrics"]]
    assert list(report["backends"]) == ["torch", "transformers"]
    for backend in report["backends"].values():
        samples = backend["samples"]
        assert len(samples) == REPEATS + 1  # + the default warm-up, flagged
        assert [s["warmup"] for s in samples] == [True, False, False]
        for s in samples:
            assert all(s[k] > 0 for k in bench.TIMED)
            assert s["prefilled_positions"] == s["prompt_positions"] == report["config"][
                "prompt_positions"]
        assert set(backend["medians"]) == set(keys)
        assert backend["memory"]["peak_mib"] > 0
        measured = sorted(s["prefill_ms"] for s in samples[1:])
        assert backend["medians"]["prefill_ms"] == pytest.approx(sum(measured) / 2)
    torch_side = report["backends"]["torch"]
    assert all(s["repeat_prefilled_positions"] < s["prompt_positions"]
               for s in torch_side["samples"])  # the question only: the frame's prefix is reused
    ratios = report["ratios"]["torch"]
    assert set(ratios) == set(keys)
    paired = report["paired_ratios"]["torch"]
    assert set(paired) == set(bench.TIMED)
    assert all(p["min"] <= p["median"] <= p["max"] for p in paired.values())
    base = report["backends"]["transformers"]["medians"]
    assert ratios["prefill_ms"] == pytest.approx(base["prefill_ms"] /
                                                 torch_side["medians"]["prefill_ms"])
    assert ratios["decode_tok_s"] == pytest.approx(torch_side["medians"]["decode_tok_s"] /
                                                   base["decode_tok_s"])


def test_same_greedy_tokens_as_transformers(report):
    ours = [s["token_ids"] for s in report["backends"]["torch"]["samples"]]
    theirs = [s["token_ids"] for s in report["backends"]["transformers"]["samples"]]
    assert all(len(t) == NEW_TOKENS for t in ours + theirs)
    assert ours == theirs
    assert report["greedy_tokens"]["torch"] == {"same_as_baseline": True,
                                                "first_divergence": None}
    assert all(s["first_token_matches_generate"]
               for s in report["backends"]["transformers"]["samples"])


def test_table_on_stdout_progress_on_stderr_and_plot(run):
    proc, out = run
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| metric | torch | transformers | torch vs transformers |"
    assert len(table) == 2 + len(bench.METRICS)
    assert "no cross-call cache" in proc.stdout
    assert "bench: [repeat 2/2] transformers:" in proc.stderr
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, message", [
    (["--backend", "torch,nope"], "unknown backend 'nope'"),
    (["--backend", "tensorrt"], "backend 'tensorrt' needs TensorRT's Python module"),
    (["--backend", "torch:int4"], "torch takes a decode path, as torch:auto|eager|graph|fused"),
    (["--backend", "tensorrt:int4"], "only onnxruntime takes a weight format"),
    (["--backend", "onnxruntime:int3"], "only onnxruntime takes a weight format"),
    (["--backend", "onnxruntime:int4:9"], "only onnxruntime takes a weight format"),
    (["--backend", "torch,torch"], "names a backend twice"),
    (["--layers", "0"], "--layers must be >= 1, got 0"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--device", "cuda:7"], "cuda:7"),
])
def test_bad_flags_exit_2_with_one_line(capsys, flags, message):
    assert main(["bench", "--config", "tiny", "--random-weights", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llava-phi: error: ") and message in err and "\n" not in err


def test_no_weight_source_exits_2(capsys):
    assert main(["bench", "--config", "tiny"]) == 2
    assert "--random-weights" in capsys.readouterr().err


@pytest.mark.parametrize("missing, flags, message", [
    ("matplotlib", ["--backend", "torch", "--plot", "x.png"], "--plot needs matplotlib"),
    ("transformers", ["--backend", "torch,transformers"], "baseline needs transformers"),
])
def test_missing_extra_exits_2(monkeypatch, capsys, missing, flags, message):
    real = bench.find_spec
    monkeypatch.setattr(bench, "find_spec", lambda name: None if name == missing else real(name))
    assert main(["bench", "--config", "tiny", "--random-weights", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "llava-phi-ros[bench]" in err and "\n" not in err


def test_ratio_is_better_than_baseline_above_one():
    ms, tok_s = bench.METRICS[0], next(m for m in bench.METRICS if m.higher_is_better)
    assert bench.ratio(ms, 50.0, 100.0) == 2.0  # half the time: 2x
    assert bench.ratio(tok_s, 20.0, 10.0) == 2.0  # twice the rate: 2x
    assert bench.ratio(ms, 0.0, 100.0) is None
    assert bench.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert bench.first_divergence([1, 2], [1, 2]) is None


def test_onnxruntime_is_benched_on_an_export_of_the_same_weights(tmp_path, capsys):
    out = tmp_path / "ort.json"
    assert main(["bench", "--config", "tiny", "--random-weights", "--backend",
                 "torch,onnxruntime", "--repeats", "1", "--new-tokens", "4", "--no-memory",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    ids = {name: b["token_ids"] for name, b in result["backends"].items()}
    assert set(ids) == {"torch", "onnxruntime"} and ids["torch"] == ids["onnxruntime"]
    assert "exporting the weights for onnxruntime" in capsys.readouterr().err
