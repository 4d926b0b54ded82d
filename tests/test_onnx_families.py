"""ONNX export + ONNX Runtime beyond LLaVA-1.5 (graphprune.targets.onnx), one shape bucket per
export: LLaVA-NeXT and LLaVA-OneVision images (vision.onnx = the model's own anyres encoding, crops,
packing, unpadding, image_newline, for images of the example's size), OneVision video-only prompts
(vision.onnx = get_video_features for videos of the example's shape), and Qwen2.5-VL, whose prefill
and decode graphs take 3-D M-RoPE positions while its vision encoder and get_rope_index stay on the
host in torch (its bucket: the example's patch grids).

One export per (family, pipeline), shared by the module: FastV on each family against eager
graphprune, the unpruned LLaVA-NeXT pipeline against Hugging Face itself. Parity on the ORT CPU
execution provider: prefill logits of the real tokens to 1e-4, identical kept tokens, 16 identical
greedy tokens, batch 2 with left padding (the traced example) and batch 1. vision.onnx is checked
directly against the model's get_image_features / get_video_features, and inputs outside the
bucket are refused naming it.
"""
import json

import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'graphprune[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'graphprune[onnx]')")

import onnxruntime  # noqa: E402
import torch  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.errors import InputError, PassConfigError, ShapeBucketWarning  # noqa: E402
from graphprune.targets.lint import check_static_onnx  # noqa: E402
from graphprune.targets.manifest import Manifest  # noqa: E402
from graphprune.targets.onnx import export_onnx  # noqa: E402
from graphprune.targets.ort import OrtPrunedModel  # noqa: E402
from graphprune.tools import family_zoo  # noqa: E402

STEPS = 16
EXPORTS = {"llava_next-fastv": ("llava_next", "fastv(layer=2, keep=9)", "image"),
           "llava_next-unpruned": ("llava_next", None, "image"),
           "llava_onevision-fastv": ("llava_onevision", "fastv(layer=2, keep=9)", "image"),
           "llava_onevision-video-fastv": ("llava_onevision", "fastv(layer=2, keep=9)", "video"),
           "qwen2_5_vl-fastv": ("qwen2_5_vl", "fastv(layer=2, keep=9)", "image")}
HOST_VISION = ("qwen2_5_vl",)
_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = family_zoo.build(family, layers=3)       # FastV at layer 2 of 3: cheaper exports
    return _MODELS[family]


def _examples(model, item):
    return {"batch2": family_zoo.example(model, batch=2, pad=(0, 3), items=(item,)).as_kwargs(),
            "batch1": family_zoo.example(model, batch=1, seed=1, items=(item,)).as_kwargs()}


# OneVision images export like LLaVA-NeXT's (its video export stays in the fast set): `-m slow`
@pytest.fixture(scope="module", params=[pytest.param(k, marks=[pytest.mark.slow] if k == "llava_onevision-fastv" else [])
                                        for k in EXPORTS])
def exported(request, tmp_path_factory):
    family, method, item = EXPORTS[request.param]
    model = _model(family)
    examples = _examples(model, item)
    pruned = gp.prune(model, method)
    out = tmp_path_factory.mktemp("onnx") / request.param
    # optimize=False: the onnxscript optimizer's pass costs a fifth of the export time; ONNX Runtime
    # optimizes the graphs when it loads them (test_onnx.py covers the optimized export)
    export_onnx(pruned, out, example=examples["batch2"], optimize=False)
    return request.param, model, examples, pruned, out, OrtPrunedModel(out, model=model if family in HOST_VISION
                                                                         else None)


