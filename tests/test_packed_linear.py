"""linear="packed" (oneDNN-packed weights, graphprune.targets.packed_linear): the same kept tokens,
prefill logits and greedy decodes as the independent reference (tests/reference.py), on every
stage it lowers (vision, prefill, decode, static-cache decode)."""
import copy

import pytest
import reference as R
import reference_dart as D
import torch
from test_methods import _check as check_cache
from test_passes import STEPS, _after_cls, _check

import graphprune as gp
from graphprune.errors import InputError
from graphprune.targets import packed_linear
from graphprune.targets.packed_linear import pack_linear_weights, packed_weight, packing_available
from graphprune.tools.zoo import llava_example, qwen2vl_example

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def pack_every_size(monkeypatch):
    """The tiny test models' weights are below the size where packing pays: pack them anyway, so
    that every lowered linear is the packed one under test."""
    monkeypatch.setattr(packed_linear, "MIN_ELEMENTS", 0)


def _linears(gm):
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return (sum(t is torch.ops.aten.linear.default for t in targets),
            sum(t is torch.ops.mkldnn._linear_pointwise.default for t in targets))


def test_every_stage_runs_packed_weights(llava):
    model, program = llava
    pruned = gp.prune(model, "cls_topk(keep=18) | fastv(layer=2, keep=6)", program=program, linear="packed")
    total = 0
    for name, gm in [*pruned.executables.items(), ("decode", pruned.decode_exec)]:
        aten, packed = _linears(gm)
        assert aten == 0 and packed > 0, f"{name}: {aten} aten linears left, {packed} packed"
        total += packed
    assert pruned.packed_linears == total
    # what reports and exports read stays as rewritten
    assert _linears(pruned.program.stages["prefill"].gm)[1] == 0 and _linears(pruned.decode_gm)[1] == 0
    other = gp.prune(model, "vtw(layer=2)", program=program, linear="packed")     # one packed copy per weight
    assert other.executables["prefill"]._packed_linear_0 is pruned.executables["prefill"]._packed_linear_0


def test_vision_then_llm_matches_reference(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3))
    pruned = gp.prune(model, "cls_topk(keep=18) | fastv(layer=2, keep=6)", program=program, linear="packed")
    emb, am, pos, vm = R.llava_inputs(model, ex, cls_keep=18)
    ref = R.lm_generate(model, emb, am, pos, select=R.fastv_select(6), select_layer=2, max_new_tokens=STEPS,
                        vision_mask=vm)
    _check(pruned, ex, ref, prompt_index=_after_cls(model, ex, 18))


@pytest.mark.parametrize("method,opts,select,layer", [
    ("fastv", dict(layer=2, keep=9), lambda: R.fastv_select(9), 2),
    ("vtw", dict(layer=2), R.vtw_select, 2),
])
def test_llm_passes_match_reference(llava, method, opts, select, layer):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=2)
    emb, am, pos, vm = R.llava_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, select=select(), select_layer=layer, max_new_tokens=STEPS, vision_mask=vm)
    _check(gp.prune(model, method, program=program, linear="packed", **opts), ex, ref)


def test_dart_per_layer_caches_match_reference(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=2)
    emb, am, pos, vm = R.llava_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, selects={2: D.dart_select(9, criterion="attn_min")},
                        max_new_tokens=STEPS, vision_mask=vm)
    check_cache(gp.prune(model, "dart", keep=9, layer=2, criterion="attn_min", order="score", program=program,
                         linear="packed"),
                ex, ref)


def test_qwen2vl_fastv_matches_reference(qwen):
    model, program = qwen
    ex = qwen2vl_example(model, batch=2, pad=(0, 2))
    emb, am, pos, vm = R.qwen2vl_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, select=R.fastv_select(5), select_layer=2, max_new_tokens=STEPS,
                        vision_mask=vm)
    _check(gp.prune(model, "fastv", layer=2, keep=5, program=program, linear="packed"), ex, ref)


def test_static_cache_decode_matches_reference(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=2)
    emb, am, pos, vm = R.llava_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, select=R.fastv_select(9), select_layer=2, max_new_tokens=STEPS,
                        vision_mask=vm)
    pruned = gp.prune(model, "fastv", layer=2, keep=9, program=program, linear="packed")
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[], static_cache=True)
    assert torch.equal(ids[:, -STEPS:], ref["tokens"])


