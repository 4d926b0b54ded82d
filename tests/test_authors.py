"""graphprune's default passes select what the authors' released code selects, given the same tensors.

Each test runs a pass with its default options, records the tensors it scored (graphprune.tools.instrument
.record_selections) and feeds them, one sample at a time, to a plain-PyTorch transcription of the
authors' selection rule (tests/authors_reference.py), then compares kept sets (and orders, where the
authors' code reorders). The whole MustDrop pipeline with its defaults (merge order, layer placement,
compact positions, output-aware cache, per-layer decode positions) is also checked end to end against
tests/reference.py driven by the authors' rules: logits (fp32, atol 1e-5) and 16 greedy tokens.
"""
import math
import random

import authors_reference as A
import pytest
import reference as R
import torch

import graphprune as gp
from graphprune.errors import PassConfigError
from graphprune.passes.dart import set_iteration_order
from graphprune.tools import vqa, zoo
from graphprune.tools.instrument import record_selections
from graphprune.tools.zoo import llava_example, tiny_llava

STEPS = 16


def _choices(pruned, ex, stage="prefill"):
    """[(kwargs of the pass's choose fn, picked (B, n, k))] of every Choose node in `stage`, in order."""
    rec = record_selections(pruned, ex.as_kwargs())
    return [(kw, out[2]) for node, args, out, kw in rec[stage] if kw is not None]


def _topk_scores(pruned, ex, stage="prefill"):
    rec = record_selections(pruned, ex.as_kwargs())
    return [(args[0], out[2]) for node, args, out, kw in rec[stage] if kw is None and args[0].dim() == 3]


# ------------------------------------------------------------------------------------- FastV, VisionZip

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fastv_default_is_authors(llava, seed):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=seed)
    pruned = gp.prune(model, "fastv", keep=9, program=program)
    [(scores, picked)] = _topk_scores(pruned, ex)
    for b in range(2):
        assert picked[b, 0].tolist() == A.fastv_keep(scores[b, 0], 9)


@pytest.mark.parametrize("keep", [6, 9, 18])
def test_cls_topk_is_visionzip_dominant(llava, keep):
    model, program = llava
    ex = llava_example(model, batch=2, seed=keep)
    pruned = gp.prune(model, "cls_topk", keep=keep, program=program)
    [(scores, picked)] = _topk_scores(pruned, ex, "vision")
    for i in range(scores.shape[0]):
        assert picked[i, 0].tolist() == A.visionzip_dominant(scores[i, 0], keep)


# ------------------------------------------------------------------------------------------------ DART

def test_set_iteration_order_is_cpython():
    rng = random.Random(0)
    for _ in range(200):
        p = rng.randint(1, 20)
        keys = [rng.sample(range(rng.choice([40, 700, 5000, 10 ** 7])), p) for _ in range(2)]
        got = set_iteration_order(torch.tensor(keys))
        for row, order in zip(keys, got.tolist()):
            assert [row[j] for j in order] == list(set(row))


def _dart_inputs(kw, b, i=0):
    """One sample's sequence as the authors index it: keys (S, Hd), final-normed hidden (S, D)."""
    vis, txt = kw["vis_index"][b, i], kw["text_index"][b][kw["text_mask"][b]]
    s = int(txt.max()) + 1
    keys = torch.zeros(s, kw["vis_score"].shape[-1])
    hidden = torch.zeros(s, kw["vis_feat"].shape[-1])
    keys[vis], keys[txt] = kw["vis_score"][b, i], kw["text_score"][b][kw["text_mask"][b]]
    hidden[vis], hidden[txt] = kw["vis_feat"][b, i], kw["text_feat"][b][kw["text_mask"][b]]
    assert torch.equal(vis, torch.arange(int(vis[0]), int(vis[0]) + vis.numel()))   # one contiguous image
    assert int(vis[-1]) + 1 == int(txt[0])                                          # the instruction follows it
    return keys, hidden, int(vis[0]), vis.numel()


DART_CASES = [(t, seed, pad) for t in (1, 2, 3) for seed, pad in ((0, ()), (1, (0, 2)), (4, (3, 0)))]


@pytest.mark.parametrize("t,seed,pad", DART_CASES)
def test_dart_default_is_authors(llava, t, seed, pad):
    """Budgets 4 + 8t, where the exact budget and the authors' (4 + 8 x (8t // 8)) agree."""
    model, program = llava
    ex = llava_example(model, batch=2, pad=pad, seed=seed, prefix=5 + 7 * seed)
    pruned = gp.prune(model, "dart", keep=4 + 8 * t, order="authors", program=program)
    [(kw, picked)] = _choices(pruned, ex)
    for b in range(2):
        keys, hidden, start, v = _dart_inputs(kw, b)
        assert picked[b, 0].tolist() == A.dart_retained(keys, hidden, start, v, 8 * t)


