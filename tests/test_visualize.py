"""graphprune visualize: picture size, dimmed patches = the patches graphprune's outputs dropped."""
import json

import pytest
import torch

from graphprune import prune
from graphprune.cli import main
from graphprune.tools import images, vqa, vqa_model, zoo
from graphprune.tools.images import read_png, write_png
from graphprune.tools.visualize import dimmed_count, draw, kept_patches, visualize


@pytest.fixture(scope="module")
def tiny():
    return vqa_model.load_vqa_model("random:tiny")        # 4x4 patch grid, 56-px images


def test_png_roundtrip(tmp_path):
    img = torch.randint(0, 256, (3, 7, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_png(str(tmp_path / "x.png"), img)
    assert torch.equal(read_png(str(tmp_path / "x.png")), img)


@pytest.mark.parametrize("spec", ["fastv(layer=2, keep=6)", "cls_topk(keep=5)", "vtw(layer=3)",
                                  "visiontrim(keep=8)"])
def test_dimmed_patches_match_the_report(tiny, tmp_path, spec):
    s = vqa.sample_at("test", 1)
    path = str(tmp_path / "v.png")
    res = visualize(tiny, s.image, s.question, spec, path, scale=3)
    img = read_png(path)
    assert list(img.shape) == [3, 56 * 3, 56 * 3] and res["size"] == [168, 168]
    # kept = vision tokens in the last layer, from the report: its sequence length minus the text
    prompt_len = len(tiny.vocab.prompt_ids(s.question, 16))
    kept_by_report = res["tokens_per_layer"][-1] - (prompt_len - 16)
    assert len(res["kept"]) == kept_by_report
    assert res["dimmed"] == 16 - kept_by_report
    shown = images.resize(s.image, 56).repeat_interleave(3, 1).repeat_interleave(3, 2)
    assert dimmed_count(shown, img, tiny.grid) == res["dimmed"]
    assert set(res["merged"]) <= set(res["kept"])
    if spec.startswith("visiontrim"):
        assert len(res["merged"]) <= 2                  # R = 8 // 4 complement tokens at most


def test_mustdrop_merges_are_outlined(tmp_path):
    # 6x6 grid, 3x3 windows -> 4 tiles; tau=-1 merges every tile: the 4 kept tokens are the merges,
    # at each tile's first patch (0, 3, 18, 21)
    model = zoo.build_model(dict(zoo.CONFIGS["tiny"], image_size=84, vision_layers=3), 0).eval()
    vm = vqa_model.wrap_model(model, "t", "test", vocab=vqa.Vocab())
    s = vqa.sample_at("test", 2)
    res = visualize(vm, s.image, s.question, "mustdrop(keep=8, layers=(2,), gamma=0.011, alpha=0.01, tau=-1.0, order='raster')",
                    str(tmp_path / "m.png"))
    assert res["kept"] == res["merged"] == [0, 3, 18, 21]
    img = read_png(str(tmp_path / "m.png"))
    assert img[:, 0, 0].tolist() == [255, 150, 0]                       # outline of patch 0
    assert dimmed_count(images.resize(s.image, 84), img, vm.grid) == 32


def test_kept_patches_batch_with_padding(tiny):
    items = vqa_model.load_items(None, 3)
    kw = tiny.inputs(items)
    assert kw["attention_mask"].min() == 0              # questions of different lengths: left padding
    out = prune(tiny.model, "fastv(layer=2, keep=5)")(**kw)
    kept = kept_patches(out, kw["input_ids"], tiny.model.config.image_token_id)
    assert [len(s) for s in kept] == [1, 1, 1] and all(len(s[0]) == 5 for s in kept)
    full = kept_patches(out, kw["input_ids"], tiny.model.config.image_token_id, layer=0)
    assert all(s[0] == list(range(16)) for s in full)


def test_draw_dims_only_dropped_cells():
    img = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    out = draw(img, (2, 2), kept={0, 3})
    assert out[:, :4, :4].eq(200).all() and out[:, 4:, 4:].eq(200).all() and out[:, :4, 4:].eq(50).all()


def test_cli_visualize(tmp_path, capsys):
    out = tmp_path / "v.png"
    assert main(["visualize", "--image", "test:0", "--pipeline", "fastv(layer=2, keep=4)", "--out", str(out),
                 "--model", "random:tiny", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["kept"]) == 4 and res["dimmed"] == 12 and read_png(str(out)).shape == (3, 56, 56)


@pytest.mark.parametrize("argv, message", [
    (["--image", "/nonexistent.png", "--question", "q"], "does not exist"),
    (["--image", "test:0", "--out", "/nonexistent/dir/x.png"], "does not exist"),
    (["--image", "test:0", "--pipeline", "nosuchpass"], "nosuchpass"),
])
def test_cli_visualize_errors(argv, message, capsys):
    base = {"--pipeline": "fastv", "--out": "/tmp/graphprune_test_never_written.png", "--model": "random:tiny"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    with pytest.raises(SystemExit):
        main(["visualize", *[x for kv in base.items() for x in kv]])
    assert message in capsys.readouterr().err
