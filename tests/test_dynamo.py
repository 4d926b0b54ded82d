"""The torch.compile backend (graphprune.targets.dynamo), against eager graphprune.

`torch.compile(model, backend="graphprune", options={"pipeline": ...})` on tiny LLaVA-1.5, whose
forward dynamo splits at the `.item()` of the image-token check: the logits of the kept tokens
equal eager `graphprune.prune` (exactly with compiler="eager", to 1e-4 through CPU Inductor), the
rewritten graph holds the selection, a second call with the same shapes compiles nothing, Hugging
Face's generate() over the compiled forward decodes the same greedy tokens through the shrunk
caches, and what the backend cannot do (a merge no decoder frame takes, static-capacity decode, bad
options) fails loudly. The LLaVA-NeXT family's frame layouts (anyres images, image_newline slots,
video frames) equal gp.prune's; every family's compiled runs: tests/test_dynamo_families.py.
"""
import subprocess
import sys
import warnings

import pytest
import torch
from torch import fx

import graphprune as gp
from graphprune import tokenops
from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.targets.dynamo import BackendOptions, graphprune_backend, pruned_graphs
from graphprune.tools import zoo


@pytest.fixture(scope="module")
def model():
    return zoo.tiny_llava()


@pytest.fixture(scope="module")
def batch(model):
    return zoo.llava_example(model, batch=2).as_kwargs()


def _compiled(model, pipeline, compiler="eager", **extra):
    torch._dynamo.reset()
    return torch.compile(model, backend="graphprune", options={"pipeline": pipeline, "compiler": compiler, **extra})


def _selects(gm: fx.GraphModule, fn) -> bool:
    return any(n.target is fn for n in gm.graph.nodes)


@pytest.mark.parametrize("pipeline", ["fastv(layer=2, keep=8)",
                                      pytest.param("dart(layer=2, keep=8)", marks=pytest.mark.slow),
                                      pytest.param("vtw(layer=2)", marks=pytest.mark.slow),
                                      pytest.param("random(layer=1, keep=0.5, seed=3)", marks=pytest.mark.slow)])
def test_eager_compiler_matches_graphprune(model, batch, pipeline):
    want = gp.prune(model, pipeline)(**batch)
    with torch.no_grad():
        got = _compiled(model, pipeline)(**batch)
    assert got.logits.shape == want.logits.shape            # the kept tokens only
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    # Hugging Face's cache holds, per layer, what that layer kept
    lengths = [layer.keys.shape[2] for layer in got.past_key_values.layers]
    assert lengths == want.cache.lengths()


