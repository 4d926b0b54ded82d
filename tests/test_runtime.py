"""Runtime behaviour: unpruned parity with Hugging Face, batching, text-only prompts, errors."""
import pytest
import torch

import graphprune as gp
from graphprune.tools.zoo import llava_example, qwen2vl_example, tiny_llava


def test_unpruned_matches_hf(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), images_per_sample=2)
    base = gp.prune(model, program=program)
    out = base(**ex.as_kwargs())
    hf = model(**ex.as_kwargs()).logits
    real = ex.attention_mask.bool()
    torch.testing.assert_close(out.logits[real], hf[real], atol=1e-5, rtol=1e-5)
    ours = base.generate(**ex.as_kwargs(), max_new_tokens=12)
    theirs = model.generate(**ex.as_kwargs(), max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spec", ["fastv(layer=2, keep=36)", "fastv(layer=1, keep=1.0)", "cls_topk(keep=36, positions='keep')"])
def test_keep_everything_equals_unpruned(llava, spec):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3))
    base = gp.prune(model, program=program)(**ex.as_kwargs())
    out = gp.prune(model, spec, program=program)(**ex.as_kwargs())
    torch.testing.assert_close(out.logits, base.logits, atol=1e-5, rtol=1e-5)
    assert out.cache.lengths() == base.cache.lengths()


@pytest.mark.parametrize("spec", ["fastv(layer=2, keep=9)", "vtw(layer=2)", "cls_topk(keep=9)"])
def test_padded_batch_equals_samples_alone(llava, spec):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 4), seed=3)
    pruned = gp.prune(model, spec, program=program)
    both = pruned.generate(**ex.as_kwargs(), max_new_tokens=10, eos_token_id=[])
    out = pruned(**ex.as_kwargs())
    for b, pad in enumerate((0, 4)):
        one = {k: v[b:b + 1, pad:] if k != "pixel_values" else v[b:b + 1] for k, v in ex.as_kwargs().items()}
        alone = pruned.generate(**one, max_new_tokens=10, eos_token_id=[])
        assert torch.equal(alone[0, -10:], both[b, -10:])
        single = pruned(**one)
        real = out.cache[-1].mask[b].bool()
        torch.testing.assert_close(out.logits[b][real], single.logits[0], atol=1e-5, rtol=1e-5)


def test_qwen2vl_batch_equals_samples_alone(qwen):
    model, program = qwen
    ex = qwen2vl_example(model, batch=2, pad=(0, 2))
    pruned = gp.prune(model, "fastv(layer=2, keep=4)", program=program)
    both = pruned.generate(**ex.as_kwargs(), max_new_tokens=8, eos_token_id=[])
    for b, pad in enumerate((0, 2)):
        one = dict(input_ids=ex.input_ids[b:b + 1, pad:], attention_mask=ex.attention_mask[b:b + 1, pad:],
                   pixel_values=ex.pixel_values[b * 64:(b + 1) * 64], image_grid_thw=ex.image_grid_thw[b:b + 1],
                   mm_token_type_ids=None if ex.mm_token_type_ids is None else ex.mm_token_type_ids[b:b + 1, pad:])
        assert torch.equal(pruned.generate(**one, max_new_tokens=8, eos_token_id=[])[0, -8:], both[b, -8:])


def test_text_only_prompt_runs_unpruned(llava):
    model, program = llava
    ids = torch.tensor([[1, 5, 9, 17, 33, 4]])
    pruned = gp.prune(model, "fastv", keep=9, program=program)
    out = pruned(input_ids=ids)
    hf = model(input_ids=ids).logits
    torch.testing.assert_close(out.logits, hf, atol=1e-5, rtol=1e-5)
    assert any("text-only" in n for n in out.report.notes)
    assert out.cache.lengths() == [6] * 4


def test_generate_stops_at_eos_and_pads(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3))
    pruned = gp.prune(model, "fastv", layer=2, keep=9, program=program)
    free = pruned.generate(**ex.as_kwargs(), max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, -6 + 2])          # the token sample 0 emits at step 2
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    new = ids[:, -ids.shape[1] + ex.input_ids.shape[1]:]
    first = (new[0] == eos).nonzero()[0, 0]
    assert torch.equal(new[0, :first + 1], free[0, -6:][:first + 1])
    assert (new[0, first + 1:] == 0).all()


