"""MustDrop's merge stage inside the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision encoder (issue 19): a token is a 2x2
merge group, tiles of the group grid never cross an attention window (Qwen2.5-VL; Qwen2-VL has none: its tiles
cover the whole group grid), a merged group is the mean of its tile's groups patch by patch at the tile's first
group, positions kept (M-RoPE), merged-away slots masked (static capacity).

Against tests/reference_vision_qwen_merge.py (the encoder run by hand from the model's own modules, tiles and the
merge written from the paper, the pruned prompt through the model's own forward): kept slots and which are masked,
prefill logits (fp32, atol 1e-5), 16 greedy tokens, on images and video frames, a left-padded batch of 2; the batch
equals each sample alone; bad options are refused before any work."""
import functools

import pytest
import reference_vision_qwen_merge as RMG
import torch
from checks import assert_batch_equals_samples, assert_same_run

import graphprune as gp
from graphprune.errors import PassConfigError, PassNotApplicable
from graphprune.passes.mustdrop import MustDropMerge, mustdrop
from graphprune.rewrite.blocks import grid_tile_table
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo

STEPS = 16
MERGE = "mustdrop_merge(layer={layer}, window={window}, tau={tau!r}, order='raster', positions='keep')"
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


@functools.lru_cache(maxsize=1)
def _built(family):
    # Qwen2.5-VL's ViT as in test_vision_qwen_methods: blocks 0, 1 windowed (2 x 2 groups), block 2 full
    vision = dict(depth=3, fullatt_block_indexes=[2]) if family == "qwen2_5_vl" else None
    model = family_zoo.build(family, **({"vision": vision} if vision else {}))
    return model, Program.capture(model, stages=("vision", "prefill", "decode"))


def _tau(model, ex, layer, window):
    """A threshold between the two middle tile scores: some tiles merge, some do not."""
    scores = sorted(RMG.all_tile_scores(model, ex, layer, window))
    mid = len(scores) // 2
    return round((scores[mid - 1] + scores[mid]) / 2, 6)