def test_inductor_matches_eager_and_does_not_recompile(batch):
    model = zoo.tiny_llava()            # its own instance: pruned_graphs() lists what was built for it
    pipeline = "fastv(layer=2, keep=8)"
    want = gp.prune(model, pipeline)(**batch).logits
    compiled = _compiled(model, pipeline, compiler="inductor")
    with torch.no_grad():
        got = compiled(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    graphs = pruned_graphs(model)
    assert len(graphs) == 1 and _selects(graphs[0], tokenops.select_topk)
    frames = dict(torch._dynamo.utils.counters["frames"])
    with torch.no_grad():
        again = compiled(**batch).logits
    assert dict(torch._dynamo.utils.counters["frames"]) == frames, "same shapes must not recompile"
    assert len(pruned_graphs(model)) == 1
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_hf_generate_over_compiled_forward_decodes_like_graphprune(model):
    kw = zoo.llava_example(model, batch=1, seed=2).as_kwargs()
    pipeline = "fastv(layer=2, keep=8)"
    want = gp.prune(model, pipeline).generate(**kw, max_new_tokens=10)[:, kw["input_ids"].shape[1]:]
    torch._dynamo.reset()
    forward = model.forward
    try:
        model.forward = torch.compile(forward, backend="graphprune", options={"pipeline": pipeline, "compiler": "eager"})
        with torch.no_grad():
            ids = model.generate(**kw, max_new_tokens=10, do_sample=False)[:, kw["input_ids"].shape[1]:]
    finally:
        model.forward = forward
    assert torch.equal(ids, want)


def test_backend_is_found_by_name_without_importing_graphprune():
    code = ("import sys, torch\nfrom torch._dynamo.backends.registry import lookup_backend\n"
            "assert 'graphprune' not in sys.modules\nfn = lookup_backend('graphprune')\n"
            "print(fn.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "graphprune.targets.dynamo"


@pytest.mark.parametrize("options, match", [
    (None, "needs options"),
    ({"pipline": "fastv"}, "needs options"),
    ({"pipeline": "fastv", "mode": "x"}, "unknown graphprune backend option"),
    ({"pipeline": "fastv", "compiler": "tvm"}, "compiler must be"),
    ({"pipeline": "fastv", "if_not_applied": "ignore"}, "if_not_applied"),
    ({"pipeline": "fasttv(keep=3)"}, "fasttv"),
    ({"pipeline": "cls_topk(keep=8)"}, "vision-stage pass"),
    ({"pipeline": "mustdrop_filter(layers=(1,), gamma=0.1, alpha=0.1, mode='exact')"}, "mode='exact'"),
    ({"pipeline": []}, "empty"),
    ({"pipeline": "fastv", "video_unit": "clip"}, 'video_unit must be "frame" or "video", got \'clip\''),
    ({"pipeline": "evs(rate=0.5)", "video_unit": "frame"}, 'give video_unit="video"'),
])
def test_bad_options_fail_before_work(options, match):
    with pytest.raises(PassConfigError, match=match):
        BackendOptions.parse(options)


def test_bad_options_surface_through_torch_compile(model, batch):
    with pytest.raises(Exception, match="vision-stage pass"):
        with torch.no_grad():
            _compiled(model, "cls_topk(keep=8)")(**batch)


def _split_merge_frame() -> fx.GraphModule:
    # what dynamo would hand over if a graph break separated the image merge from the decoder layers
    class Merge(torch.nn.Module):
        def forward(self, embeds, mask, feats):
            return embeds.masked_scatter(mask, feats)
    return fx.symbolic_trace(Merge())


def test_split_merge_is_taken_only_by_the_decoder_frame_its_tensor_reaches(model):
    """A merge in a frame of its own (Qwen2-VL's) runs as captured and records the very tensor it
    returns; a decoder frame of the same model whose inputs_embeds is not that tensor (the embeddings
    changed on the way) is a prefill the backend did not see merged: it raises, or warns and runs
    unpruned. Without a module behind it (a resumed function), a split merge is refused at once."""
    from graphprune.targets.dynamo import _PENDING, DecodeFrame, MergeFrame
    gm = _split_merge_frame()
    ex = [torch.zeros(1, 4, 2), torch.tensor([[0, 1, 1, 0]]).bool()[..., None].expand(1, 4, 2), torch.ones(4)]
    options = {"pipeline": "fastv(layer=1, keep=2)", "compiler": "eager"}
    with pytest.raises(PassNotApplicable, match="graph break separates the image-feature merge"):
        graphprune_backend(gm, ex, options=options)                # a bare graph: no module
    fn = MergeFrame(model.model, gm.forward, {"embeds": 0, "mask": 1, "features": 2}, None, "image")
    merged = fn(*ex)
    assert torch.equal(merged, ex[0].masked_scatter(ex[1], ex[2]))        # ran as captured
    lm = model.model.language_model
    assert _PENDING.take(merged.clone(), lm) is None                # equal is not enough: the same tensor
    fn(*ex)
    assert _PENDING.take(merged, torch.nn.Linear(1, 1)) == []        # another model's: left by a failed run
    merged = fn(*ex)
    (modality, mask, features), = _PENDING.take(merged, lm)          # what the decoder frame lays out
    assert modality == "image" and torch.equal(mask, ex[1][..., 0]) and torch.equal(features, ex[2].reshape(2, 2))
    for mode in ("raise", "warn"):
        opts = BackendOptions.parse({**options, "if_not_applied": mode})
        decoder = DecodeFrame(model.model, lambda *args: "unpruned", {"embeds": 0}, opts, None, set())
        merged = fn(*ex)
        if mode == "raise":
            with pytest.raises(PassNotApplicable, match="without the masked_scatter merge"):
                decoder(merged.clone())
        else:
            with pytest.warns(UserWarning, match="would run unpruned"):
                assert decoder(merged.clone()) == "unpruned"
    assert _PENDING.take(merged, lm) == []             # reported: nothing left pending


def test_static_capacity_decode_is_refused(model):
    kw = zoo.llava_example(model, batch=1, seed=2).as_kwargs()
    pipeline = "mustdrop_filter(layers=(1, 2), gamma=0.01, alpha=0.02, capacity=24)"
    want = gp.prune(model, pipeline)(**kw).logits
    torch._dynamo.reset()
    forward = model.forward
    try:
        model.forward = torch.compile(forward, backend="graphprune", options={"pipeline": pipeline, "compiler": "eager"})
        with torch.no_grad():
            torch.testing.assert_close(model(**kw).logits, want, atol=1e-5, rtol=0)     # prefill is exact
            with pytest.raises(Exception, match="static-capacity"):
                model.generate(**kw, max_new_tokens=3, do_sample=False)
    finally:
        model.forward = forward


def test_padded_batch_prefills_exactly_and_warns_that_hf_decode_cannot():
    """A padded prefill is pruned exactly (with a warning); Hugging Face's decode step after it is refused
    with an InputError, not the TorchRuntimeError of dynamo's fake-tensor pass on the mask / cache
    mismatch, while unpadded prompts of the same model still decode through the compiled forward.
    A caller's own decode loop passes an all-ones 2-D mask, one column per prompt token and token so
    far (as older transformers' generate does), longer than the pruned caches: each step is one
    compiled frame, no graph break (the padding check is an op in it), with gp.prune's logits; a
    padded mask is refused there too. A model of its own: the backend's decode checks read every
    pipeline compiled for a model."""
    model = zoo.tiny_llava()
    kw = zoo.llava_example(model, batch=2, pad=(0, 3)).as_kwargs()
    plain = zoo.llava_example(model, batch=2, seed=5).as_kwargs()
    n = plain["input_ids"].shape[1]
    pipeline = "fastv(layer=2, keep=8)"
    pruned = gp.prune(model, pipeline)
    forward = model.forward
    try:
        model.forward = _compiled(forward, pipeline)
        with torch.no_grad():
            with pytest.warns(UserWarning, match="padded batch"):
                torch.testing.assert_close(model(**kw).logits, pruned(**kw).logits, atol=1e-5, rtol=0)
            with pytest.warns(UserWarning, match="padded batch"), pytest.raises(InputError, match="padded batch"):
                model.generate(**kw, max_new_tokens=3, do_sample=False)
            model.forward = _compiled(forward, pipeline)          # a fresh compile (HF's shared wrappers count)
            got = model.generate(**plain, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None,
                                 return_dict_in_generate=True)
            want = pruned.generate(**plain, max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True)
            assert torch.equal(got.sequences[:, n:], want.sequences[:, n:])
            ids, hf_cache, our_cache = got.sequences, got.past_key_values, want.past_key_values
            for _ in range(2):                  # a caller's own loop: all-ones 2-D masks
                mask = torch.ones_like(ids)
                torch._dynamo.utils.counters.clear()
                with torch.profiler.profile() as prof:
                    step = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=hf_cache)
                assert not torch._dynamo.utils.counters["graph_break"]
                regions = [e.name for e in prof.events() if e.name.startswith("Torch-Compiled Region")]
                assert len(regions) == 1, regions           # the whole step in one compiled frame
                ref = pruned(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=our_cache)
                torch.testing.assert_close(step.logits[:, -1], ref.logits[:, -1], atol=1e-5, rtol=0)
                ids = torch.cat([ids, ref.logits[:, -1:].argmax(-1)], 1)
                hf_cache, our_cache = step.past_key_values, ref.cache
            with pytest.raises(InputError, match="padded batch"):
                model(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0),
                      past_key_values=hf_cache)
    finally:
        model.forward = forward