@pytest.mark.parametrize("keep", [9, 13, 20])
def test_dart_authors_budget(llava, keep):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 2), seed=keep)
    pruned = gp.prune(model, "dart", keep=keep, budget="authors", order="authors", program=program)
    [(kw, picked)] = _choices(pruned, ex)
    assert picked.shape[-1] == 4 + 8 * (keep // 8)
    for b in range(2):
        keys, hidden, start, v = _dart_inputs(kw, b)
        assert picked[b, 0].tolist() == A.dart_retained(keys, hidden, start, v, keep)


def test_dart_pivot_order_matters(llava):
    """The score order (graphprune's former default, now order="score") differs from the authors' here."""
    model, program = llava
    ex = llava_example(model, seed=1, prefix=30)
    authors = _choices(gp.prune(model, "dart", keep=20, order="authors", program=program), ex)[0]
    score = _choices(gp.prune(model, "dart", keep=20, order="score", program=program), ex)[0]
    kw = authors[0]
    pivots = (kw["vis_index"][0, 0][kw["vis_score"][0, 0].abs().sum(-1).topk(4).indices].tolist()
              + kw["text_index"][0][kw["text_score"][0].abs().sum(-1).masked_fill(~kw["text_mask"][0], -1)
                                    .topk(4).indices].tolist())
    assert A.dart_visit_order(pivots) != pivots
    assert not torch.equal(authors[1], score[1])


# --------------------------------------------------------------------------------------------- MustDrop

def _merge_tau(model, ex):
    """tau between the 2nd and 3rd most similar windows of image 0 (two windows merge)."""
    top = A.window_scores(R.llava_vision_layer0(model, ex.pixel_values)[0, 1:])[0].sort(descending=True).values
    return float((top[1] + top[2]) / 2)


@pytest.mark.parametrize("mode", ["exact", "static"])
def test_mustdrop_merge_default_is_authors(llava, mode):
    model, program = llava
    ex = llava_example(model, seed=3)
    tau = _merge_tau(model, ex)
    pruned = gp.prune(model, "mustdrop_merge", tau=tau, mode=mode, program=program)
    [(kw, picked)] = _choices(pruned, ex, "vision")
    h = torch.cat([torch.zeros_like(kw["hidden"][0, 0, :1]), kw["hidden"][0, 0]])   # CLS row: never read
    merged, source = A.conditional_pooling(h, tau)
    assert source.numel() == 36 - 16
    n = source.numel()
    assert picked[0, 0, :n].tolist() == source.tolist()                  # same tokens, same order
    rec = record_selections(pruned, ex.as_kwargs())
    values = [out[3] for node, args, out, kw in rec["vision"] if kw is not None][0]
    torch.testing.assert_close(values[0, 0, :n], merged[1:], atol=1e-6, rtol=1e-6)
    if mode == "static":                                                 # fillers follow, invalid
        assert picked.shape[-1] == 36 and sorted(picked[0, 0, n:].tolist()) == picked[0, 0, n:].tolist()


def _authors_vision(model, ex, tau):
    """The authors' vision side: merge after layer 0 (their order), key set from the feature layer's CLS
    attention (graphprune's default layer), features in emitted order."""
    def hook(h, ctx):
        rows, index = [], []
        for i in range(h.shape[0]):
            merged, source = A.conditional_pooling(h[i], tau)
            rows.append(merged)
            index.append(torch.cat([torch.zeros(1, dtype=torch.long), source + 1]))
        h2 = torch.stack(rows)
        return h2, torch.stack(index), torch.ones(h2.shape[:2], dtype=torch.bool)

    vis = R.llava_vision(model, ex.pixel_values, after_layer={0: hook})
    keys = torch.stack([torch.zeros(vis["cls_attn"].shape[1], dtype=torch.bool).scatter(
        0, A.key_set(vis["cls_attn"][i]), True) for i in range(vis["cls_attn"].shape[0])])
    return vis, keys


@pytest.fixture(scope="module")
def vqa_case():
    """The shipped trained VQA model (24x24 patches, 8 LLM layers) and one test question: its windows are
    alike enough for tau=0.8 to merge (576 -> 192 tokens) and its filters at layers 2, 4, 6 each drop."""
    model, vocab = zoo.vqa_llava()
    sample = vqa.generate("test", 1, seed=0)[0]
    ids = torch.tensor([vocab.prompt_ids(sample.question)])
    ex = zoo.Example(ids, torch.ones_like(ids), vqa.pixel_values(sample.image[None]))
    vis, keys = _authors_vision(model, ex, 0.8)
    v = vis["features"].shape[1]
    ordered = dict(vis, patch_index=torch.arange(v)[None], valid=torch.ones(1, v, dtype=torch.bool))
    emb, am, pos, vm, prot = R.llava_inputs_from_vision(model, ex, ordered, positions="compact", protected=keys)
    sel = A.filter_select(0.011, 0.01)               # the authors' script values for 64 tokens
    ref = R.lm_generate(model, emb, am, pos, selects={3: sel, 5: sel, 7: sel}, protected=prot, cut_to_final=(2, 7),
                        positions="compact", max_new_tokens=STEPS, vision_mask=vm)
    uncut = R.lm_generate(model, emb, am, pos, selects={3: sel, 5: sel, 7: sel}, protected=prot,
                          positions="compact", max_new_tokens=1, vision_mask=vm)["kv_lens"]
    s = emb.shape[1]
    assert v < 576 and s > uncut[3] > uncut[5] > uncut[7] > s - v          # the merge and all three filters act
    assert ref["kv_lens"] == [s, s] + [uncut[7]] * 6                         # layers 2..6 cut to the final set
    return model, ex, ref, vm


@pytest.mark.parametrize("mode", ["exact", "static"])
def test_mustdrop_pipeline_defaults_are_authors(vqa_case, mode):
    """gp.prune(model, "mustdrop", keep=64) with the authors' layers for an 8-layer LM: merge (their order)
    -> keys -> filters at layers 2, 4, 6 (own attention, positions renumbered) -> cache cut over layers
    2..6 -> decode at each layer's cache length; static mode with room for every token masks instead."""
    model, ex, ref, vm = vqa_case
    opts = dict(mode="exact") if mode == "exact" else dict(capacity=576)
    pruned = gp.prune(model, "mustdrop", keep=64, layers=(2, 4, 6), **opts)
    out = pruned(**ex.as_kwargs())
    real = out.cache[-1].mask.bool()
    assert int(real.sum()) == ref["kv_lens"][-1]
    torch.testing.assert_close(out.logits[real], ref["prefill_logits"][0], atol=1e-5, rtol=1e-5)
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    assert torch.equal(ids[:, -STEPS:], ref["tokens"])
    if mode == "exact":                          # the kept image tokens stand for the reference's patches
        assert out.cache.lengths() == ref["kv_lens"]
        img = ex.input_ids.gather(1, out.kept) == model.config.image_token_id
        first = int((ex.input_ids[0] == model.config.image_token_id).nonzero()[0])
        source = A.conditional_pooling(R.llava_vision_layer0(model, ex.pixel_values)[0], 0.8)[1]
        ref_rows = ref["keep"][0][vm.gather(1, ref["keep"])[0]] - int(vm[0].nonzero()[0])
        assert (out.kept[0][img[0]] - first).tolist() == source[ref_rows].tolist()


def test_mustdrop_former_options_differ(vqa_case):
    """graphprune's former placement / positions / merge order are still there, and select differently."""
    model, ex, ref, _ = vqa_case
    old = gp.prune(model, "mustdrop", keep=64, layers=(3, 5, 7), mode="exact", placement="before",
                   positions="keep", order="raster")(**ex.as_kwargs())
    assert old.cache.lengths()[-1] != ref["kv_lens"][-1] or not torch.allclose(
        old.logits[0, -1], ref["prefill_logits"][0, -1], atol=1e-4)


@pytest.mark.parametrize("mode", ["exact", "static"])
def test_mustdrop_filters_are_authors_on_graphprune_tensors(llava, mode):
    """Each filter's choice from the attention graphprune recorded (compact positions, its own layer) is
    the authors' dual-attention rule plus the key set."""
    model, program = llava
    ex = llava_example(model, batch=1 if mode == "exact" else 2, pad=(0, 3) if mode == "static" else (), seed=5)
    pruned = gp.prune(model, f"mustdrop_keys | mustdrop_filter(layers=(1, 2), gamma=0.0278, alpha=0.0235, "
                             f"mode='{mode}', capacity=30)", program=program)
    records = _choices(pruned, ex)
    assert len(records) == 2
    dropped = 0
    for kw, picked in records:
        for b in range(kw["attn"].shape[0]):
            real = kw["attn"][b, :, 0].sum(-1) > 0                     # padded text rows are zero
            keys = kw["protected"][b, 0].nonzero()[:, 0]
            valid = kw["valid"][b, 0] if kw["valid"] is not None else torch.ones_like(kw["protected"][b, 0])
            expect = A.dual_attention_filter(kw["attn"][b, real, 0], 0.0278, 0.0235, keys)
            expect = expect[valid[expect]]
            got = picked[b, 0]
            if mode == "static":
                rule = A.dual_attention_filter(kw["attn"][b, real, 0], 0.0278, 0.0235, keys)
                got = got[torch.isin(got, rule) & valid[got]]
            assert got.tolist() == expect.tolist()
            dropped += kw["attn"].shape[-1] - expect.numel()
    assert dropped > 0


def test_mustdrop_on_a_shallow_vision_tower_names_the_option():
    model = tiny_llava(vision_layers=2)           # the features come from layer 0: merge and keys cannot both run
    with pytest.raises(PassConfigError, match="merge=False"):
        gp.prune(model, "mustdrop", keep=64)
    with pytest.raises(PassConfigError, match=r"layers=\(2,\)"):     # 4 LM layers: (2, 6, 10, 14) does not fit
        gp.prune(model, "mustdrop", keep=64, merge=False)
    ex = llava_example(model)
    out = gp.prune(model, "mustdrop", keep=64, merge=False, layers=(1, 2))(**ex.as_kwargs())
    assert out.logits.shape[0] == 1
    assert math.isfinite(float(out.logits.abs().max()))