def _reference(name, model, pruned, kw):
    """(kept prompt indices, logits, greedy ids): eager graphprune, or Hugging Face for the unpruned export."""
    if not name.endswith("unpruned"):
        ref = pruned(**kw)
        return ref.kept, ref.logits, pruned.generate(**kw, max_new_tokens=STEPS, eos_token_id=[])
    mask = kw["attention_mask"]
    with torch.no_grad():                  # generate()'s positions for left padding
        logits = model(**kw, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        ids = model.generate(**kw, max_new_tokens=STEPS, do_sample=False, eos_token_id=None, min_new_tokens=STEPS)
    return torch.arange(mask.shape[1]).expand_as(mask), logits, ids


@pytest.mark.parametrize("which", ["batch2", "batch1"])
def test_prefill_and_greedy_tokens_match(exported, which):
    name, model, examples, pruned, out, ort_model = exported
    kw = examples[which]
    kept, logits, ids = _reference(name, model, pruned, kw)
    got = ort_model(**kw)
    assert ort_model.provider == "CPUExecutionProvider"
    assert torch.equal(got.kept, kept)
    real = kw["attention_mask"].gather(1, kept) == 1
    torch.testing.assert_close(got.logits[real], logits[real], atol=1e-4, rtol=0)
    got_ids = ort_model.generate(**kw, max_new_tokens=STEPS, eos_token_id=[])
    assert torch.equal(got_ids[:, -STEPS:], ids[:, -STEPS:])


def test_vision_onnx_is_the_models_anyres_encoding(exported):
    """vision.onnx on one image of the bucket = the model's get_image_features (Hugging Face's own
    call), image_newline rows at the manifest's newline slots; the bucket is stated in the manifest."""
    name, model, examples, pruned, out, _ = exported
    if name.startswith(HOST_VISION) or "video" in name:
        pytest.skip("images only; its vision encoder runs on the host (Qwen)")
    kw = examples["batch2"]
    manifest = json.loads((out / "manifest.json").read_text())
    bucket = manifest["image_bucket"]
    assert bucket["image_size"] == kw["image_sizes"][0].tolist()
    assert bucket["pixel_values"] == [1, *kw["pixel_values"].shape[1:]]
    assert all(isinstance(d, int) for i in manifest["stages"]["vision"]["inputs"] for d in i["shape"])
    cfg = model.config
    with torch.no_grad():
        hf = model.model.get_image_features(kw["pixel_values"][1:], kw["image_sizes"][1:],
                                            vision_feature_layer=cfg.vision_feature_layer,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    hf = getattr(hf, "pooler_output", hf)
    hf = torch.cat(list(hf)) if isinstance(hf, (list, tuple)) else hf.reshape(-1, hf.shape[-1])
    session = onnxruntime.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"pixel_values": kw["pixel_values"][1:].numpy()})[0])
    torch.testing.assert_close(got, hf, atol=1e-5, rtol=0)
    newline = torch.zeros(hf.shape[0], dtype=torch.bool)
    newline[bucket["newline_slots"]] = True
    assert bucket["features_per_image"] == hf.shape[0] == int((kw["input_ids"][0] == cfg.image_token_id).sum())
    assert newline.any() and bool((got[newline] == model.model.image_newline).all())
    assert not (got[~newline] == model.model.image_newline).all(-1).any()
    assert check_static_onnx(out) == [str(out / f) for f in ("vision.onnx", "prefill.onnx", "decode.onnx")]


def test_images_outside_the_bucket_are_refused(exported):
    name, model, examples, pruned, out, ort_model = exported
    if name != "llava_next-fastv":
        pytest.skip("once")
    other = family_zoo.example(model, batch=1, image_size=(90, 50)).as_kwargs()
    with pytest.raises(InputError, match=r"image_sizes \[90, 50\] \(2 x 1 crops unpadded to .*\): this export holds "
                                         r"one shape bucket, images packed like 50x90"):
        ort_model(**other)
    kw = dict(examples["batch1"], pixel_values=examples["batch1"]["pixel_values"][:, :2])
    with pytest.raises(InputError, match=r"pixel_values \(1, 2, 3, 56, 56\): this export's shape bucket takes "
                                         r"images of 50x90 as \(images, 3, 3, 56, 56\)"):
        ort_model(**kw)


def test_images_packed_alike_share_the_export(exported):
    """The export's bucket is its example's packing (crop grid + unpadded patch grid), not its exact
    size: an image of (48, 90), packed like the example's (50, 90), runs through the same vision.onnx
    and matches eager graphprune on it (kept tokens, logits, 16 greedy tokens)."""
    name, model, examples, pruned, out, ort_model = exported
    if name != "llava_next-fastv":
        pytest.skip("once")
    family = pruned.family
    assert family.image_packing((48, 90)) == family.image_packing((50, 90))     # the premise
    kw = family_zoo.example(model, batch=1, image_size=(48, 90), seed=5).as_kwargs()
    kept, logits, ids = _reference(name, model, pruned, kw)
    got = ort_model(**kw)
    assert torch.equal(got.kept, kept)
    torch.testing.assert_close(got.logits, logits, atol=1e-4, rtol=0)
    assert torch.equal(ort_model.generate(**kw, max_new_tokens=STEPS, eos_token_id=[])[:, -STEPS:], ids[:, -STEPS:])


def test_export_needs_one_shape_bucket(tmp_path):
    model = _model("llava_next")
    examples = _examples(model, "image")
    pruned = gp.prune(model, "fastv(layer=2, keep=9)")
    mixed = dict(examples["batch2"], image_sizes=torch.tensor([[50, 90], [60, 90]]))
    with pytest.raises(InputError, match=r"image_sizes \[\[50, 90\], \[60, 90\]\] pack differently.*one shape bucket"):
        export_onnx(pruned, tmp_path / "out", example=mixed)
    with pytest.raises(InputError, match="give an example with pixel_values and image_sizes"):
        export_onnx(pruned, tmp_path / "out", example={k: v for k, v in examples["batch2"].items()
                                                       if k != "image_sizes"})
    onevision = _model("llava_onevision")
    both = family_zoo.example(onevision, batch=2, items=("image", "video"))
    with pytest.raises(InputError, match="holds images and videos.*of images or of videos"):
        export_onnx(gp.prune(onevision, "fastv(layer=2, keep=9)"), tmp_path / "out", example=both)
    assert list(tmp_path.iterdir()) == []