@pytest.mark.parametrize("padded", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_prefill_runs_mask_free_where_the_prompt_is_plain_causal(padded):
    """As graphprune.prune lowers it, the backend's prefill attends mask-free (is_causal=True) when
    the prompt is plain causal; the mask's values pick, per call, between two compiled graphs: a
    batch-1 prompt runs the mask-free one, a left-padded batch the masked one; logits as gp.prune's."""
    import torch.nn.functional as F

    from graphprune.families import family_of
    from graphprune.targets.dynamo import _PROGRAMS
    model = zoo.tiny_llava()            # its own instance: one rewritten program to look at
    kw = zoo.llava_example(model, batch=2 if padded else 1, pad=(0, 3) if padded else (), seed=4).as_kwargs()
    pipeline = "fastv(layer=2, keep=8)"
    want = gp.prune(model, pipeline)(**kw).logits
    compiled = _compiled(model, pipeline)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "padded batch")
        with torch.no_grad():
            compiled(**kw)                  # builds the rewritten prefill
        (rewritten,) = _PROGRAMS[family_of(model).language_model()].values()
        choice = rewritten.fn.call
        sdpa = [n for n in choice.plain.graph.nodes if n.target is F.scaled_dot_product_attention]
        assert len(sdpa) == 4 and all(n.kwargs["is_causal"] and len(n.args) == 3 for n in sdpa)
        ran = []
        for name in ("plain", "masked"):
            getattr(choice, name).register_forward_pre_hook(lambda *_, name=name: ran.append(name))
        with torch.no_grad():
            got = compiled(**kw).logits
    assert ran == ["masked" if padded else "plain"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow        # recompiles only cost time; the fast set keeps test_inductor_..._does_not_recompile
def test_new_shapes_reuse_the_dynamic_rewrite(model):
    """dynamo recompiles its frames for the first new shapes (then traces them dynamically); the
    rewritten prefill is captured once with dynamic batch and sequence and serves them all."""
    pipeline = "fastv(layer=2, keep=8)"
    pruned = gp.prune(model, pipeline)
    fresh = zoo.tiny_llava()
    torch._dynamo.reset()
    compiled = torch.compile(fresh, backend="graphprune", options={"pipeline": pipeline, "compiler": "eager"})
    shapes = [dict(batch=2), dict(batch=1, suffix=4, seed=1), dict(batch=3, suffix=9, seed=2),
              dict(batch=1, suffix=6, seed=3), dict(batch=2, suffix=3, seed=4)]
    frames, frames_before = [], torch._dynamo.utils.counters["frames"]["total"]
    for sh in shapes:
        kw = zoo.llava_example(fresh, **sh).as_kwargs()
        with torch.no_grad():
            got = compiled(**kw).logits
        torch.testing.assert_close(got, pruned(**kw).logits, atol=1e-5, rtol=0)
        frames.append(torch._dynamo.utils.counters["frames"]["total"])
    first = frames[0] - frames_before
    assert frames[-1] - frames_before <= 3 * first, f"frames compiled after each call: {frames}"
    with torch.no_grad():
        compiled(**kw)                               # the last shape again: nothing to compile
    assert torch._dynamo.utils.counters["frames"]["total"] == frames[-1]
    assert len(pruned_graphs(fresh)) == 1


def test_image_merge_by_another_op_is_refused_not_run_unpruned(monkeypatch):
    """A model that writes image features into the prompt with something other than masked_scatter
    (here torch.where over the scattered features) gives the backend a decoder frame with image
    inputs and no merge it knows: that must fail loudly, or warn and run unpruned with
    if_not_applied="warn", never pass for a decode step."""
    def where_merge(self, mask, source):
        mask = mask.expand_as(self)
        flat = torch.zeros_like(self).reshape(-1)
        flat[mask.reshape(-1).nonzero().flatten()] = source.reshape(-1)[:int(mask.sum())].to(self.dtype)
        return torch.where(mask, flat.view_as(self), self)

    model = zoo.tiny_llava()            # its own instance: no pipeline built for it by earlier tests
    batch = zoo.llava_example(model, batch=2).as_kwargs()
    want = model(**batch).logits
    monkeypatch.setattr(torch.Tensor, "masked_scatter", where_merge)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want)          # the same model, merged another way
        with pytest.raises(PassNotApplicable, match="without the masked_scatter merge"):
            _compiled(model, "fastv(layer=2, keep=8)")(**batch)
        with pytest.warns(UserWarning, match="without the masked_scatter merge"):
            got = _compiled(model, "fastv(layer=2, keep=8)", if_not_applied="warn")(**batch)
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)     # unpruned, as the warning says