@pytest.mark.parametrize("rows,cols,window,windows", [
    (4, 4, 3, None),                                                     # Qwen3-VL: one window
    (5, 7, 3, [(r // 4) * 2 + c // 4 for r in range(5) for c in range(7)]),   # oblong, 4 x 4 windows cut at the edge
    (6, 6, 2, [(r // 3) * 2 + c // 3 for r in range(6) for c in range(6)]),   # tiles of 2 in windows of 3
])
def test_tile_table_matches_reference(rows, cols, window, windows):
    """The tile table graphprune merges over: the same tiles (as sets of groups) as the reference's."""
    tile_of, place_of, tiles = grid_tile_table(rows, cols, window, windows)
    got = sorted([t for t in range(rows * cols) if tile_of[t] == i] for i in range(tiles))
    assert got == RMG.window_tiles(rows, cols, window, windows or [0] * (rows * cols))
    for i in range(tiles):        # places: raster order within each tile
        members = [t for t in range(rows * cols) if tile_of[t] == i]
        assert [place_of[t] for t in members] == sorted(place_of[t] for t in members)


@pytest.mark.slow
@pytest.mark.parametrize("family,layer,window,grid", [
    ("qwen2_5_vl", 1, 3, (8, 8)),    # after block 0 (the paper's place); tiles of 3 cut to block 1's 2 x 2 windows
    ("qwen2_5_vl", 1, 2, (8, 12)),   # an oblong 4 x 6 group grid
    ("qwen3_vl", 1, 3, (8, 8)),      # between the DeepStack taps of blocks 0 (own rows) and 1 (merged states)
    ("qwen3_vl", 2, 2, (8, 12)),     # after both taps; oblong
    ("qwen2_5_vl", None, 2, (8, 8)),  # at the features (layer=None): the groups entering the merger's MLP
    ("qwen3_vl", None, 3, (8, 8)),
    ("qwen2_vl", 1, 3, (8, 8)),      # Qwen2-VL: no attention windows, tiles of the whole group grid
    ("qwen2_vl", None, 2, (8, 12)),  # at the features, oblong
], ids=["qwen2_5_vl-1-3", "qwen2_5_vl-1-2-oblong", "qwen3_vl-1-3", "qwen3_vl-2-2-oblong", "qwen2_5_vl-features",
        "qwen3_vl-features", "qwen2_vl-1-3", "qwen2_vl-features-oblong"])
def test_merge_matches_reference(family, layer, window, grid):
    model, program = _built(family)
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=46, grid=grid)
    at = model.config.vision_config.depth if layer is None else layer      # the reference's block index
    tau = _tau(model, ex, at, window)
    ref = RMG.mustdrop_merge(model, ex, at, window, tau, STEPS)
    if family == "qwen2_5_vl" and window == 3:                            # the windows matter
        assert not torch.equal(ref["survive"], RMG.mustdrop_merge(model, ex, at, window, tau, 1, False)["survive"])
    out = assert_same_run(gp.prune(model, MERGE.format(layer=layer, window=window, tau=tau), program=program), ex,
                          ref, STEPS, kept=ref["keep"])
    assert torch.equal(out.cache[-1].mask.bool(), ref["survive"] & ex.attention_mask.bool())
    assert not bool(ref["survive"][ex.attention_mask.bool()].all())     # some tiles merged


@pytest.mark.slow
def test_merge_batch_equals_alone():
    model, program = _built("qwen2_5_vl")
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image", "video"), seed=47)
    tau = _tau(model, ex, 1, 2)
    assert_batch_equals_samples(gp.prune(model, MERGE.format(layer=1, window=2, tau=tau), program=program), ex, STEPS)


def test_keep_positions_need_raster_order():
    """positions='keep' leaves each kept token at its slot: the authors' order (merged tokens first) is refused."""
    with pytest.raises(PassConfigError, match="order='raster'"):
        MustDropMerge(layer=1, positions="keep")
    assert mustdrop(keep=64, keys=False, merge_positions="keep")[0].config.order == "raster"


@pytest.mark.slow
@pytest.mark.parametrize("spec,error,words", [
    ("mustdrop_merge(layer=1)", PassNotApplicable, ["M-RoPE", "order='raster'"]),
    ("mustdrop(keep=8, layers=(1, 2), gamma=0.01, alpha=0.05, positions='keep', merge_positions='keep')",
     PassNotApplicable,
     ["mustdrop_keys", "CLS", "mustdrop(keys=False)"]),
    ("mustdrop_merge(layer=1, window=5, order='raster', positions='keep')", PassConfigError, ["window=5", "4x4"]),
    ("mustdrop_merge(layer=1, capacity=16, order='raster', positions='keep')", PassConfigError,
     ["capacity=16", "capacity=None"]),
])
def test_bad_options_refused_before_work(spec, error, words):
    model, program = _built("qwen2_5_vl")
    with pytest.raises(error) as err:
        gp.prune(model, spec, program=program)(**family_zoo.example(model, items=("image",)).as_kwargs())
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen2_vl"])
def test_mustdrop_pipeline_matches_reference(family):
    """mustdrop(keys=False, positions='keep', merge_positions='keep') (no CLS, so no key set): the merge after block 0,
    the dual-attention filters at LLM layers 1 and 2 (static capacity 4 per unit; the merged-away slots stay
    masked) and the output-aware cache over layers 1..2, against the merge reference then the filter run by hand
    (reference_mustdrop.filter_select in reference.lm_generate; Qwen3-VL: with the merge's DeepStack rows)."""
    import reference as R
    import reference_families as RF
    import reference_mustdrop as RM
    model, program = _built(family)
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=46)
    tau = _tau(model, ex, 1, 3)
    merged = RMG.mustdrop_merge(model, ex, 1, 3, tau, 1)
    emb, am, pos, vm = RF.family_inputs(model, ex)
    sel = RM.filter_select(1 / 16, 1.0, "static", 4, images=RF.units_of(model, ex))
    ref = R.lm_generate(model, merged["embeds"], am * merged["survive"], pos, selects={2: sel, 3: sel},
                        cut_to_final=(1, 3), vision_mask=vm, max_new_tokens=STEPS, deepstack=merged["deepstack"],
                        text_mask=RF.instruction_mask(model, ex))
    spec = (f"mustdrop(keep=4, keys=False, positions='keep', merge_positions='keep', layers=(1, 2), gamma=0.0625, "
            f"alpha=1.0, tau={tau!r})")
    out = assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])
    for i, c in enumerate(out.cache):
        assert torch.equal(c.mask.bool(), ref["kv_valid"][i]), f"layer {i} cache validity"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_exact_mode_drops_merged_slots(family):
    """mode='exact': the merged-away slots leave the prompt (no masked slots). tau=-1 merges every tile, so every
    unit keeps one token per tile and the batch has one count (exact mode needs that)."""
    import reference_vision_qwen as RQ
    model, program = _built(family)
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=46)
    merged = RMG.mustdrop_merge(model, ex, 1, 2, -1.0, 1)
    keep = torch.stack([row.nonzero()[:, 0] for row in merged["survive"]])
    embeds = merged["embeds"].gather(1, keep[..., None].expand(-1, -1, merged["embeds"].shape[-1]))
    ref = RQ.hf_generate(model, ex, keep, STEPS, embeds, prompt_rows=merged["deepstack"])
    spec = "mustdrop_merge(layer=1, window=2, tau=-1.0, mode='exact', order='raster', positions='keep')"
    out = assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=keep)
    assert bool(out.cache[-1].mask.bool().eq(ex.attention_mask.bool().gather(1, keep)).all())    # nothing masked
