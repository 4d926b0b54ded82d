"""Smoke test of examples/train_vqa_model.py: a few steps on a tiny config, save, reload."""
import importlib.util
import json
import math
import os

import torch

from graphprune.tools import vqa

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "train_vqa_model.py")


def _load():
    spec = importlib.util.spec_from_file_location("train_vqa_model", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_save_reload(tmp_path):
    from transformers import LlavaForConditionalGeneration

    T = _load()
    vocab = vqa.Vocab()
    samples = vqa.generate("train", 4)
    cfg = T.CONFIGS["tiny"]
    n_img = (cfg["image_size"] // cfg["patch"]) ** 2
    batch = T.make_batch(samples, vocab, n_img, cfg["image_size"])

    # the same init as train() builds, to measure the loss on the batch before training
    with torch.no_grad():
        before = T.batch_loss(T.build_model(cfg, seed=0, vocab=vocab).train(), batch, vocab)[0].item()
    model, hist = T.train(cfg, steps=12, batch_size=4, lr=3e-3, warmup=2, samples=samples,
                          eval_n=0, log_every=4, log=lambda m: None)
    with torch.no_grad():
        after = T.batch_loss(model, batch, vocab)[0].item()
    assert after < before - 0.5, (before, after)
    assert hist["steps"] == 12 and len(hist["train"]) == 3

    cfgm = model.config
    assert cfgm.image_token_id == vocab.image_id
    assert cfgm.text_config.vocab_size == len(vocab)
    assert cfgm.text_config.num_hidden_layers == 8
    assert cfgm.vision_feature_layer == -2 and cfgm.vision_feature_select_strategy == "default"

    out = tmp_path / "m"
    T.save(model, str(out), hist)
    assert (out / "model.safetensors").exists()
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["special"]["image"] == vocab.image_id and len(meta["vocab"]) == len(vocab)

    # use_kernels=False: the model's own modules (transformers 5.25 swaps in hub kernels by default)
    loaded = LlavaForConditionalGeneration.from_pretrained(str(out), use_kernels=False).eval()
    with torch.no_grad():
        ref = T._forward(model, batch, keep=3)
        got = T._forward(loaded, batch, keep=3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    acc = T.evaluate(loaded, samples, vocab)
    assert 0.0 <= acc["all"] <= 1.0 and set(acc) == {s.qtype for s in samples} | {"all"}


def test_packed_batch_matches_single_prompts():
    """Several questions packed after one image prefix give exactly the logits of the plain prompts."""
    T = _load()
    vocab = vqa.Vocab()
    cfg = T.CONFIGS["tiny"]
    n_img = (cfg["image_size"] // cfg["patch"]) ** 2
    samples = vqa.generate("train", 2)
    model = T.build_model(cfg, seed=0, vocab=vocab).eval()
    b = T.make_packed_batch(samples, vocab, 4, 0, n_img, cfg["image_size"], grid=cfg["image_size"] // cfg["patch"])
    assert len(b["answers"]) == 8 and b["labels"]["kind"].shape == (2, n_img)
    with torch.no_grad():
        got = T.packed_forward(model, b)[0][:, 0]
        ref = []
        for s in samples:
            qs = T.questions_for(s, 4)
            fake = [vqa.Sample(s.image, q, a, qt, s.scene, (), s.uid) for q, a, qt, _ in qs]
            ref.append(T._forward(model, T.make_batch(fake, vocab, n_img, cfg["image_size"], with_target=False), keep=1)[:, -1])
    torch.testing.assert_close(got, torch.cat(ref), rtol=1e-4, atol=1e-5)


def test_scene_questions_agree_with_generator():
    """Extra questions are answered from the scene graph the same way the generator answers."""
    T = _load()
    for s in vqa.generate("train", 40):
        qs = T.questions_for(s, 8)
        assert qs[0][:3] == (s.question, s.answer, s.qtype) and len({q[0] for q in qs}) == len(qs)
        pool = T.scene_questions(s.scene, __import__("random").Random(0))
        if s.qtype in ("color", "count", "read"):          # same answer, same objects in focus
            assert (s.question, s.answer, qs[0][3]) in pool[s.qtype]
        for q, a, qt, _ in qs:
            vqa.Vocab().answer_id(a)
            assert qt in vqa.QTYPES


def test_patch_labels_and_vision_phase():
    T = _load()
    s = vqa.sample_at("train", 3)
    lab = T.patch_labels(s.scene)
    for obj in s.scene.shapes:
        own = T.patch_labels(s.scene)["kind"]
        assert any(own[p] == 1 + vqa.KINDS.index(obj.kind) for p in vqa.object_patches(obj))
    assert (lab["kind"] > 0).sum() <= sum(len(vqa.object_patches(o)) for o in (*s.scene.shapes, *s.scene.texts))
    assert int((lab["centre"] > 0).sum()) == len(s.scene.shapes) + len(s.scene.texts)
    model, hist = T.train("tiny", steps=3, batch_size=2, lr=3e-3, warmup=1, samples=vqa.generate("train", 4),
                          eval_n=0, log_every=1, questions=3, aux_weight=0.3, vision_steps=2, vision_batch=2,
                          log=lambda m: None)
    assert len(hist["vision"]) == 2 and hist["steps"] == 3


def test_patch_dropout_runs_the_tower_on_a_subset():
    """Phase 1's patch dropout: all patches in order is the plain vision tower; a subset is the same
    tower on fewer tokens, so its outputs follow a permutation of that subset; the subset holds
    every object patch and its neighbours first."""
    T = _load()
    cfg = dict(T.CONFIGS["tiny"], image_size=112)                       # 8 x 8 patch grid
    model = T.build_model(cfg, seed=0).eval()
    samples = vqa.generate("train", 2)
    px = torch.stack([T._pixels(s, 112) for s in samples])
    with torch.no_grad():
        full = model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        every = T.vision_features(model, px, torch.arange(64).expand(2, -1))
        torch.testing.assert_close(T.vision_features(model, px), full)
        torch.testing.assert_close(every, full, rtol=1e-5, atol=1e-5)
        sub = torch.stack([torch.randperm(64)[:20] for _ in range(2)])
        perm = torch.stack([torch.randperm(20) for _ in range(2)])
        a = T.vision_features(model, px, sub)
        b = T.vision_features(model, px, sub.gather(1, perm))
        torch.testing.assert_close(b, a.gather(1, perm[..., None].expand_as(a)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, full.gather(1, sub[..., None].expand_as(a)), atol=1e-3)   # fewer tokens attend

    labels = T.stack_labels(samples, 8)
    obj = (labels["kind"] > 0).view(2, 8, 8)
    near = torch.zeros_like(obj)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            shifted = torch.zeros_like(obj)
            shifted[:, max(dr, 0):8 + min(dr, 0), max(dc, 0):8 + min(dc, 0)] = \
                obj[:, max(-dr, 0):8 + min(-dr, 0), max(-dc, 0):8 + min(-dc, 0)]
            near |= shifted
    for k in (int(near.flatten(1).sum(1).max()), 64):
        idx = T.dropout_patches(labels, k, 8)
        assert idx.shape == (2, k)
        for b in range(2):
            assert len(set(idx[b].tolist())) == k
            assert set(near[b].flatten().nonzero().flatten().tolist()) <= set(idx[b].tolist())


def test_sincos_position_init():
    T = _load()
    model = T.build_model(T.CONFIGS["tiny"], seed=0)
    T.sincos_positions(model)
    vt = model.model.vision_tower
    w = getattr(vt, "vision_model", vt).embeddings.position_embedding.weight
    g = 4
    d = w.shape[1] // 4
    assert torch.all(w[0] == 0)
    for p in range(g * g):                                            # patch p = (row, col)
        r, c = divmod(p, g)
        freq = 1.0 / 100 ** (torch.arange(d) / d)
        torch.testing.assert_close(w[1 + p, :d], 0.5 * torch.sin(c * freq))
        torch.testing.assert_close(w[1 + p, 3 * d:4 * d], 0.5 * torch.cos(r * freq))


def test_lm_token_dropout_is_the_prompt_without_those_tokens():
    """Phase 2's image-token dropout: the LM over K of the N image tokens (original positions) gives
    the logits of the full prompt's embeddings with the other N - K image rows deleted, built here
    from Hugging Face's own image merge; all N in order is the unpruned packed forward."""
    T = _load()
    vocab = vqa.Vocab()
    cfg = dict(T.CONFIGS["tiny"], image_size=112)                       # 8 x 8 patch grid
    n_img = 64
    samples = vqa.generate("train", 2)
    model = T.build_model(cfg, seed=0, vocab=vocab).eval()
    T.init_attention(model, 0.25)                                        # sharp attention: positions matter
    b = T.make_packed_batch(samples, vocab, 3, 0, n_img, 112, grid=8)
    with torch.no_grad():
        full = T.packed_forward(model, b)[0]
        torch.testing.assert_close(T.packed_forward(model, b, torch.arange(n_img).expand(2, -1))[0], full)
        keep = T.lm_patches(b["labels"], 20, 8)
        assert T.lm_patches(b["labels"], 64, 8) is None
        assert keep.shape == (2, 20) and torch.all(keep[:, 1:] > keep[:, :-1])
        got = T.packed_forward(model, b, keep)[0][:, 0]
        assert not torch.allclose(got, full[:, 0], atol=1e-3)
        ref = []
        for i, s in enumerate(samples):
            for q, a, qt, _ in T.questions_for(s, 3):
                one = T.make_batch([vqa.Sample(s.image, q, a, qt, s.scene, (), s.uid)], vocab, n_img, 112,
                                   with_target=False)
                ids = one["input_ids"][0]
                emb = model.model.get_input_embeddings()(ids)[None]
                img = model.model.get_image_features(pixel_values=one["pixel_values"],
                                                     vision_feature_layer=-2,
                                                     vision_feature_select_strategy="default")
                img = getattr(img, "pooler_output", img)
                img = torch.cat(list(img), 0) if isinstance(img, (list, tuple)) else img
                mask = (ids == vocab.image_id)[None, :, None].expand_as(emb)
                emb = emb.masked_scatter(mask, img.reshape(-1, emb.shape[-1]))
                image_pos = (ids == vocab.image_id).nonzero().flatten()
                drop = set(image_pos[torch.tensor([p for p in range(n_img) if p not in keep[i].tolist()])].tolist())
                rows = torch.tensor([p for p in range(len(ids)) if p not in drop])
                h = model.model.language_model(inputs_embeds=emb[:, rows], position_ids=rows[None]).last_hidden_state
                ref.append(model.lm_head(h[:, -1]).float())
        torch.testing.assert_close(got, torch.cat(ref), rtol=1e-4, atol=1e-5)


def test_projector_phase_frozen_tower_and_qk_init():
    """Phase 1b trains the projector alone; a frozen tower does not move in phase 2; the q/k re-draw
    has the asked-for scale."""
    T = _load()
    model = T.build_model(T.CONFIGS["tiny"], seed=0)
    T.init_attention(model, 0.3, seed=1)
    for n, w in model.model.language_model.named_parameters():
        if n.endswith(("q_proj.weight", "k_proj.weight")):
            assert abs(w.std().item() - 0.3) < 0.06
    torch.manual_seed(0)
    ref = T.build_model(T.CONFIGS["tiny"], seed=0)
    model, hist = T.train("tiny", steps=3, batch_size=2, lr=3e-3, warmup=1, samples=vqa.generate("train", 4),
                          eval_n=0, log_every=1, questions=3, vision_steps=2, vision_batch=2, proj_steps=2,
                          freeze_vision=True, lm_keep=4, qk_std=0.2, log=lambda m: None)
    assert len(hist["projector"]) == 2 and hist["steps"] == 3 and hist["lm_keep"] == 4
    again, _ = T.train("tiny", steps=0, batch_size=2, lr=3e-3, samples=vqa.generate("train", 4), eval_n=0,
                       vision_steps=2, vision_batch=2, log=lambda m: None)
    for (n, a), b in zip(model.model.vision_tower.named_parameters(), again.model.vision_tower.parameters()):
        torch.testing.assert_close(a, b, msg=n)                          # phase 2 left the tower alone
    moved = [not torch.equal(a, b) for a, b in zip(model.model.multi_modal_projector.parameters(),
                                                    ref.model.multi_modal_projector.parameters())]
    assert all(moved)


def test_balanced_loss_gives_each_question_type_the_same_share():
    T = _load()
    vocab = vqa.Vocab()
    cfg = T.CONFIGS["tiny"]
    model = T.build_model(cfg, seed=0, vocab=vocab).eval()
    b = T.make_packed_batch(vqa.generate("train", 3), vocab, 6, 0, 16, cfg["image_size"])
    assert len(set(b["qtypes"])) >= 3 and len(set(b["qtypes"].count(t) for t in b["qtypes"])) > 1
    with torch.no_grad():
        logits = T.packed_forward(model, b)[0]
        eos = torch.nn.functional.cross_entropy(logits[:, 1], torch.full_like(b["answers"], vocab.eos_id))
        by_type = {}
        for i, t in enumerate(b["qtypes"]):
            by_type.setdefault(t, []).append(torch.nn.functional.cross_entropy(logits[i:i + 1, 0], b["answers"][i:i + 1]))
        ref = sum(sum(v) / len(v) for v in by_type.values()) / len(by_type) + 0.25 * eos
        plain = torch.nn.functional.cross_entropy(logits[:, 0], b["answers"]) + 0.25 * eos
        torch.testing.assert_close(T.packed_loss(model, b, vocab, balance_types=True)[0], ref)
        torch.testing.assert_close(T.packed_loss(model, b, vocab)[0], plain)
        # relative shares: type t's questions together weigh share[t] / sum of the present shares
        share = {t: 1.0 + i for i, t in enumerate(sorted(by_type))}
        tilted = sum(share[t] * sum(v) / len(v) for t, v in by_type.items()) / sum(share.values()) + 0.25 * eos
        torch.testing.assert_close(T.packed_loss(model, b, vocab, balance_types=share)[0], tilted)


def test_projector_aux_loss_reads_the_lm_input_of_the_kept_tokens():
    """Phase 2's projector-output loss: the per-patch labels of exactly the image tokens the LM sees,
    read from Hugging Face's own projected image features (the LM's input) at those patches."""
    T = _load()
    vocab = vqa.Vocab()
    cfg = dict(T.CONFIGS["tiny"], image_size=112)                       # 8 x 8 patch grid
    model = T.build_model(cfg, seed=0, vocab=vocab).eval()
    b = T.make_packed_batch(vqa.generate("train", 2), vocab, 3, 0, 64, 112, grid=8)
    head = T.AuxHead(cfg["hidden"], norm=False)
    keep = T.lm_patches(b["labels"], 20, 8)
    with torch.no_grad():
        base = T.packed_loss(model, b, vocab, patches=keep)[0]
        got, _, accs = T.packed_loss(model, b, vocab, patches=keep, proj_head=head, proj_aux_weight=0.5)
        img = model.model.get_image_features(pixel_values=b["pixel_values"], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default")
        img = getattr(img, "pooler_output", img)
        img = torch.stack(list(img)) if isinstance(img, (list, tuple)) else img
        rows = torch.arange(2)[:, None]
        labels = {k: v[rows, keep] for k, v in b["labels"].items()}
        ref = base + 0.5 * T.aux_loss(head(img.reshape(2, 64, -1)[rows, keep]), labels)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert set(accs) == set(T.AUX_HEADS)
    with __import__("pytest").raises(ValueError, match="proj_steps"):
        T.train("tiny", steps=1, samples=vqa.generate("train", 2), eval_n=0, proj_aux_weight=1.0, log=lambda m: None)


def test_question_form_names_the_template_each_answer_comes_from():
    T = _load()
    samples = vqa.generate("test", 300)
    answers = {"position/which": set(vqa.KINDS), "position/horizontal": {"left", "right"},
               "position/vertical": {"above", "below"}}
    forms = {}
    for s in samples:
        f = T.question_form(s)
        forms.setdefault(f, []).append(s)
        if s.qtype == "count":
            assert f == f"count/{s.answer}"
        elif s.qtype != "position":
            assert f == s.qtype
    assert set(answers) <= set(forms) and "position" not in forms
    for f, allowed in answers.items():
        assert {s.answer for s in forms[f]} <= allowed, f


def test_attention_probe_is_hugging_face_eager_attention():
    """The answer position's attention that `attention_loss` supervises, recomputed from q_proj and the
    cached keys inside the packed forward, equals the row Hugging Face's eager attention returns for
    the single prompt (output_attentions), with and without image-token dropout zeroing nothing else."""
    T = _load()
    vocab = vqa.Vocab()
    cfg = dict(T.CONFIGS["tiny"], image_size=112, heads=4, kv_heads=2)   # grouped-query, 8 x 8 grid
    model = T.build_model(cfg, seed=0, vocab=vocab).eval()
    T.init_attention(model, 0.25)
    samples = vqa.generate("train", 2)
    b = T.make_packed_batch(samples, vocab, 4, 0, 64, 112, grid=8)
    P, layer = b["prefix_ids"].shape[1], 3
    with torch.no_grad():
        attn = T.packed_forward(model, b, attn_layer=layer)[3]
        model.set_attn_implementation("eager")
        qi = 0
        for s in samples:
            for q, a, qt, _ in T.questions_for(s, 4):
                one = T.make_batch([vqa.Sample(s.image, q, a, qt, s.scene, (), s.uid)], vocab, 64, 112,
                                   with_target=False)
                row = model(**one, output_attentions=True).attentions[layer][0, :, -1]
                n = P + int(b["ans_pos"][qi]) + 1
                assert row.shape[-1] == n
                torch.testing.assert_close(attn[qi, :, :n], row, rtol=1e-4, atol=1e-6)
                assert attn[qi, :, n:].abs().max() == 0                 # later segment tokens: masked
                qi += 1
    assert qi == len(b["answers"])


def test_attention_targets_name_the_questions_objects_and_the_loss_is_the_formula():
    """Focus masks against the scene graph (the objects the question's words name; one centre
    patch per instance counted), and the loss against its definition on the probed attention."""
    T = _load()
    vocab = vqa.Vocab()
    cfg = dict(T.CONFIGS["tiny"], image_size=112, heads=4, kv_heads=2)
    model = T.build_model(cfg, seed=0, vocab=vocab).eval()
    samples = vqa.generate("train", 6)
    b = T.make_packed_batch(samples, vocab, 8, 0, 64, 112, grid=8)
    qi, seen = 0, set()
    for s in samples:
        objs = [*s.scene.shapes, *s.scene.texts]
        for q, a, qt, (first, second, counted) in T.questions_for(s, 8):
            f = b["focus"][qi]
            for slot, ids in ((0, first), (1, second)):
                want = set()
                for i in ids:                                  # patches the object covers, 8 x 8 grid
                    x0, y0, x1, y1 = objs[i].bbox
                    want |= {r * 8 + c for r in range(y0 // 42, (y1 - 1) // 42 + 1)
                             for c in range(x0 // 42, (x1 - 1) // 42 + 1)}
                assert set(f[slot].nonzero().flatten().tolist()) <= want and f[slot].any() == bool(ids)
            if qt == "count":
                assert len(counted) == int(a) and int(f[2].sum()) == int(a)
            elif qt == "position":
                seen.add(qt)
                assert len(first) == len(second) == 1
                words = q.rstrip("?").split()
                if words[0] == "what":                          # what shape is left of the REF? -> the answer
                    assert objs[first[0]].kind == words[-1] and objs[second[0]].kind == a
                else:                                           # is the A left or right of the B?
                    assert objs[first[0]].kind in words[:words.index("or")] and objs[second[0]].kind == words[-1]
            elif qt in ("color", "read"):
                assert len(first) == 1 and not second and not counted
            qi += 1
    assert "position" in seen and b["is_count"].sum() > 0
    keep = T.lm_patches(b["labels"], 40, 8)
    with torch.no_grad():
        attn = T.packed_forward(model, b, keep, attn_layer=2)[3]
        got, mass = T.attention_loss(attn, b, keep)
    t = b["prefix_ids"].shape[1] - 64
    ref, parts = 0.0, {}
    for qi in range(len(b["answers"])):
        kept = keep[b["img_of"][qi]].tolist()
        for name, slot, head in (("attn_first", 0, 0), ("attn_second", 1, 2)):
            on = [j for j, p in enumerate(kept) if b["focus"][qi, slot, p]]
            if b["focus"][qi, slot].any():
                parts.setdefault(name, []).append(float(sum(attn[qi, head, t + j] for j in on)))
        if b["is_count"][qi]:
            keys = [0] + [t + j for j, p in enumerate(kept) if b["focus"][qi, 2, p]]
            parts.setdefault("count", []).append(-sum(math.log(float(attn[qi, 3, k])) for k in keys) / len(keys))
    for name in ("attn_first", "attn_second"):
        ref += sum(-math.log(max(m, 1e-6)) for m in parts[name]) / len(parts[name])
        assert abs(mass[name] - sum(parts[name]) / len(parts[name])) < 1e-5
    ref += sum(parts["count"]) / len(parts["count"])
    assert abs(float(got) - ref) < 1e-4 * max(1.0, ref)
    with __import__("pytest").raises(SystemExit):                      # refused before any work
        T.main(["--config", "tiny", "--steps", "1", "--attn-weight", "1", "--attn-layer", "8"])
    with __import__("pytest").raises(ValueError, match="attn_layer 8"):
        T.train("tiny", steps=1, samples=vqa.generate("train", 2), eval_n=0, attn_weight=1.0, attn_layer=8,
                log=lambda m: None)
