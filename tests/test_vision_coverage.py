"""Vision-stage cells of docs/vision_stage_matrix.md that no other file checks against a reference: vision_topk
(score='norm') on LLaVA-NeXT, LLaVA-OneVision (images, videos per frame and per video), Qwen2.5-VL and Qwen3-VL
(images and video frames); VisPruner on LLaVA-NeXT (CLS importance) and LLaVA-OneVision (attention received) anyres
images and on Qwen3-VL; ToMe in place on Qwen3-VL (DeepStack); DivPrune / CDPruner (at LLM layer 0) on LLaVA-NeXT,
LLaVA-OneVision and Qwen3-VL; random and the whole-video attention on the anyres families; a left-padded batch of 2
equals each sample alone on LLaVA-OneVision's vision stage.

Against tests/reference_vision_coverage.py (independent: projected norms from the model's own features, VisPruner's
rule on the feature layer's attention written by hand): kept tokens, prefill logits (fp32, atol 1e-5) and 16 greedy
tokens. vision_topk(score='norm') reads only the projected tokens, so alone it runs at LLM layer 0 on the eager
encoder's output; after an encoder pass it runs in the captured vision stage: both are checked. The fast set keeps
one case per capability (the norm and VisPruner on LLaVA-NeXT's anyres images); the rest is marked slow."""
import pytest
import reference as R
import reference_families as RF
import reference_new_methods as N
import reference_vision_coverage as RC
import reference_vision_llava_next as RN
import reference_vision_qwen as RQ
import reference_vision_qwen_methods as RM
import torch
from checks import assert_batch_equals_samples, assert_same_run
from reference_families import family_inputs
from test_families import _model

import graphprune as gp
from graphprune.errors import PassNotApplicable
from graphprune.tools import family_zoo

STEPS = 16
NORM = "vision_topk(keep={keep}, score='norm')"
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


def _anyres_example(model, items=("image", "image"), seed=60, **kw):
    return family_zoo.example(model, batch=2, pad=(0, 2), items=items, image_size=(50, 90), seed=seed, **kw)


# ------------------------------------------------------------------- vision_topk(score='norm'), anyres families

@pytest.mark.parametrize("family,items,unit,keep", [
    ("llava_next", ("image", "image"), "frame", 6),
    pytest.param("llava_onevision", ("image", "image"), "frame", 7, marks=pytest.mark.slow),
    pytest.param("llava_onevision", ("video",), "frame", 5, marks=pytest.mark.slow),   # keep counts per frame
    pytest.param("llava_onevision", ("video",), "video", 9, marks=pytest.mark.slow),   # or over the whole video
])
def test_norm_topk_on_anyres_matches_reference(family, items, unit, keep):
    model, program = _model(family)
    ex = _anyres_example(model, items, frames=3)
    chosen = RC.norm_picks_anyres(model, ex, keep, video_unit=unit)
    ref = RN.generate(model, ex, chosen, STEPS, "keep", video_unit=unit)
    pruned = gp.prune(model, NORM.format(keep=keep), program=program, video_unit=unit)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
