"""The mask-free causal kernel in the lowered prefill (graphprune.lower.causal): taken in every
layer whose mask is plain causal (no padding, no invalid static-capacity slot, within any sliding
window), and then the logits equal the masked graph's, Hugging Face's and the independent
references' (fp32, atol 1e-5); not taken with left padding, invalid slots, behind a static-capacity
key mask, or past a sliding window. On Qwen2.5-VL (grouped-query attention) the lowered prefill reads
each layer's cached keys and values per KV head (enable_gqa) and, on a plain-causal prompt, builds no
mask at all (its construction skipped, as transformers skips it); left padding builds it.

Which kernel ran is read from the calls: the lowered prefill's choice calls
F.scaled_dot_product_attention (is_causal=True and no mask, or the mask); the captured graphs'
own SDPA nodes are aten ops, which a TorchFunctionMode does not see.
"""
import pytest
import reference as R
import reference_dart as D
import reference_families as RF
import torch
import torch.nn.functional as F
from checks import assert_batch_equals_samples, assert_same_run
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import graphprune as gp
from graphprune.lower.causal import causal_or_masked_attention
from graphprune.lower.runtime import StageCall
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo
from graphprune.tools.instrument import with_proxies
from graphprune.tools.zoo import llava_example, tiny_llava

LAYERS = 4                   # the tiny LLaVA's language model


class SdpaCalls(TorchFunctionMode):
    """Records each F.scaled_dot_product_attention call as "causal" (is_causal=True, no mask) or "masked"."""

    def __init__(self):
        super().__init__()
        self.kinds = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.kinds.append("causal" if kwargs.get("is_causal") and mask is None else "masked")
        return func(*args, **kwargs)


def run(pruned, ex):
    with SdpaCalls() as calls:
        out = pruned(**ex.as_kwargs())
    return out, calls.kinds


def masked(pruned):
    """The same pruned model running the program's graphs, whose attention always reads its mask."""
    return with_proxies(pruned, lambda stage, gm: pruned.program.stages[stage].gm)


def rewritten(pruned) -> int:
    return sum(n.target is causal_or_masked_attention for n in pruned.executables["prefill"].graph.nodes)


def _ref_lm(model, ex, **kw):
    emb, am, pos, vm = R.llava_inputs(model, ex)
    return R.lm_generate(model, emb, am, pos, max_new_tokens=1, vision_mask=vm, **kw)


