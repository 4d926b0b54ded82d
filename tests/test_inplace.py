"""graphprune.lower.inplace: a lowered prefill's elementwise ops write into an operand nothing else reads.

Against plain PyTorch: aten graphs traced (make_fx) from small functions, rewritten, give the functions'
outputs exactly and leave their inputs untouched; an op whose operand another op reads, an input, a
view, or an operand smaller than the output (a broadcast) stays out of place. On the tiny Qwen2.5-VL
the lowered prefill runs each layer's MLP activation and product in place (the ops a run calls) and
leaves its inputs as they were.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import graphprune as gp
from graphprune.lower.inplace import write_in_place
from graphprune.lower.runtime import StageCall
from graphprune.tools import family_zoo

aten = torch.ops.aten


def mlp(x, w, v):                        # both products fresh: the activation and the product in place
    return F.silu(F.linear(x, w)) * F.linear(x, v)


def gate_read_twice(x, w):               # the gate is read again: its activation allocates, the product need not
    g = F.linear(x, w)
    return F.silu(g) * g


def on_input(x):                         # an input is never written; the sum after it may be
    return F.silu(x) + 1


def on_view(x, w):                       # a view (the transpose) is never written
    return F.linear(x, w).t() * 2


def broadcast(x, w, b):                  # (1, n) + (4, n): the output is larger than the first operand
    return F.linear(x, w) + b


CASES = [(mlp, (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 8)), [aten.silu_.default, aten.mul_.Tensor]),
         (gate_read_twice, (torch.randn(3, 8), torch.randn(5, 8)), [aten.mul_.Tensor]),
         (on_input, (torch.randn(3, 8),), [aten.add_.Tensor]),
         (on_view, (torch.randn(3, 8), torch.randn(5, 8)), []),
         (broadcast, (torch.randn(1, 8), torch.randn(5, 8), torch.randn(4, 5)), [])]


@pytest.mark.parametrize("fn,args,in_place", CASES, ids=[c[0].__name__ for c in CASES])
def test_in_place_where_nothing_else_reads_the_operand(fn, args, in_place):
    gm = make_fx(fn)(*args)
    assert write_in_place(gm) == len(in_place)
    assert [n.target for n in gm.graph.nodes if str(n.target).endswith("_.default") or
            str(n.target).endswith("_.Tensor")] == in_place
    before = [a.clone() for a in args]
    torch.testing.assert_close(gm(*args), fn(*before), atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(args, before))


class OpCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("linear", ["aten", "packed"])
def test_qwen25_prefill_mlp_runs_in_place(linear):
    model = family_zoo.build("qwen2_5_vl")
    layers = model.config.text_config.num_hidden_layers
    ex = family_zoo.example(model, batch=1, items=("image",), seed=43)
    pruned = gp.prune(model, linear=linear)
    gm = pruned.executables["prefill"]
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    seen, calls = {}, OpCalls()

    def spy(*args):
        seen.update(zip(names, args))
        with calls:
            return gm(*args)
    pruned.executables["prefill"] = StageCall(gm, spy)
    out = pruned(**ex.as_kwargs())
    assert calls.ops.count(aten.silu_.default) == layers and aten.silu.default not in calls.ops
    kept = {k: v.clone() for k, v in seen.items() if isinstance(v, torch.Tensor)}
    gm(*[seen[n] for n in names])
    assert all(torch.equal(seen[k], v) for k, v in kept.items())         # the graph's inputs untouched
    torch.testing.assert_close(out.logits, model(**ex.as_kwargs()).logits, atol=1e-5, rtol=1e-5)