def test_sampling_is_seeded_and_respects_top_k(llava):
    model, program = llava
    ex = llava_example(model)
    pruned = gp.prune(model, "vtw", layer=2, program=program)
    a = pruned.generate(**ex.as_kwargs(), max_new_tokens=8, do_sample=True, top_k=3,
                        generator=torch.Generator().manual_seed(0), eos_token_id=[])
    b = pruned.generate(**ex.as_kwargs(), max_new_tokens=8, do_sample=True, top_k=3,
                        generator=torch.Generator().manual_seed(0), eos_token_id=[])
    assert torch.equal(a, b)
    g = pruned.generate(**ex.as_kwargs(), max_new_tokens=1, do_sample=True, top_k=1, eos_token_id=[])
    greedy = pruned.generate(**ex.as_kwargs(), max_new_tokens=1, eos_token_id=[])
    assert torch.equal(g, greedy)


def test_report_counts(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3))
    s = ex.input_ids.shape[1]
    base = gp.prune(model, program=program)
    base(**ex.as_kwargs())
    full = base.report
    pruned = gp.prune(model, "vtw(layer=2)", program=program)
    pruned.generate(**ex.as_kwargs(), max_new_tokens=3, eos_token_id=[])
    rep = pruned.report
    assert rep.tokens_per_layer == [s, s, s - 36, s - 36]
    assert rep.kv_bytes_per_layer[2] * s == full.kv_bytes_per_layer[2] * (s - 36)
    assert rep.flops < full.flops and rep.flops_per_layer[:2] == full.flops_per_layer[:2]
    assert rep.decode_steps == 3
    assert "vtw(layer=2)" in rep.table() and rep.to_dict()["kv_bytes"] == sum(rep.kv_bytes_per_layer)