def test_unknown_family_is_unsupported_not_a_graph_break():
    model = zoo.tiny_llava()
    model.config.model_type = "my_vlm"           # a family graphprune does not read
    kw = zoo.llava_example(model).as_kwargs()
    with pytest.raises(Exception, match="unsupported family: .*'my_vlm' is not a family"):
        with torch.no_grad():
            _compiled(model, "fastv(layer=2, keep=8)")(**kw)


# -- anyres families: image_newline slots told from the merged features -------------------------
ANYRES = ("llava_next", "llava_onevision")


@pytest.fixture(scope="module")
def anyres():
    from graphprune.tools import family_zoo
    return {f: family_zoo.build(f) for f in ANYRES}


def _anyres_example(model, **kw):
    from graphprune.tools import family_zoo
    return family_zoo.example(model, **kw).as_kwargs()


@pytest.mark.parametrize("family", ANYRES + ("llava_next_video",))
def test_anyres_frame_layout_is_prunes_layout(anyres, family):
    """What the backend reads from the merge frame (placeholder mask + merged features) is the layout
    graphprune.prune reads from image_sizes / pixel_values_videos: the same units (images; video
    frames), patch positions and newline slots."""
    from graphprune.families import family_of
    from graphprune.tools import family_zoo
    model = anyres[family] if family in anyres else family_zoo.build(family)
    fam = family_of(model)
    for modality in ("image",) if family == "llava_next" else ("image", "video"):
        kw = _anyres_example(model, batch=2, items=(modality, modality), seed=1)
        want = fam.vision_layout(**kw)
        with torch.no_grad():
            merged = fam.merged_embeds(**kw)
        token = fam.image_token_id() if modality == "image" else fam.video_token_id()
        is_vision = kw["input_ids"] == token
        got = fam.frame_layout([(modality, is_vision, merged[is_vision])])
        assert got.units == want.units and torch.equal(got.pos, want.pos)
        assert torch.equal(got.separators, want.separators)
        newlines = modality == "image" or family == "llava_onevision"     # NeXT-Video's videos have none
        assert bool(want.separators.any()) == newlines
    if family == "llava_next":         # the patch slots, against the independent reference
        import reference_families as RF

        from graphprune.tools import family_zoo
        ex = family_zoo.example(model, batch=2, items=("image", "image"), seed=1)
        patches = torch.zeros_like(ex.input_ids, dtype=torch.bool).scatter(1, got.pos.reshape(2, -1), True)
        assert torch.equal(patches, RF._llava_next_prunable(model, ex))


