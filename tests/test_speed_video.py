"""`graphprune bench --speed --video` at tiny size: the rows and ratios are produced (never timings).

The tokens each LLM layer runs on follow from the methods' definitions (EVS: max(h*w, int(T*h*w*(1 -
rate))) per video before layer 0; FastV / DART / random: `keep` per frame from layer 2 on), and the
FLOPs-ideal speed-up is recounted by hand from the config: per layer 2 x tokens x the linear weights'
multiply-adds plus SDPA's 4 x tokens (tokens + 1) / 2 x hidden (QK^T and PV over the scores at or
below the diagonal, which causal attention computes), and the LM head over the last layer's tokens."""
import json

import pytest
from test_families import _model

from graphprune.cli import main
from graphprune.tools import speed_video
from graphprune.tools.vqa_model import BenchError

# 16 frames of 8 x 8 patches: 8 temporal patches x 16 merged tokens = 128 video tokens; a quarter kept:
# 4 per frame (32), evs rate 0.75: max(16, int(128 x 0.25)) = 32
TINY = dict(frames=16, grid=(8, 8), hidden=64, layers=4, mlp=128, vision_hidden=32, vision_layers=2, vision_heads=4,
            vision_mlp=64, window=56, keep_share=0.25)
HEADS, KV_HEADS, VOCAB = 4, 2, 160            # family_zoo.TEXT


@pytest.fixture(scope="module")
def result():
    # TINY builds family_zoo's default tiny Qwen2.5-VL: the capture the family tests hold already
    model, program = _model("qwen2_5_vl")
    assert model.config.to_dict() == speed_video.build_video_model(TINY).config.to_dict()
    return speed_video.run_video_speed(repeats=1, config=TINY, linear="aten", quiet=True, captured=(model, program))


def _flops(tokens_per_layer):
    h, mlp = TINY["hidden"], TINY["mlp"]
    kv = h // HEADS * KV_HEADS
    weights = 2 * h * h + 2 * h * kv + 3 * h * mlp               # q, o; k, v; gate, up, down
    layers = sum(2 * n * weights + 4 * n * (n + 1) // 2 * h for n in tokens_per_layer)
    return layers + 2 * tokens_per_layer[-1] * h * VOCAB


def test_rows_and_ratios(result):
    json.dumps(result)
    assert result["vision_tokens"] == 128 and result["video_grid_thw"] == [8, 8, 8]
    n = result["prompt_tokens"]
    text = n - 128
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["unpruned", "evs", "fastv", "dart", "random"]
    expected = {"unpruned": [n] * 4, "evs": [text + 32] * 4}
    expected.update({m: [n, n, text + 32, text + 32] for m in ("fastv", "dart", "random")})
    for m, r in rows.items():
        assert r["tokens_per_layer"] == expected[m], m
        assert r["flops"] == _flops(expected[m]), m
        assert r["llm_prefill_ms"] > 0 and r["e2e_ms"] > 0
        assert r["vs_transformers"] == pytest.approx(result["transformers_llm_prefill_ms"] / r["llm_prefill_ms"])
        assert r["e2e_vs_transformers"] == pytest.approx(result["transformers_forward_ms"] / r["e2e_ms"])
    base = rows["unpruned"]
    for m in ("evs", "fastv", "dart", "random"):
        r = rows[m]
        assert r["ideal_speedup"] == pytest.approx(_flops(expected["unpruned"]) / _flops(expected[m]))
        assert r["measured_speedup"] == pytest.approx(base["llm_prefill_ms"] / r["llm_prefill_ms"])
        assert r["ratio"] == pytest.approx(r["measured_speedup"] / r["ideal_speedup"])
        assert r["ratio_vs_transformers"] == pytest.approx(r["vs_transformers"] / r["ideal_speedup"])
        assert r["e2e_speedup"] == pytest.approx(base["e2e_ms"] / r["e2e_ms"])
    out = speed_video.format_video_speed(result)
    assert "128 vision tokens" in out and "linear: aten" in out and "e2e HF" in out


def test_bad_input_before_work():
    with pytest.raises(BenchError, match="unknown video speed-mode method 'cls_topk'"):
        speed_video.run_video_speed(["cls_topk"], config=TINY, quiet=True)
    with pytest.raises(BenchError, match="unknown linear lowering 'mkl'"):
        speed_video.run_video_speed(linear="mkl", config=TINY, quiet=True)
    with pytest.raises(BenchError, match="frames 15 .* must be even"):
        speed_video.run_video_speed(config=dict(TINY, frames=15), quiet=True)


def test_cli_wants_speed(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--video"])
    assert "--speed --video" in capsys.readouterr().err