def test_manifest_bucket_is_validated(exported, tmp_path):
    name, model, examples, pruned, out, _ = exported
    if name != "llava_next-fastv":
        pytest.skip("once")
    manifest = json.loads((out / "manifest.json").read_text())
    for key, value, why in (("pixel_values", [2, 3, 3, 56, 56], "malformed"), ("newline_slots", [10 ** 6], "reach past"),
                            ("image_size", None, "missing key image_bucket.'image_size'"),
                            ("packing", dict(manifest["image_bucket"]["packing"], modeling_module="os"),
                             "packing.modeling_module is missing or malformed")):
        bucket = dict(manifest["image_bucket"], **{key: value})
        if value is None:
            del bucket[key]
        (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, image_bucket=bucket)))
        with pytest.raises(InputError, match=why):
            Manifest.load(tmp_path)


def test_qwen_exports_mrope_positions_and_needs_the_model(exported):
    """Qwen2.5-VL: no vision.onnx; prefill and decode take (3, batch, ...) M-RoPE positions; the
    runner needs the model (its vision encoder and get_rope_index) and refuses to run without it,
    and refuses patch grids outside the bucket."""
    name, model, examples, pruned, out, ort_model = exported
    if not name.startswith(HOST_VISION):
        pytest.skip("Qwen only")
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["stages"]) == ["decode", "prefill"] and "host_vision" in manifest
    shapes = {stage: {i["name"]: i["shape"] for i in manifest["stages"][stage]["inputs"]}
              for stage in ("prefill", "decode")}
    assert shapes["prefill"]["position_ids"] == [3, "batch", "seq"]
    assert shapes["decode"]["position_ids"] == [3, "batch", 1]
    assert check_static_onnx(out) == [str(out / f) for f in ("prefill.onnx", "decode.onnx")]
    assert manifest["grid_bucket"] == {"units_per_sample": 1, "tokens_per_unit": 16, "image_grid_thw": [[1, 8, 8]]}
    other = family_zoo.example(model, batch=1, grid=(4, 8)).as_kwargs()
    with pytest.raises(InputError, match=r"hold 8 tokens each.*one shape bucket, 16 tokens per unit"):
        ort_model(**other)
    with pytest.raises(InputError, match=r"run on the host in torch.*pass model= \(Qwen2_5_VLForConditionalGeneration"):
        OrtPrunedModel(out)
    with pytest.raises(InputError, match="model= is a LlavaNextForConditionalGeneration; this export is of a Qwen2_5"):
        OrtPrunedModel(out, model=_model("llava_next"))
    with pytest.warns(ShapeBucketWarning):       # a vision-stage pass: its encoder is captured per grid
        vision_pass = gp.prune(model, "vision_topk(keep=8)")
    with pytest.raises(PassConfigError, match=r"vision_topk\(keep=8.*keeps on the host in torch, unpruned"):
        export_onnx(vision_pass, out.parent / "vision_pass", example=examples["batch2"])
    assert not (out.parent / "vision_pass").exists()


def test_onevision_video_bucket(exported):
    """A video-only OneVision export: vision.onnx = the model's get_video_features for one video of
    the bucket's shape (pooled frames, then the image_newline closing the video); other frame
    counts and images are refused."""
    name, model, examples, pruned, out, ort_model = exported
    if name != "llava_onevision-video-fastv":
        pytest.skip("OneVision video only")
    kw = examples["batch2"]
    bucket = json.loads((out / "manifest.json").read_text())["video_bucket"]
    assert bucket["pixel_values_videos"] == [1, *kw["pixel_values_videos"].shape[1:]] and bucket["closing_newlines"] == 1
    cfg = model.config
    with torch.no_grad():
        hf = model.model.get_video_features(kw["pixel_values_videos"][1:], vision_feature_layer=cfg.vision_feature_layer,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    hf = getattr(hf, "pooler_output", hf)
    hf = hf.reshape(-1, hf.shape[-1])
    session = onnxruntime.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"pixel_values_videos": kw["pixel_values_videos"][1:].numpy()})[0])
    torch.testing.assert_close(got[:hf.shape[0]], hf, atol=1e-5, rtol=0)      # 4.x: the newline comes after
    assert bucket["features_per_video"] == got.shape[0] == int((kw["input_ids"][0] == cfg.video_token_id).sum())
    assert torch.equal(got[-1], model.model.image_newline)
    assert check_static_onnx(out) == [str(out / f) for f in ("vision.onnx", "prefill.onnx", "decode.onnx")]
    fewer = family_zoo.example(model, batch=1, items=("video",), frames=2).as_kwargs()
    with pytest.raises(InputError, match=r"pixel_values_videos \(1, 2, 3, 112, 112\): this export holds one shape "
                                         r"bucket, videos of \(videos, 4, 3, 112, 112\)"):
        ort_model(**fewer)
    with pytest.raises(InputError, match=r"unexpected inputs \['image_sizes', 'pixel_values'\]"):
        ort_model(**family_zoo.example(model, batch=1).as_kwargs())
