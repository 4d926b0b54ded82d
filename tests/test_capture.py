"""Capture keeps in-place writes, and every captured stage is checked against the eager model
before any pass runs (a wrong graph stops prune() with the stage and the difference)."""
import pytest
import torch
from torch import fx, nn

import graphprune as gp
from graphprune.capture.export import Stage, plain_graph_module
from graphprune.errors import GraphVerificationError
from graphprune.rewrite.pipeline import Program
from graphprune.tools.zoo import tiny_llava, tiny_qwen2vl
from graphprune.verify.eager import check_against_eager


class SectionWrites(nn.Module):
    """Writes sections of a buffer in place through views (as interleaved M-RoPE does)."""

    def forward(self, x, y):
        t = x.clone()
        t[:, 0].copy_(y)
        t[:, 1] += 1
        return t * 2


def _toy_stage(dead_code_rule=None):
    x, y = torch.randn(3, 4), torch.randn(3)
    ep = torch.export.export(SectionWrites(), (x, y), strict=False)
    gm = plain_graph_module(ep)
    if dead_code_rule is not None:              # the rule capture used to apply
        gm.graph.eliminate_dead_code(is_impure_node=dead_code_rule)
        gm.recompile()
    gm.meta["graphprune_outputs"] = ["out"]
    return Stage("prefill", gm, ["x", "y"], module=SectionWrites(), check_inputs=(torch.randn(3, 4), torch.randn(3)))


def test_in_place_writes_survive_capture():
    stage = _toy_stage()
    x, y = stage.check_inputs
    assert torch.equal(stage.gm(x, y)[0], SectionWrites()(x, y))
    assert any(n.target == torch.ops.aten.copy_.default for n in stage.gm.graph.nodes)


def test_verification_catches_a_graph_that_lost_its_in_place_writes():
    stage = _toy_stage(dead_code_rule=lambda n: n.op in ("placeholder", "output"))
    with pytest.raises(GraphVerificationError, match=r"captured prefill graph does not reproduce.*out differs"):
        check_against_eager(stage, "SectionWrites")


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2vl], ids=["llava", "qwen2_vl"])
def test_captured_stages_match_eager(build):
    program = Program.capture(build())
    for name, stage in program.stages.items():
        if stage.gm is None:
            continue
        assert stage.check_inputs is not None, name
        assert check_against_eager(stage) <= 1e-4


def _scale_rotary(gm: fx.GraphModule, factor: float) -> None:
    """Corrupt the captured prefill: scale the rotary cos table (as a wrong capture might)."""
    cos = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.cos.default)
    with gm.graph.inserting_after(cos):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (cos, factor))
    cos.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    gm.recompile()


def test_prune_refuses_a_capture_that_differs_from_eager(monkeypatch):
    from graphprune.capture import export
    real = export.capture_prefill

    def wrong_prefill(family, **kw):
        stage = real(family, **kw)
        _scale_rotary(stage.gm, 1.01)
        return stage

    monkeypatch.setattr(export, "capture_prefill", wrong_prefill)
    with pytest.raises(GraphVerificationError, match=r"captured prefill graph does not reproduce.*logits differs"):
        gp.prune(tiny_llava(), "fastv(layer=2, keep=8)")


def test_meta_models_are_captured_without_a_check():
    with torch.device("meta"):
        model = tiny_llava()
    program = Program.capture(model, stages=("prefill",))
    assert program.stages["prefill"].check_inputs is None
