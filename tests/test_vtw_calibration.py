"""VTW's choice of K: the first layer whose mean KL(P_withdrawn || P_full) is <= eta (reference: paper Sec. 4)."""
import pytest
import reference as R

from graphprune.tools.vtw_calibration import calibrate
from graphprune.tools.zoo import llava_example


def test_calibration_matches_reference(llava):
    model, program = llava
    samples = [llava_example(model, seed=s) for s in range(3)]
    ref = {}
    for k in (1, 2, 3):
        kls = []
        for ex in samples:
            emb, am, pos, vm = R.llava_inputs(model, ex)
            full = R.lm_generate(model, emb, am, pos, max_new_tokens=1)["prefill_logits"][:, -1]
            wd = R.lm_generate(model, emb, am, pos, select=R.vtw_select(), select_layer=k, max_new_tokens=1,
                               vision_mask=vm)["prefill_logits"][:, -1]
            kls.append(R.vtw_kl(full, wd))
        ref[k] = sum(kls) / len(kls)
    inputs = [ex.as_kwargs() for ex in samples]
    got = calibrate(model, inputs, eta=float("inf"), first=1, program=program)
    assert got["layer"] == 1
    got = calibrate(model, inputs, eta=-1.0, first=1, program=program)
    assert got["layer"] is None
    for k in ref:
        assert got["kl"][k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6)
    eta = sorted(ref.values())[1]
    expect = next(k for k in (1, 2, 3) if ref[k] <= eta)
    assert calibrate(model, inputs, eta=eta * (1 + 1e-6), first=1, program=program)["layer"] == expect