def test_report_counts_causal_attention_over_the_lower_triangle(llava):
    """FLOPs per layer by hand from the tiny LLaVA's config: 2 per multiply-add of the layer's linear
    weights at each token, and QK^T + PV over the scores its attention computes: the S(S+1)/2 entries
    at or below the diagonal per head where it is causal (the captured causal mask, kept tokens of
    it after FastV), the full S x S square behind MustDrop's static-capacity key mask."""
    model, program = llava
    tc = model.config.text_config
    h, heads, kv_heads, mlp = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.intermediate_size
    weights = 2 * h * h + 2 * h * (h // heads * kv_heads) + 3 * h * mlp     # q, o; k, v; gate, up, down
    ex = llava_example(model, batch=2, pad=(0, 3))
    b, s = ex.input_ids.shape

    def layer(n, causal):
        scores = n * (n + 1) // 2 if causal else n * n
        return b * (2 * n * weights + 2 * 2 * heads * scores * (h // heads))

    fastv = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    fastv(**ex.as_kwargs())
    assert fastv.report.tokens_per_layer == [s, s, s - 27, s - 27]
    assert fastv.report.flops_per_layer == [layer(n, True) for n in (s, s, s - 27, s - 27)]
    static = gp.prune(model, "mustdrop_filter(layers=(2,), gamma=0.03, alpha=0.02, mode='static', capacity=9, "
                             "placement='before')", program=program)
    static(**ex.as_kwargs())
    assert static.report.tokens_per_layer == [s, s, s - 27, s - 27]
    assert static.report.flops_per_layer == [layer(s, True), layer(s, True), layer(s - 27, False),
                                             layer(s - 27, False)]


def test_report_after_inference_mode_call(llava):
    # a report read outside inference_mode after a call inside it (what every benchmark does) used to
    # raise "Inference tensors cannot be saved for backward" while counting FLOPs
    model, program = llava
    kw = llava_example(model).as_kwargs()
    pruned = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    pruned(**kw)
    plain = pruned.report.flops_per_layer
    with torch.inference_mode():
        pruned(**kw)
    assert pruned.report.flops_per_layer == plain


@pytest.mark.slow
def test_model_moved_after_capture_is_captured_again():
    # the captured graphs hold copies of the model's buffers; a model moved to another dtype (or device:
    # the GPU check found it) after a first prune() must run as one built there, not on the stale copies
    model = tiny_llava()
    ex = llava_example(model, batch=2, pad=(0, 3))
    gp.prune(model)(**ex.as_kwargs())
    model.to(torch.float64)
    kw = ex.as_kwargs() | {"pixel_values": ex.pixel_values.double()}
    got = gp.prune(model)(**kw).logits
    born_there = gp.prune(tiny_llava().to(torch.float64))(**kw).logits
    with torch.no_grad():
        ref = model(**kw).logits
    real = kw["attention_mask"].bool()
    assert got.dtype == torch.float64 and torch.equal(got[real], born_there[real])
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


def test_decode_builds_key_masks_only_when_a_key_is_padding(llava):
    # every key real (batch 1, or no padding): the decode step passes no key masks, as transformers does;
    # a padded batch keeps them. Both give the masked step's logits.
    model, program = llava
    pruned = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    assert pruned._maskless_decode                            # its decode graph reads kv_mask_<l> as masks only
    for pad, maskless in (((), True), ((0, 3), False)):
        ex = llava_example(model, batch=len(pad) or 1, pad=pad)
        out = pruned(**ex.as_kwargs())
        assert out.cache.keys_all_real is maskless
        token = out.logits[:, -1].argmax(-1)
        fast, cache = pruned.decode_step(out.cache.copy(), token)
        slow_cache = out.cache.copy()
        slow_cache.keys_all_real = False                      # force the key masks
        slow, _ = pruned.decode_step(slow_cache, token)
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)
        assert cache.keys_all_real is maskless
        fed = torch.ones_like(token)
        fed[0] = 0                                            # a padded token fed: masks from then on
        _, cache = pruned.decode_step(cache, token, mask=fed)
        assert cache.keys_all_real is False


def test_decode_step_frees_each_layers_old_cache_as_it_goes(llava):
    # as transformers' cache does layer by layer: a layer's old keys / values die once the step has
    # concatenated the new token onto them, not when the step ends (a cache the caller still holds,
    # out.cache here, keeps its own); the logits are the step's on a cache copy that frees nothing
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    model, program = llava
    pruned = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    out = pruned(**llava_example(model, batch=1, seed=4).as_kwargs())
    token = out.logits[:, -1].argmax(-1)
    want, _ = pruned.decode_step(out.cache.copy(), token)
    cache = out.cache.copy()
    for layer in cache:                       # the step's cache alone holds these
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    old = [weakref.ref(t) for layer in cache for t in (layer.keys, layer.values)]

    class AliveAtEachCat(TorchDispatchMode):
        alive = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.cat.default and args[1:2] in ((2,), (-2,)):      # a key / value cat
                self.alive.append(sum(r() is not None for r in old))
            return func(*args, **(kwargs or {}))

    with AliveAtEachCat() as seen:
        got, cache = pruned.decode_step(cache, token)
    assert len(seen.alive) == len(old) and seen.alive[-1] == 1, seen.alive    # only the last cat's own input
    assert all(r() is None for r in old)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_decode_step_failing_part_way_leaves_a_cache_that_says_it_is_lost(llava):
    # the step frees each layer's old keys / values as it goes: a step failing at the last layer has
    # freed the others', so a later step over that cache must refuse clearly, not run on half a cache
    model, program = llava
    pruned = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    out = pruned(**llava_example(model, batch=1, seed=4).as_kwargs())
    token = out.logits[:, -1].argmax(-1)
    spare = out.cache.copy()
    broken = out.cache
    broken[len(broken.layers) - 1].keys = broken[len(broken.layers) - 1].keys[..., :-1]    # fails at the last cat
    with pytest.raises(RuntimeError) as failed:
        pruned.decode_step(broken, token)
    assert not isinstance(failed.value, gp.errors.InputError)       # the step's own error, as it came
    with pytest.raises(gp.errors.InputError, match="lost its keys / values"):
        pruned.decode_step(broken, token)
    logits, _ = pruned.decode_step(spare, token)                  # a copy taken before is whole
    assert logits.shape == out.logits[:, -1].shape


def test_decode_step_without_fx_boxed_codegen_runs_the_same(llava, monkeypatch):
    # the boxed calling convention is fx's private API: where it is missing or fails to build, the step
    # warns and holds its inputs to the end instead, with the same logits, and the cache stays whole
    from graphprune.lower import runtime
    model, program = llava
    pruned = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    out = pruned(**llava_example(model, batch=1, seed=4).as_kwargs())
    token = out.logits[:, -1].argmax(-1)
    want, _ = pruned.decode_step(out.cache.copy(), token)

    class Changed:
        def __init__(self):
            raise TypeError("takes other arguments now")
    monkeypatch.setattr(runtime, "_BOXED", Changed)
    fresh = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    with pytest.warns(RuntimeWarning, match="boxed calling convention failed"):
        got, cache = fresh.decode_step(out.cache.copy(), token)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    got, _ = fresh.decode_step(cache, got.argmax(-1))            # the cache it returned decodes on
    assert got.shape == want.shape


# -- errors, all raised before any graph runs -------------------------------------------------


@pytest.mark.parametrize("spec,opts,match", [
    ("nosuch", {}, "unknown method 'nosuch'"),
    ("fastv", {"keep": 0}, "keeps no vision token"),
    ("fastv", {"keep": 1.5}, r"fraction must lie in \(0, 1\]"),
    ("fastv", {"keep": 37}, "exceeds the 36 vision tokens"),
    ("fastv", {"layer": 4, "keep": 9}, "out of range for a 4-layer"),
    ("fastv", {"layer": 0, "keep": 9}, "must be >= 1"),
    ("vtw", {"layer": 9}, "out of range"),
    ("fastv", {"bogus": 1}, "Options are: layer, keep"),
    ("fastv(layer=2, keep=", {}, "cannot parse"),
])
def test_bad_options_fail_clearly(llava, spec, opts, match):
    model, program = llava
    with pytest.raises(gp.GraphpruneError, match=match):
        gp.prune(model, spec, program=program, **opts)


def test_cls_topk_on_qwen2vl_says_no_cls(qwen):
    model, program = qwen
    with pytest.raises(gp.PassNotApplicable, match="CLS"):
        gp.prune(model, "cls_topk", keep=4, program=program)


def test_unsupported_model_names_class():
    from transformers import LlamaConfig, LlamaForCausalLM
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=50))
    with pytest.raises(gp.UnsupportedModelError, match="LlamaForCausalLM"):
        gp.prune(m, "fastv")


def test_mismatched_vision_tokens_in_batch(llava):
    model, program = llava
    ex = llava_example(model, batch=2)
    ex.input_ids[1, 10] = 7          # one image token fewer in sample 1
    pruned = gp.prune(model, "fastv", keep=9, program=program)
    with pytest.raises(gp.InputError, match="image tokens do not match"):
        pruned(**ex.as_kwargs())


def test_pipeline_from_toml_and_debug_print(llava, tmp_path, capsys):
    model, program = llava
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pass]]\nmethod = "cls_topk"\nkeep = 18\n\n[[pass]]\nmethod = "fastv"\nlayer = 2\nkeep = 6\n')
    a = gp.prune(model, str(cfg), program=program, debug=True)
    printed = capsys.readouterr().out
    assert "select_topk" in printed and "attention_rows" in printed
    b = gp.prune(model, "cls_topk(keep=18); fastv(layer=2, keep=6)", program=program)
    ex = llava_example(model)
    torch.testing.assert_close(a(**ex.as_kwargs()).logits, b(**ex.as_kwargs()).logits)


def test_captured_program_is_not_modified(llava):
    model, program = llava
    before = program.stages["prefill"].gm.code
    gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    assert program.stages["prefill"].gm.code == before
