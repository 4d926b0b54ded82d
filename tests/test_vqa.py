"""Synthetic VQA generator: determinism, answerability (re-derived independently), balance,
geometry, relevant patches, vocabulary and prompt layout."""
import collections
import hashlib
import itertools
import re

import pytest
import torch

from graphprune.tools import vqa

N = 250                                  # samples per check; generating them takes well under 1 s


@pytest.fixture(scope="module")
def train():
    return vqa.generate("train", N, seed=0)


@pytest.fixture(scope="module")
def vocab():
    return vqa.Vocab()


def _digest(sample):
    return hashlib.sha256(sample.image.numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_samples(train):
    again = vqa.generate("train", 40, seed=0)
    for a, b in zip(train, again):
        assert torch.equal(a.image, b.image)
        assert (a.question, a.answer, a.qtype, a.scene, a.focus) == (b.question, b.answer, b.qtype, b.scene, b.focus)
    assert torch.equal(vqa.sample_at("train", 17).image, train[17].image)   # index-addressable
    assert torch.equal(vqa.render(train[5].scene), train[5].image)           # render is pure


def test_splits_and_seeds_are_disjoint(train):
    seen = {_digest(s) for s in train[:100]}
    for split, seed in [("val", 0), ("test", 0), ("train", 1)]:
        other = vqa.generate(split, 100, seed=seed)
        assert not seen & {_digest(s) for s in other}, (split, seed)
        assert len({s.scene for s in other} & {s.scene for s in train[:100]}) == 0
    with pytest.raises(ValueError):
        vqa.generate("dev", 1)


# --------------------------------------------------------------------------- answerability
# Independent re-derivation: parse the question text and answer it from the scene graph with
# plain centre/box comparisons, asserting that every reference resolves to exactly one object.
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


def _resolve(shapes, phrase):
    """The unique shape a noun phrase ("cross" / "red cross") denotes."""
    words = phrase.split()
    kind, color = words[-1], (words[0] if len(words) == 2 else None)
    hits = [s for s in shapes if s.kind == kind and (color is None or s.color == color)]
    assert len(hits) == 1, f"ambiguous or missing reference {phrase!r}: {len(hits)} matches"
    return hits[0]


def _cx(s):
    return (s.bbox[0] + s.bbox[2]) / 2


def _cy(s):
    return (s.bbox[1] + s.bbox[3]) / 2


def _derive(sample):
    q, shapes, texts = sample.question, sample.scene.shapes, sample.scene.texts
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        return _resolve(shapes, m[1]).color
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        return str(sum(s.kind == PLURAL[m[1]] for s in shapes))
    if m := re.fullmatch(r"is there an? (\w+ )?(\w+)\?", q):
        color = m[1].strip() if m[1] else None
        assert m[0].split()[2] == ("an" if (color or m[2])[0] in "aeiou" else "a")
        return "yes" if any(s.kind == m[2] and color in (None, s.color) for s in shapes) else "no"
    if m := re.fullmatch(r"what shape is (left|right) of the ([\w ]+)\?", q):
        ref = _resolve(shapes, m[2])
        sign = -1 if m[1] == "left" else 1
        side = [s for s in shapes if s is not ref and sign * (_cx(s) - _cx(ref)) > 0]
        assert len(side) == 1, f"{len(side)} shapes {m[1]} of the {m[2]}"
        box = side[0].bbox
        assert box[2] <= ref.bbox[0] if m[1] == "left" else box[0] >= ref.bbox[2]   # clearly separated
        return side[0].kind
    if m := re.fullmatch(r"is the ([\w ]+) (left or right of|above or below) the ([\w ]+)\?", q):
        a, b = _resolve(shapes, m[1]), _resolve(shapes, m[3])
        lo, hi = (0, 2) if m[2].startswith("left") else (1, 3)
        assert a.bbox[hi] <= b.bbox[lo] or b.bbox[hi] <= a.bbox[lo], "no clear separation"
        before = (_cx(a) < _cx(b)) if lo == 0 else (_cy(a) < _cy(b))
        return {(0, True): "left", (0, False): "right", (1, True): "above", (1, False): "below"}[lo, before]
    if m := re.fullmatch(r"what (number|word) is written\?", q):
        assert len(texts) == 1 and texts[0].kind == m[1]
        return texts[0].content
    raise AssertionError(f"unparsed question {q!r}")


def test_every_answer_rederived_from_the_scene(train):
    for s in train:
        assert _derive(s) == s.answer, (s.uid, s.question, s.answer)
    assert {s.qtype for s in train} == set(vqa.QTYPES)
    position = [s.question for s in train if s.qtype == "position"]
    assert any(q.startswith("what shape") for q in position) and any(q.startswith("is the") for q in position)


def test_answers_balanced_per_qtype(train):
    answers = collections.defaultdict(collections.Counter)
    for s in train:
        answers[s.qtype][s.answer] += 1
    for qtype, counts in answers.items():
        total = sum(counts.values())
        top = counts.most_common(1)[0][1] / total
        limit = 0.6 if len(counts) >= 3 else 0.7     # 2-option types: binomial noise at ~50 samples
        assert top <= limit, (qtype, counts)
        assert len(counts) >= 2, (qtype, counts)
    assert set(answers["exist"]) == {"yes", "no"}
    assert set(answers["count"]) == {str(c) for c in range(vqa.MAX_COUNT + 1)}


# --------------------------------------------------------------------------- image and geometry
def test_image_shape_dtype(train):
    for s in train[:20]:
        assert s.image.shape == (3, 336, 336) and s.image.dtype == torch.uint8
    assert vqa.NUM_PATCHES == 576 and vqa.GRID * vqa.PATCH_SIZE == vqa.IMAGE_SIZE


def test_objects_in_bounds_sized_and_disjoint(train):
    for s in train:
        objs = list(s.scene.shapes) + list(s.scene.texts)
        assert 2 <= len(s.scene.shapes) <= 6 and len(s.scene.texts) <= 1
        for o in objs:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 336 and 0 <= y0 < y1 <= 336
        for sh in s.scene.shapes:
            w, h = sh.bbox[2] - sh.bbox[0], sh.bbox[3] - sh.bbox[1]
            assert 30 <= w <= 80 and 30 <= h <= 80
        for a, b in itertools.combinations(objs, 2):
            overlap_x = min(a.bbox[2], b.bbox[2]) > max(a.bbox[0], b.bbox[0])
            overlap_y = min(a.bbox[3], b.bbox[3]) > max(a.bbox[1], b.bbox[1])
            assert not (overlap_x and overlap_y), (s.uid, a, b)


def test_pixels_show_the_scene(train):
    """The drawn colour at each shape's interior point is its named colour; boxes are tight."""
    for s in train[:60]:
        for sh in s.scene.shapes:
            x0, y0, x1, y1 = sh.bbox
            # a point inside every kind: the box centre, lowered for the triangle
            x, y = (x0 + x1) // 2, (y0 + 2 * y1) // 3 if sh.kind == "triangle" else (y0 + y1) // 2
            pix = s.image[:, y, x].int()
            ref = torch.tensor(vqa.COLORS[sh.color])
            assert (pix - ref).abs().max() <= vqa.JITTER, (s.uid, sh, pix)
            nearest = min(vqa.COLORS, key=lambda c: (pix - torch.tensor(vqa.COLORS[c])).abs().sum())
            assert nearest == sh.color
            crop = s.image[:, y0:y1, x0:x1].int()
            drawn = ((crop - torch.tensor(sh.rgb)[:, None, None]).abs().sum(0) == 0)
            assert drawn[0].any() and drawn[-1].any() and drawn[:, 0].any() and drawn[:, -1].any()


# --------------------------------------------------------------------------- relevant patches
def test_relevant_patches(train):
    for s in train:
        patches = vqa.relevant_patches(s)
        assert all(0 <= p < 576 for p in patches)
        mentions_present = not ((s.qtype == "count" and s.answer == "0") or (s.qtype == "exist" and s.answer == "no"))
        assert bool(patches) == mentions_present, (s.uid, s.question)
        # independently from the image: the patches holding a pixel drawn in the object's colour
        # inside its box (backgrounds are darker than every palette colour, so no false hits)
        expected = set()
        for what, i in s.focus:
            o = (s.scene.shapes if what == "shape" else s.scene.texts)[i]
            x0, y0, x1, y1 = o.bbox
            drawn = (s.image[:, y0:y1, x0:x1] == torch.tensor(o.rgb, dtype=torch.uint8)[:, None, None]).all(0)
            ys, xs = drawn.nonzero(as_tuple=True)
            expected |= set((((ys + y0) // 14) * 24 + (xs + x0) // 14).unique().tolist())
        assert patches == expected, s.uid
    small = [s for s in train if s.qtype == "color"]
    assert sum(len(vqa.relevant_patches(s)) for s in small) / len(small) < 576 / 10   # small regions


# --------------------------------------------------------------------------- vocabulary
def test_vocab_round_trip_and_answers(train, vocab):
    assert vocab.itos[:5] == ["<pad>", "<bos>", "<eos>", "<image>", "<unk>"]
    assert vqa.Vocab().itos == vocab.itos                              # deterministic
    assert len(set(vocab.itos)) == len(vocab)
    for s in train:
        ids = vocab.encode(s.question)
        assert vocab.unk_id not in ids and vocab.decode(ids) == s.question
        assert len(vocab.encode(s.answer)) == 1 and vocab.decode([vocab.answer_id(s.answer)]) == s.answer
    for a in vqa.ANSWERS:
        assert vocab.decode(vocab.target_ids(a)) == a + " <eos>"
    assert vocab.encode("what is the zebra?")[3] == vocab.unk_id
    with pytest.raises(ValueError):
        vocab.answer_id("red circle")


def test_prompt_layout(vocab):
    q = "is the red circle left or right of the cross?"
    ids = vocab.prompt_ids(q)
    assert len(ids) == 576 + len(vocab.encode(q)) + vqa.PROMPT_OVERHEAD
    image_pos = [i for i, t in enumerate(ids) if t == vocab.image_id]
    assert image_pos == list(range(3, 3 + 576))                         # one contiguous block
    assert ids[0] == vocab.bos_id
    assert vocab.decode(vocab.prompt_ids(q, image_tokens=1), skip_special=False) == \
        "<bos> USER: <image>\n" + q + " ASSISTANT:"
    assert len(vocab.prompt_ids(q, image_tokens=64)) == 64 + len(vocab.encode(q)) + vqa.PROMPT_OVERHEAD


def test_pixel_values(train):
    x = vqa.pixel_values(train[0].image)
    assert x.dtype == torch.float32 and x.shape == (3, 336, 336)
    white = vqa.pixel_values(torch.full((2, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(white[0, :, 0, 0], (1 - torch.tensor(vqa.CLIP_MEAN)) / torch.tensor(vqa.CLIP_STD))
    with pytest.raises(ValueError):
        vqa.pixel_values(train[0].image.float())