def test_norm_topk_in_the_captured_vision_stage_on_llava_next():
    """After an encoder pass the norm runs inside the captured vision stage (no longer at LLM layer 0): the norms
    of cls_topk's 12 kept tokens pick 6, the LLM sees them compactly numbered."""
    model, program = _model("llava_next")
    ex = _anyres_example(model, seed=61)
    first = RN.picks(model, ex, 12, "cls")
    emb = family_inputs(model, ex)[0]
    chosen = [[top[emb[i, blk[top]].norm(dim=-1).topk(6).indices].sort().values for blk, top in zip(row, first[i])]
              for i, row in enumerate(RN.units(model, ex))]
    ref = RN.generate(model, ex, chosen, STEPS, "compact")
    pruned = gp.prune(model, "cls_topk(keep=12) | " + NORM.format(keep=6)[:-1] + ", positions='compact')",
                      program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.parametrize("family,spec,how,keep,items,unit", [
    pytest.param("llava_next", "random(stage='vision', keep=7, seed=3)", "random", 7, ("image", "image"), "frame",
                 marks=pytest.mark.slow),
    pytest.param("llava_onevision", "vision_topk(keep=9)", "received", 9, ("video",), "video", marks=pytest.mark.slow),
    pytest.param("llava_onevision", "random(stage='vision', keep=5, seed=3)", "random", 5, ("video",), "frame",
                 marks=pytest.mark.slow),
])
def test_encoder_rules_on_anyres_match_reference(family, spec, how, keep, items, unit):
    """The cells tests/test_vision_llava_next.py leaves out: random on LLaVA-NeXT's anyres images, the attention
    received over a whole OneVision video, random per OneVision video frame (reference_vision_llava_next.picks)."""
    model, program = _model(family)
    ex = _anyres_example(model, items, frames=3, seed=67)
    chosen = RN.picks(model, ex, keep, how, seed=3, video_unit=unit)
    ref = RN.generate(model, ex, chosen, STEPS, "keep", video_unit=unit)
    assert_same_run(gp.prune(model, spec, program=program, video_unit=unit), ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
def test_vispruner_refused_on_onevision_video():
    """A pooled OneVision video token (2 x 2 encoder patches pooled after the projector) has no hidden state for
    VisPruner's diversity: refused before the prefill, naming why."""
    model, program = _model("llava_onevision")
    ex = family_zoo.example(model, batch=1, items=("video",), frames=2, seed=41)
    pruned = gp.prune(model, "vispruner(keep=6, important='attention')", program=program)
    with pytest.raises(PassNotApplicable, match="vispruner.*pooled from 4 encoder patches.*no pooled token a hidden state"):
        pruned(**ex.as_kwargs())


@pytest.mark.slow
def test_visionzip_attention_on_llava_next_matches_reference():
    """VisionZip's CLS-free dominance on a tower with CLS (LLaVA-NeXT's CLIP: CLS among the queries, not the tokens
    ranked), anyres images, the authors' compact sequence."""
    model, program = _model("llava_next")
    ex = _anyres_example(model, seed=70)
    chosen, values = RN.visionzip(model, ex, keep=8, contextual=3, dominant="received")
    ref = RN.generate(model, ex, chosen, STEPS, "compact", values)
    pruned = gp.prune(model, "visionzip(keep=8, contextual=3, dominant='attention')", program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


# ------------------------------------------------------------------------------------------ Qwen families

@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_norm_topk_on_qwen_matches_reference(family):
    """Units: the image and each of the video's 2 frames; kept tokens keep their M-RoPE positions (and on
    Qwen3-VL their DeepStack rows)."""
    model, program = _model(family)
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=62)
    kept = RC.norm_kept_qwen(model, ex, 6)
    ref = RQ.hf_generate(model, ex, kept, STEPS)
    assert_same_run(gp.prune(model, NORM.format(keep=6), program=program), ex, ref, STEPS, kept=kept)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_norm_topk_over_whole_qwen_videos_matches_reference(family):
    """Alone, the norm runs at LLM layer 0 on whole videos (video_unit='video'): `keep` counts over the video's
    2 frames at once (12 of its 2 x 16 tokens; on Qwen3-VL each frame its own block behind a time stamp, the kept
    tokens' DeepStack rows reaching the LM)."""
    model, program = _model(family)
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("video",), seed=71)
    emb = family_inputs(model, ex)[0]
    videos = RQ.units(model, ex, "video")
    picks = [[emb[i, video].norm(dim=-1).topk(12).indices] for i, (video,) in enumerate(videos)]
    kept = RQ.keep_of_units(videos, ex.input_ids.shape[1], picks)
    assert not torch.equal(kept, RC.norm_kept_qwen(model, ex, 6))          # the unit matters on this video
    pruned = gp.prune(model, NORM.format(keep=12), program=program, video_unit="video")
    assert_same_run(pruned, ex, RQ.hf_generate(model, ex, kept, STEPS), STEPS, kept=kept)


@pytest.mark.slow
def test_vispruner_attention_on_qwen3_matches_reference():
    """VisPruner with attention-received importance on Qwen3-VL (learned position grid, DeepStack taps): 1 important
    and 4 diverse tokens per unit (the image, each video frame), the diverse ones what enters the merger's MLP."""
    model, program = _model("qwen3_vl")
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=63)
    kept = RM.vispruner(model, ex, 5, 0.25)
    assert not torch.equal(kept, RQ.kept_positions(model, ex, 5, "attention"))    # the diverse tokens matter
    pruned = gp.prune(model, "vispruner(keep=5, important='attention', important_ratio=0.25, positions='keep')",
                      program=program)
    assert_same_run(pruned, ex, RQ.hf_generate(model, ex, kept, STEPS), STEPS, kept=kept)


@pytest.mark.slow
def test_tome_in_place_on_qwen3_matches_reference():
    """ToMe in place on Qwen3-VL (learned position grid, DeepStack taps at blocks 0 and 1): 16 -> 7 tokens after
    block 1 (the last the taps read, so each kept token's DeepStack rows are its own, unmerged), per image and
    video frame, the merged states through the merger; the encoder by hand in reference_vision_qwen_methods.tome."""
    model, program = _model("qwen3_vl")
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=69)
    kept, embeds = RM.tome(model, ex, 7, (1,))
    unmerged = family_inputs(model, ex)[0].gather(1, kept[..., None].expand(-1, -1, embeds.shape[-1]))
    assert not torch.allclose(embeds, unmerged, atol=1e-3)                   # the merges change the kept tokens
    pruned = gp.prune(model, "tome(keep=7, layers=(1,), positions='keep')", program=program)
    assert_same_run(pruned, ex, RQ.hf_generate(model, ex, kept, STEPS, embeds), STEPS, kept=kept)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [(0,), (0, 1)])
