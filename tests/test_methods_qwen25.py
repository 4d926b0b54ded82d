"""The methods issue 18 added, on a tiny Qwen2.5-VL (windowed ViT, 2x2 merger, M-RoPE LM).

PyramidDrop (an LLM-stage method) runs there: kept sets, per-layer KV lengths, prefill logits (fp32,
atol 1e-5) and 16 greedy tokens equal the independent reference (tests/reference.py runs the decoder
by hand; tests/reference_families.py lays out Qwen's prompt and M-RoPE positions), images and video
frames alike; a left-padded batch of 2 equals each sample alone.

graphprune runs Qwen's vision stage eagerly unless a vision pass needs the encoder (then it captures it
per patch grid: tests/test_vision_qwen.py). DivPrune and CDPruner
read only the projected tokens (and CDPruner the instruction), which are the LLM's input embeddings at
the vision positions, so the pipeline runs them at LLM layer 0: the same checks against
reference_new_methods.choose_on_input_embeds, with positions='keep' (compact renumbering of M-RoPE
positions is refused, naming the option); on LLaVA-NeXT (eager anyres vision, 1-D positions) compact
numbering runs too. VisionZip, VisPruner and ToMe by default read the encoder's CLS token: refused, naming it
and the option that runs on Qwen (those variants: tests/test_vision_qwen.py, tests/test_vision_qwen_methods.py)."""
import pytest
import reference as R
import reference_evs as E
import reference_families as RF
import reference_new_methods as N
import torch
from checks import assert_same_run
from test_families import _model

import graphprune as gp
from graphprune.errors import PassConfigError, PassNotApplicable
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo

STEPS = 16
V = 16                       # an 8 x 8 patch grid through the 2 x 2 merger: 16 tokens per image / frame


@pytest.fixture(scope="module")
def qwen25():
    model = family_zoo.build("qwen2_5_vl")
    return model, Program.capture(model)


@pytest.mark.parametrize("batch,pad,items,layers,ratios", [
    (1, (), ("image",), (1, 2, 3), (0.5, 0.25, 0.125)),
    (2, (0, 2), ("image",), (1, 3), (0.5, 0.25)),
    (2, (0, 2), ("image", "video"), (2,), (0.5,)),       # units: the image and each of the video's 2 frames
])
def test_pyramiddrop_matches_reference(qwen25, batch, pad, items, layers, ratios):
    model, program = qwen25
    ex = family_zoo.example(model, batch=batch, pad=pad, items=items, seed=batch + 30)
    units = RF.units_of(model, ex)
    emb, am, pos, vm = RF.family_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, selects=N.pyramiddrop_selects(layers, ratios, V, images=units),
                        vision_mask=vm, max_new_tokens=STEPS)
    pruned = gp.prune(model, "pyramiddrop", layers=layers, ratios=ratios, program=program)
    out = assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    assert vm.gather(1, out.kept).sum(1).tolist() == [units * int(V * ratios[-1])] * batch


def test_pyramiddrop_batch_equals_alone(qwen25):
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image",), seed=33)
    pruned = gp.prune(model, "pyramiddrop(layers=(1, 3), ratios=(0.5, 0.25))", program=program)
    both = pruned(**ex.as_kwargs())
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    for b in range(2):
        one = ex.sample(b)
        alone = pruned(**one.as_kwargs())
        torch.testing.assert_close(both.logits[b][both.cache[-1].mask[b].bool()], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(pruned.generate(**one.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])[0, -STEPS:],
                           ids[b, -STEPS:])


@pytest.mark.parametrize("spec,option", [("visionzip(keep=8)", "dominant='attention'"),
                                         ("vispruner(keep=8)", "important='attention'"),
                                         ("tome(keep=8)", "positions='keep'")])
def test_encoder_methods_refused_naming_the_missing_signal(qwen25, spec, option):
    model, program = qwen25
    with pytest.raises(PassNotApplicable) as err:
        gp.prune(model, spec, program=program)
    msg = str(err.value)
    assert spec.split("(")[0] in msg and "Qwen2_5_VL" in msg and "CLS token of the vision encoder" in msg
    assert option in msg



# ------------------------------------------- DivPrune / CDPruner at LLM layer 0 (the vision stage runs eagerly)

