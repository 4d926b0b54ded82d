"""Instrumenting a PrunedModel's stage graphs without touching it: shallow copies that time each
stage, replay the selection nodes through an fx Interpreter, run the same pruned computation
with every selection replaced by the output it recorded, or time the nodes that replacement
removes, one by one inside the real graphs (the cost of choosing, isolated).
"""
from __future__ import annotations

import time

import torch

from graphprune import tokenops
from graphprune.lower.runtime import StageCall
from graphprune.rewrite.apply import apply_choice_in_order

SELECTION_FNS = (tokenops.select_topk, tokenops.apply_choice, apply_choice_in_order, tokenops.withdraw_all,
                 tokenops.protect_topk)

def executed_graphs(pruned) -> dict:
    """{stage: the graph PrunedModel runs} for the vision and prefill stages (None: eager / absent)."""
    return dict(pruned.executables)


def with_proxies(pruned, make) -> object:
    """A shallow copy of a PrunedModel that runs `make(stage_name, gm)` in place of its vision and
    prefill graphs (the original, its program and its reports are untouched)."""
    import copy
    clone = copy.copy(pruned)
    clone.executables = {k: None if gm is None else make(k, gm) for k, gm in executed_graphs(pruned).items()}
    return clone


def timed(pruned) -> tuple[object, dict]:
    """(copy of pruned whose vision / prefill graphs add their run time to the dict, that dict)."""
    spent = {"vision": 0.0, "prefill": 0.0}

    def make(name, gm):
        def call(*args):
            t = time.perf_counter()
            out = gm(*args)
            spent[name] += time.perf_counter() - t
            return out
        return StageCall(gm, call)
    return with_proxies(pruned, make), spent


def record_selections(pruned, inputs: dict) -> dict:
    """Run pruned(**inputs) through an fx Interpreter and return {stage: [(node, args, output,
    kwargs of the pass's choose function or None)]} for every selection node (top-k / choose /
    withdraw / protect), in graph order, plus {"output": PrunedOutput}."""
    from torch import fx
    records = {"vision": [], "prefill": []}

    class Rec(fx.Interpreter):
        def __init__(self, gm, name):
            super().__init__(gm, garbage_collect_values=False)
            self.name = name

        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target in SELECTION_FNS:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                choice_kw = None
                if n.target in (tokenops.apply_choice, apply_choice_in_order) and isinstance(n.args[0], fx.Node):
                    choice_kw = self.fetch_args_kwargs_from_env(n.args[0])[1]
                records[self.name].append((n, args, out, choice_kw))
            return out

    clone = with_proxies(pruned, lambda name, gm: StageCall(gm, lambda *a, gm=gm, name=name: Rec(gm, name).run(*a)))
    records["output"] = clone(**inputs)
    return records


def fixed_selection(pruned, inputs: dict):
    """A copy of pruned whose selection nodes are replaced by the outputs they produced on
    `inputs` (constants of the same shapes), the scoring / signal nodes feeding only them removed:
    the same pruned computation without the cost of choosing. Valid for these inputs only."""
    from torch import fx
    records = record_selections(pruned, inputs)

    def make(name, gm):
        recs = records[name]
        if not recs:
            return gm
        new = fx.GraphModule(gm, gm.graph.__deepcopy__())
        new.meta.update(gm.meta)
        nodes = {n.name: n for n in new.graph.nodes}
        for i, (old, _, out, _) in enumerate(recs):
            n = nodes[old.name]
            consts = _as_consts(new, f"_fixed_{i}", out, n)
            if isinstance(out, torch.Tensor):
                n.replace_all_uses_with(consts)
            else:
                for user in list(n.users):
                    user.replace_all_uses_with(consts[user.args[1]])
                    new.graph.erase_node(user)
            new.graph.erase_node(n)
        new.graph.eliminate_dead_code()
        new.recompile()
        return new
    return with_proxies(pruned, make)


def _as_consts(gm, prefix, out, node):
    g = gm.graph
    with g.inserting_before(node):
        if isinstance(out, torch.Tensor):
            gm.register_buffer(prefix, out.clone())
            return g.get_attr(prefix)
        consts = []
        for j, t in enumerate(out):
            if isinstance(t, torch.Tensor):
                gm.register_buffer(f"{prefix}_{j}", t.clone())
                consts.append(g.get_attr(f"{prefix}_{j}"))
            else:
                consts.append(t)
        return consts


def choosing_nodes(pruned, inputs: dict) -> dict:
    """{stage: names of the nodes fixed_selection removes}: every selection node and the scoring /
    signal nodes that fed only them. What the pruned graphs spend on choosing, and nothing else."""
    fixed = executed_graphs(fixed_selection(pruned, inputs))
    return {k: {n.name for n in gm.graph.nodes} - {n.name for n in fixed[k].graph.nodes}
            for k, gm in executed_graphs(pruned).items() if gm is not None}


def timed_nodes(pruned, names: dict) -> tuple[object, dict]:
    """(copy of pruned whose stage graphs run through an fx Interpreter that adds the run time of
    the nodes named in names[stage] to the dict's "nodes", that dict)."""
    from torch import fx
    spent = {"nodes": 0.0}

    class Clock(fx.Interpreter):
        def __init__(self, gm, watch):
            super().__init__(gm)
            self.watch = watch

        def run_node(self, n):
            if n.name not in self.watch:
                return super().run_node(n)
            t = time.perf_counter()
            out = super().run_node(n)
            spent["nodes"] += time.perf_counter() - t
            return out

    def make(name, gm):
        watch = names.get(name, set())
        return StageCall(gm, lambda *a: Clock(gm, watch).run(*a)) if watch else gm
    return with_proxies(pruned, make), spent