@pytest.mark.slow
def test_next_video_video_prompt_compiled_equals_prune():
    """LLaVA-NeXT-Video's videos (no closing slot: a video is a run, a unit each pooled frame):
    logits, cache lengths and HF greedy decoding over the compiled forward equal gp.prune's."""
    from graphprune.tools import family_zoo
    model = family_zoo.build("llava_next_video")
    kw = _anyres_example(model, batch=2, items=("video",))
    pipeline = "fastv(layer=2, keep=2)"
    pruned = gp.prune(model, pipeline)
    want = pruned(**kw)
    torch._dynamo.reset()
    forward = model.forward
    try:
        model.forward = torch.compile(forward, backend="graphprune", options={"pipeline": pipeline, "compiler": "eager"})
        with torch.no_grad():
            got = model(**kw)
            n = kw["input_ids"].shape[1]
            ids = model.generate(**kw, max_new_tokens=12, do_sample=False)[:, n:]
    finally:
        model.forward = forward
    assert got.logits.shape == want.logits.shape
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert [layer.keys.shape[2] for layer in got.past_key_values.layers] == want.cache.lengths()
    assert torch.equal(ids, pruned.generate(**kw, max_new_tokens=12)[:, n:])


def test_adjacent_anyres_images_are_refused(anyres):
    """Two images with no text between them make one run of image tokens; without image_sizes the
    frame cannot split it, so it is refused rather than pruned as one image."""
    from graphprune.families import family_of
    model = anyres["llava_next"]
    kw = _anyres_example(model, items=("image", "image"))
    fam = family_of(model)
    ids = kw["input_ids"]
    is_image = ids == fam.image_token_id()
    at = is_image[0].nonzero()[:, 0]
    gap = at[1:][at[1:] - at[:-1] > 1][0]           # the first token of the second image
    glued = torch.cat([ids[:, :at[0]], ids[:, at], ids[:, gap + int(is_image[0, gap:].sum()):]], 1)
    with torch.no_grad():
        merged = fam.merged_embeds(glued, pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"])
    is_image = glued == fam.image_token_id()
    with pytest.raises(gp.InputError, match="not exactly one LLaVA-NeXT image"):
        fam.frame_layout([("image", is_image, merged[is_image])])