def test_tome_after_block_0_on_qwen3_matches_reference(layers):
    """ToMe in place on Qwen3-VL merging after block 0 (and 1): the tap of block 0 reads the groups before any
    merge (a kept token its own row), the tap of block 1 the merged ones, each through its level's own merger;
    a later merge takes the rows tapped before it at its kept tokens, as it takes the features. 16 -> 7 tokens per
    image and video frame (after (0, 1): 16 -> 11 -> 7)."""
    model, program = _model("qwen3_vl")
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=69)
    kept, embeds, rows = RM.tome_deepstack(model, ex, 7, layers)
    unmerged = RF.deepstack(model, ex).gather(2, kept[None, ..., None].expand(rows.shape[0], -1, -1, rows.shape[-1]))
    torch.testing.assert_close(rows[0], unmerged[0])                          # block 0's tap: before the merge
    assert not torch.allclose(rows[1], unmerged[1], atol=1e-3)                # block 1's: the merged tokens
    pruned = gp.prune(model, f"tome(keep=7, layers={layers}, positions='keep')", program=program)
    assert_same_run(pruned, ex, RQ.hf_generate(model, ex, kept, STEPS, embeds, rows), STEPS, kept=kept)


# ------------------------------------------------------------------------------- VisPruner, anyres images

@pytest.mark.parametrize("family,spec,importance", [
    ("llava_next", "vispruner(keep=8, important_ratio=0.25)", "cls"),
    pytest.param("llava_onevision", "vispruner(keep=8, important='attention', important_ratio=0.25)", "received",
                 marks=pytest.mark.slow),
])
def test_vispruner_on_anyres_matches_reference(family, spec, importance):
    """Per anyres image (base view and unpadded crop rows, newline slots not tokens): 2 important tokens, 6 diverse
    ones after the matching rounds, compactly numbered as the authors' LLaVA."""
    model, program = _model(family)
    ex = _anyres_example(model, seed=64)
    chosen = RC.vispruner_anyres(model, ex, 8, 0.25, importance)
    ref = RN.generate(model, ex, chosen, STEPS, "compact")
    assert not torch.equal(ref["keep"], RN.keep_index(model, ex, RN.picks(model, ex, 8, importance)))  # diversity matters
    assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])


# ------------------------------------------------- DivPrune / CDPruner at LLM layer 0 on the other families

PICKS = {"divprune": lambda count: lambda feats, text: N.divprune_indices(feats, count),
         "cdpruner": lambda count: lambda feats, text: N.cdpruner_indices(feats, text, count)}


@pytest.mark.slow
@pytest.mark.parametrize("family,method,items,units,positions", [
    ("llava_next", "cdpruner", ("image",), 1, "compact"),
    ("llava_onevision", "divprune", ("image",), 1, "compact"),
    ("llava_onevision", "cdpruner", ("image",), 1, "keep"),
    ("llava_onevision", "divprune", ("video",), 3, "compact"),       # units: the video's 3 frames
    ("llava_onevision", "cdpruner", ("video",), 3, "keep"),
    ("qwen3_vl", "divprune", ("image", "video"), 3, "keep"),         # the image and the video's 2 frames
    ("qwen3_vl", "cdpruner", ("image", "video"), 3, "keep"),
])
def test_projected_token_methods_match_reference(family, method, items, units, positions):
    """The projected-token methods alone run at LLM layer 0 on the eager encoder's output (as
    tests/test_methods_qwen25.py checks on Qwen2.5-VL): reference_new_methods' greedy choices per unit on the
    model's own features, 5 tokens each, compact or original positions."""
    model, program = _model(family)
    frames = 4 if family == "qwen3_vl" else 3          # Qwen: 2 temporal patches of 2 frames
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=items, frames=frames, seed=68)
    kept, emb, am, pos = N.choose_on_input_embeds(model, ex, units, PICKS[method](5))
    if positions == "compact":
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    # Qwen3-VL: the model's own forward on the pruned prompt carries the kept tokens' DeepStack rows
    ref = RQ.hf_generate(model, ex, kept, STEPS) if family == "qwen3_vl" else \
        R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS)
    pruned = gp.prune(model, f"{method}(keep=5, positions={positions!r})", program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)


# --------------------------------------------------------------------------- batch of 2 = samples alone

@pytest.mark.slow
@pytest.mark.parametrize("items,keep", [(("image",), 6), (("video",), 5)])
def test_onevision_batch_equals_alone(items, keep):
    """LLaVA-OneVision's captured vision stage (SigLIP, no CLS) on a left-padded batch of 2 equals each sample run
    alone: anyres images, pooled video frames (a prompt holds one or the other)."""
    model, program = _model("llava_onevision")
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=items, frames=3, seed=65)
    assert_batch_equals_samples(gp.prune(model, f"vision_topk(keep={keep})", program=program), ex, STEPS)