def test_pack_leaves_non_constant_and_non_float32_weights():
    """Only float32 constant weights are packed; a weight computed in the graph stays on aten."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8, bias=False).double()

        def forward(self, x):
            y = self.a(x)
            z = torch.nn.functional.linear(y, self.a.weight * 2)           # computed weight
            return z, self.b(x.double())
    m = M().eval()
    x = torch.randn(3, 8)
    gm = torch.export.export(m, (x,)).module()
    gm = torch.fx.GraphModule(gm, gm.graph)
    want = m(x)
    assert pack_linear_weights(gm) == 1
    assert _linears(gm) == (2, 1)
    with torch.no_grad():
        got = gm(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_packed_is_refused_where_it_cannot_run(llava):
    model, program = llava
    with pytest.raises(InputError, match='linear must be "aten" or "packed"'):
        gp.prune(model, "fastv(layer=2, keep=9)", program=program, linear="mkl")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)          # a copy: the fixture's model stays float32
    with pytest.raises(InputError, match="float32 CPU weights.*bfloat16"):
        gp.prune(bf16, "fastv(layer=2, keep=9)", linear="packed")


def test_packed_copies_are_shared_and_follow_in_place_updates():
    lin = torch.nn.Linear(16, 8)
    first, again = packed_weight(lin.weight), packed_weight(lin.weight)
    assert first is again                                 # one packed copy per weight, however many graphs
    x = torch.randn(4, 16)
    with torch.no_grad():
        lin.weight.mul_(-1)                               # changed in place: packed again
        got = torch.ops.mkldnn._linear_pointwise(x, packed_weight(lin.weight), None, "none", [], "")
    assert packed_weight(lin.weight) is not first
    torch.testing.assert_close(got, x @ lin.weight.detach().T, atol=1e-5, rtol=1e-5)


def test_packed_copies_die_with_the_graphs_that_hold_them():
    import gc
    import weakref
    lin = torch.nn.Linear(16, 8)
    ref = weakref.ref(packed_weight(lin.weight))
    gc.collect()
    assert ref() is None                                  # nothing held it: not kept alive by the cache


def test_small_weights_stay_on_aten(monkeypatch):
    monkeypatch.setattr(packed_linear, "MIN_ELEMENTS", 1 << 17)
    m = torch.nn.Sequential(torch.nn.Linear(64, 192), torch.nn.Linear(192, 1024)).eval()    # 12288, 196608
    gm = torch.export.export(m, (torch.randn(2, 64),)).module()
    gm = torch.fx.GraphModule(gm, gm.graph)
    assert pack_linear_weights(gm) == 1 and _linears(gm) == (1, 1)


def test_a_model_too_small_to_pack_says_so(llava, monkeypatch):
    monkeypatch.setattr(packed_linear, "MIN_ELEMENTS", 1 << 17)
    model, program = llava
    with pytest.warns(RuntimeWarning, match="no linear weight of this model"):
        pruned = gp.prune(model, "fastv(layer=2, keep=9)", program=program, linear="packed")
    assert pruned.packed_linears == 0


def test_inductor_kernel_equals_aten_linear_at_any_row_count():
    """for_inductor: the packed weights behind graphprune::packed_linear, compiled by Inductor with
    dynamic shapes; every row count (a new one does not recompile the kernel choice) equals aten."""
    lin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False)).eval()
    x = torch.randn(2, 5, 16)
    gm = torch.export.export(lin, (x,), dynamic_shapes=({1: torch.export.Dim("s")},)).module()
    gm = torch.fx.GraphModule(gm, gm.graph)
    assert pack_linear_weights(gm, for_inductor=True) == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.graphprune.packed_linear.default in targets and torch.ops.aten.linear.default not in targets
    compiled = torch.compile(gm, backend="inductor", dynamic=True)
    with torch.no_grad():
        for rows in (5, 1, 9):
            xs = torch.randn(2, rows, 16)
            torch.testing.assert_close(compiled(xs), lin(xs), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compile_backend_with_packed_linears_equals_prune(llava):
    """torch.compile(..., options={"linear": "packed"}): the rewritten prefill's linears packed, as opaque
    kernels under Inductor, logits as graphprune.prune's."""
    model, _ = llava
    batch = llava_example(model, batch=2).as_kwargs()
    pipeline = "fastv(layer=2, keep=8)"
    want = gp.prune(model, pipeline)(**batch).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="graphprune",
                             options={"pipeline": pipeline, "compiler": "inductor", "linear": "packed"})
    with torch.no_grad():
        got = compiled(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    from graphprune.targets.dynamo import pruned_graphs
    kernel = torch.ops.graphprune.packed_linear.default
    assert any(n.target is kernel for gm in pruned_graphs(model) for n in gm.graph.nodes)
    torch._dynamo.reset()



@pytest.mark.slow
def test_compile_backend_packs_every_frame_and_follows_the_weights_it_is_handed():
    """linear="packed" packs the linears of every frame the backend compiles (vision tower, projector,
    head), as graphprune.prune packs every stage. Dynamo lifts parameters to frame inputs and reuses a
    frame for another model of the same class, and weights change in place: each call runs the
    weights it is handed. Logits as graphprune.prune's for two models through the same frames, and
    after an in-place update."""
    from graphprune.tools.zoo import tiny_llava
    pipeline = "fastv(layer=2, keep=8)"
    first, second = tiny_llava(seed=0), tiny_llava(seed=1)
    batch = llava_example(first, batch=1, seed=5).as_kwargs()
    torch._dynamo.reset()
    before = set(packed_linear._TWINS)
    # compiler="eager": the frames' graphs run as rewritten (Inductor runs the same kernel:
    # test_compile_backend_with_packed_linears_equals_prune)
    options = {"pipeline": pipeline, "compiler": "eager", "linear": "packed"}
    with torch.no_grad():
        for model in (first, second):
            got = torch.compile(model, backend="graphprune", options=options)(**batch).logits
            torch.testing.assert_close(got, gp.prune(model, pipeline)(**batch).logits, atol=1e-5, rtol=1e-5)
        frames = [packed_linear._TWINS[k] for k in set(packed_linear._TWINS) - before]
        # the tiny vision tower's 3 layers x 6 linears, the projector's 2, the head
        assert sum(t.follows for t in frames) >= 3 * 6 + 2 + 1
        fc1 = next(m for name, m in first.named_modules() if "vision_tower" in name and name.endswith("mlp.fc1"))
        fc1.weight.mul_(1.5)
        got = torch.compile(first, backend="graphprune", options=options)(**batch).logits
        want = gp.prune(copy.deepcopy(first), pipeline)(**batch).logits     # a copy captures the new weights
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