def _divprune_pick(count):
    return lambda feats, text: N.divprune_indices(feats, count)


def _cdpruner_pick(count):
    return lambda feats, text: N.cdpruner_indices(feats, text, count)


PICKS = {"divprune": _divprune_pick, "cdpruner": _cdpruner_pick}


@pytest.mark.parametrize("method", sorted(PICKS))
@pytest.mark.parametrize("batch,pad,items,keep", [
    (1, (), ("image",), 5),
    (2, (0, 3), ("image", "video"), 0.5),     # units: the image and each of the video's 2 frames; round(0.5 x 16)
])
def test_projected_token_methods_match_reference(qwen25, method, batch, pad, items, keep):
    model, program = qwen25
    ex = family_zoo.example(model, batch=batch, pad=pad, items=items, seed=batch + 40)
    units = RF.units_of(model, ex)
    count = keep if isinstance(keep, int) else round(keep * V)
    kept, emb, am, pos = N.choose_on_input_embeds(model, ex, units, PICKS[method](count))
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS)
    pruned = gp.prune(model, method, keep=keep, positions="keep", program=program)
    out = assert_same_run(pruned, ex, ref, STEPS, kept=kept)
    _, _, _, vm = RF.family_inputs(model, ex)
    assert vm.gather(1, out.kept).sum(1).tolist() == [units * count] * batch


@pytest.mark.parametrize("method", sorted(PICKS))
def test_projected_token_methods_over_whole_videos(qwen25, method):
    """video_unit="video": a video's frames are one unit, so `keep` counts over the whole video and the
    choice runs over all its tokens at once (here 12 of its 2 x 16)."""
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("video",), seed=48)
    kept, emb, am, pos = N.choose_on_input_embeds(model, ex, 1, PICKS[method](12))
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS)
    pruned = gp.prune(model, method, keep=12, positions="keep", program=program, video_unit="video")
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)
    per_frame = N.choose_on_input_embeds(model, ex, 2, PICKS[method](6))[0]
    assert not torch.equal(kept, per_frame)          # the unit matters on this video


def test_projected_token_methods_chain_and_batch_equals_alone(qwen25):
    """cdpruner then divprune, both at layer 0: divprune chooses among cdpruner's kept tokens. A
    left-padded batch (instructions of different lengths) equals the reference and each sample alone."""
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 4), items=("image",), seed=44)

    def cdpruner_then_divprune(feats, text):
        first = torch.tensor(N.cdpruner_indices(feats, text, 10))
        return first[N.divprune_indices(feats[first], 6)]

    kept, emb, am, pos = N.choose_on_input_embeds(model, ex, 1, cdpruner_then_divprune)
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS)
    pruned = gp.prune(model, "cdpruner(keep=10, positions='keep') | divprune(keep=6, positions='keep')",
                      program=program)
    both = assert_same_run(pruned, ex, ref, STEPS, kept=kept)
    for b in range(2):
        one = ex.sample(b)
        alone = pruned(**one.as_kwargs())
        torch.testing.assert_close(both.logits[b][both.cache[-1].mask[b].bool()], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(pruned.generate(**one.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])[0, -STEPS:],
                           ref["tokens"][b])


def test_evs_then_divprune_in_written_order(qwen25):
    """At layer 0 passes act in the written order: evs keeps each video's tokens least like the previous
    frame, divprune chooses among those. The other order is refused (evs needs the video's whole frames)."""
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("video",), seed=47)
    keep, emb, _, _ = E.evs_inputs(model, ex, 0.5)              # 16 of the video's 2 x 16 tokens
    vm = RF.family_inputs(model, ex)[3].gather(1, keep)
    rows = []
    for b in range(2):
        video = vm[b].nonzero(as_tuple=True)[0]
        chosen = video[N.divprune_indices(emb[b, video], 8)]
        rows.append(keep[b, torch.cat([(~vm[b]).nonzero(as_tuple=True)[0], chosen]).sort().values])
    pruned = gp.prune(model, "evs(rate=0.5) | divprune(keep=8, positions='keep')", program=program)
    assert torch.equal(pruned(**ex.as_kwargs()).kept, torch.stack(rows))
    with pytest.raises(PassConfigError, match="put evs first"):
        gp.prune(model, "divprune(keep=8, positions='keep') | evs(rate=0.5)", program=program)