@pytest.mark.parametrize("batch", [1, 2])
def test_unpruned_runs_mask_free_and_equals_hf(llava, batch):
    model, program = llava
    ex = llava_example(model, batch=batch, seed=1)                 # batch 2 without padding is plain causal too
    pruned = gp.prune(model, program=program)
    out, kinds = run(pruned, ex)
    assert kinds == ["causal"] * LAYERS
    torch.testing.assert_close(out.logits, model(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, masked(pruned)(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec,select", [("fastv(layer=2, keep=9)", R.fastv_select(9)),
                                         ("dart(layer=2, keep=9, order='score')", D.dart_select(9))])
def test_pruned_runs_mask_free_and_equals_reference(llava, spec, select):
    """Layers after the selection attend over the kept tokens, in prompt order: still causal."""
    model, program = llava
    ex = llava_example(model, batch=1, seed=2)
    pruned = gp.prune(model, spec, program=program)
    out, kinds = run(pruned, ex)
    assert kinds == ["causal"] * LAYERS
    ref = _ref_lm(model, ex, selects={2: select})
    assert torch.equal(out.kept, ref["keep"])
    torch.testing.assert_close(out.logits, ref["prefill_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, masked(pruned)(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", [None, "fastv(layer=2, keep=9)"])
def test_left_padding_keeps_the_mask(llava, spec):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=3)
    pruned = gp.prune(model, spec, program=program)
    out, kinds = run(pruned, ex)
    assert kinds == ["masked"] * LAYERS
    torch.testing.assert_close(out.logits, masked(pruned)(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)
    if spec is None:
        real = ex.attention_mask.bool()
        torch.testing.assert_close(out.logits[real], model(**ex.as_kwargs()).logits[real], atol=1e-5, rtol=1e-5)


def test_static_capacity_key_mask_stays(llava):
    """SparseVLM's static capacity masks invalid slots from its layer on: those layers keep their
    mask (in the graph), the layers before it still run mask-free at batch 1."""
    model, program = llava
    ex = llava_example(model, batch=1, seed=2)
    pruned = gp.prune(model, "sparsevlm(keep=64, layers=(1,), scale=2.0, bias=3.0, capacity=24)", program=program)
    assert [r.info["layer"] for r in pruned.results] == [2]
    assert rewritten(pruned) == 2
    out, kinds = run(pruned, ex)
    assert int((out.cache[-1].mask == 0).sum()) > 0      # the case under test: some slots are invalid
    assert kinds == ["causal", "causal"]                 # layers 2, 3: the graph's own masked SDPA
    torch.testing.assert_close(out.logits, masked(pruned)(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)


def test_invalid_vision_slots_keep_the_mask(llava):
    """A static-capacity vision merge leaves invalid slots in the prompt at batch 1: masked."""
    model, program = llava
    ex = llava_example(model, batch=1, seed=2)
    pruned = gp.prune(model, "mustdrop_merge", tau=1.0, mode="static", capacity=24, order="raster", program=program)
    out, kinds = run(pruned, ex)
    assert int((out.cache[0].mask == 0).sum()) > 0       # the case under test: some slots are invalid
    assert kinds == ["masked"] * LAYERS
    torch.testing.assert_close(out.logits, masked(pruned)(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)


def test_reordering_vision_pass_runs_mask_free(llava):
    """ToMe's merge reorders the kept tokens before the LLM; the LLM's mask is causal over the
    sequence it is fed, so the mask-free kernel equals it."""
    model, program = llava
    ex = llava_example(model, batch=1, seed=2)
    pruned = gp.prune(model, "tome(keep=12, layers=(0, 1))", program=program)
    out, kinds = run(pruned, ex)
    assert kinds == ["causal"] * LAYERS
    torch.testing.assert_close(out.logits, masked(pruned)(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)


def test_text_only_prompt_runs_mask_free(llava):
    model, program = llava
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 7]])
    pruned = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    with SdpaCalls() as calls:
        out = pruned(input_ids=ids)
    assert calls.kinds == ["causal"] * LAYERS
    torch.testing.assert_close(out.logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def _windowed_llava(window: int):
    """The tiny LLaVA with a Mistral language model attending to the last `window` tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig
    base = tiny_llava().config
    text = {k: v for k, v in base.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    cfg = LlavaConfig(vision_config=base.vision_config, text_config=MistralConfig(**text, sliding_window=window),
                      image_token_id=base.image_token_id, vision_feature_layer=base.vision_feature_layer,
                      vision_feature_select_strategy=base.vision_feature_select_strategy,
                      projector_hidden_act=base.projector_hidden_act)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("window,kind", [(20, "masked"), (64, "causal")])
def test_sliding_window_beyond_the_prompt_only(window, kind):
    model = _windowed_llava(window)
    ex = llava_example(model, batch=1, seed=1)                    # 49 tokens
    assert 20 < ex.input_ids.shape[1] <= 64
    pruned = gp.prune(model)
    out, kinds = run(pruned, ex)
    assert kinds == [kind] * LAYERS
    torch.testing.assert_close(out.logits, model(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)


class OpShapes(TorchDispatchMode):
    """The output shapes of every aten op run, and per CPU flash attention call: its query's and key's
    heads, is_causal, and whether it read a mask."""

    def __init__(self):
        super().__init__()
        self.outputs, self.attention = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            causal = kwargs.get("is_causal", args[4] if len(args) > 4 else False)
            self.attention.append((args[0].shape[1], args[1].shape[1], causal, kwargs.get("attn_mask") is not None))
        self.outputs += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                         if isinstance(t, torch.Tensor)]
        return out


@pytest.fixture(scope="module")
def qwen25():
    model = family_zoo.build("qwen2_5_vl")              # 4 query heads, 2 KV heads (grouped-query attention)
    return model, Program.capture(model)


def prefill_ops(pruned, ex) -> tuple:
    """(pruned's output on ex, OpShapes of its prefill graph's run)."""
    shapes = OpShapes()

    def make(stage, gm):
        def call(*args):
            if stage != "prefill":
                return gm(*args)
            with shapes:
                return gm(*args)
        return StageCall(gm, call)
    return with_proxies(pruned, make)(**ex.as_kwargs()), shapes


@pytest.mark.parametrize("spec", [None, "dart(layer=2, keep=8, order='score')"])
def test_qwen25_prefill_attends_per_kv_head_without_building_a_mask(qwen25, spec):
    """As transformers runs an unpadded prompt: SDPA reads each layer's cached keys and values once per KV
    head (enable_gqa; no repeat_kv copy per query head), and nothing builds the (S, S) mask or kept rows of
    it (DART's signals read no mask; FastV's attention scores would). Prefill logits and 16 greedy tokens
    equal the independent reference (fp32, atol 1e-5)."""
    model, program = qwen25
    ex = family_zoo.example(model, batch=1, items=("image",), seed=41)
    pruned = gp.prune(model, spec, program=program)
    gm = pruned.executables["prefill"]
    cache = list(gm.graph.find_nodes(op="output")[0].args[0][1:])       # (k_0, v_0, k_1, ...) after the logits
    attention = [n for n in gm.graph.nodes if n.target is causal_or_masked_attention]
    assert [list(n.args[1:3]) for n in attention] == [cache[2 * i:2 * i + 2] for i in range(LAYERS)]
    assert all(n.kwargs["enable_gqa"] for n in attention)
    out, ops = prefill_ops(pruned, ex)
    heads, kv_heads = model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads
    assert kv_heads < heads
    assert ops.attention == [(heads, kv_heads, True, False)] * LAYERS
    lengths = {ex.input_ids.shape[1], out.kept.shape[1]}
    assert not [s for s in ops.outputs if len(s) >= 2 and s[-1] == s[-2] and s[-1] in lengths]
    emb, am, pos, vm = RF.family_inputs(model, ex)
    select = {} if spec is None else {2: D.dart_select(8)}
    ref = R.lm_generate(model, emb, am, pos, vision_mask=vm, selects=select, max_new_tokens=16)
    assert_same_run(pruned, ex, ref, 16, kept=ref["keep"])


def test_qwen25_left_padding_builds_the_mask(qwen25):
    """With left padding the grouped-query attention reads the mask, built in the graph: each sample of the
    batch equals itself alone (logits, 8 greedy tokens)."""
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image",), seed=42)
    pruned = gp.prune(model, program=program)
    _, ops = prefill_ops(pruned, ex)
    s = ex.input_ids.shape[1]
    assert (2, 1, s, s) in ops.outputs
    cfg = model.config.text_config
    assert ops.attention == [(cfg.num_attention_heads, cfg.num_key_value_heads, False, True)] * LAYERS
    assert_batch_equals_samples(pruned, ex)