def test_divprune_compact_on_llava_next():
    """An eager vision stage with 1-D positions (LLaVA-NeXT's anyres crops): positions='compact' (the
    default) renumbers the kept tokens 0..n-1 at layer 0, as a prompt holding only them would be."""
    model, program = _model("llava_next")
    ex = family_zoo.example(model, batch=2, pad=(0, 2), seed=45)
    kept, emb, am, _ = N.choose_on_input_embeds(model, ex, 1, _divprune_pick(9))
    ref = R.lm_generate(model, emb, am, (am.cumsum(-1) - 1).masked_fill(am == 0, 0), max_new_tokens=STEPS)
    pruned = gp.prune(model, "divprune", keep=9, program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)


@pytest.mark.parametrize("spec,error,words", [
    ("divprune(keep=8)", PassNotApplicable, ["divprune", "positions='compact'", "M-RoPE", "positions='keep'"]),
    ("cdpruner(keep=8)", PassNotApplicable, ["cdpruner", "M-RoPE", "positions='keep'"]),
    ("divprune(keep=0, positions='keep')", PassConfigError, ["keep=0"]),
    ("cdpruner(keep=1.5, positions='keep')", PassConfigError, ["keep=1.5"]),
    ("cdpruner(keep=8, positions='shift')", PassConfigError, ["positions", "'shift'"]),
    # random at the vision stage runs on Qwen's encoder captured per grid (test_vision_qwen); compact M-RoPE is refused
    ("random(stage='vision', keep=8, positions='compact')", PassNotApplicable, ["random", "positions='compact'",
                                                                               "M-RoPE"]),
])
def test_bad_options_refused_before_work(qwen25, spec, error, words):
    model, program = qwen25
    with pytest.raises(error) as err:
        gp.prune(model, spec, program=program)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_budget_above_a_unit_refused_before_work(qwen25):
    model, program = qwen25
    pruned = gp.prune(model, "divprune(keep=17, positions='keep')", program=program)
    ex = family_zoo.example(model, items=("image",), seed=46)
    with pytest.raises(PassConfigError, match="keep=17 exceeds the 16 vision tokens"):
        pruned(**ex.as_kwargs())


# ------------------------------------------------------------------------------- SparseVLM, positions kept

@pytest.mark.parametrize("batch,pad,items,opts", [
    (1, (), ("image",), dict(layers=(0, 2), scale=2.0, bias=3.0, keep=12)),
    (2, (0, 3), ("image", "video"), dict(layers=(0, 2), scale=1.0, bias=3.0, keep=12)),    # 6 to 9 kept per unit
])
def test_sparsevlm_keep_positions_matches_reference(qwen25, batch, pad, items, opts):
    """Without recycling, kept tokens keep their own slots and M-RoPE positions (the tiny model's short
    instructions give ranks of a few: the presets would keep almost nothing, hence explicit scale / bias)."""
    model, program = qwen25
    ex = family_zoo.example(model, batch=batch, pad=pad, items=items, seed=batch + 50)
    units = RF.units_of(model, ex)
    emb, am, pos, vm = RF.family_inputs(model, ex)
    log = []
    selects = N.sparsevlm_selects(emb, vm, am, opts["layers"], opts["scale"], opts["bias"],
                                  opts.get("capacity", opts["keep"]), images=units, recycle=False, log=log, in_place=True)
    ref = R.lm_generate(model, emb, am, pos, selects=selects, vision_mask=vm, positions="keep", max_new_tokens=STEPS)
    pruned = gp.prune(model, "sparsevlm", recycle=False, positions="keep", program=program, **opts)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    counts = [len(out["kept"]) for *_, out in log]
    assert 0 < min(counts) and max(counts) < V and min(counts) < opts["keep"]   # pruned, some slots left unused


def test_sparsevlm_on_mrope_says_what_to_set(qwen25):
    """The authors' v1 renumbers (compact), which M-RoPE does not define; the refusal names the options that run."""
    model, program = qwen25
    with pytest.raises(PassNotApplicable, match="M-RoPE.*positions='keep' needs recycle=False"):
        gp.prune(model, "sparsevlm(keep=64, layers=(0, 1))", program=program)
