"""Synthetic VQA benchmark: deterministic scenes, single-word questions and a word-level vocabulary.

Groundwork for measuring each pruning method's accuracy/speed trade-off offline with a small
LLaVA-architecture model. Everything here is pure torch + the standard library (no Pillow, no
numpy) and deterministic by (split, seed, index).

Images are LLaVA-sized: 3 x 336 x 336 uint8, i.e. a 24 x 24 grid of 14-px patches = 576 vision
tokens. A scene is a dark, plain or lightly textured background with 2-6 non-overlapping shapes
(circle, square, triangle, cross; 30-80 px) in named colours, and sometimes one printed digit or
short word (own 5x7 bitmap font). Questions are generated *from the scene graph* and checked to
be unambiguous; every answer is one word (one vocabulary token).

Question types (`Sample.qtype`) and templates:

    color     what color is the {kind}?                     -> colour    (exactly one {kind})
    count     how many {kinds} are there?                   -> "0".."4"
    exist     is there a[n] [{color}] {kind}?               -> yes / no
    position  what shape is {left|right} of the {ref}?      -> kind      (exactly one shape there)
              is the {ref} left or right of the {ref}?      -> left / right
              is the {ref} above or below the {ref}?        -> above / below
    read      what number is written? / what word is written?  -> digit / word

`{ref}` is "{kind}" when the kind is unique in the scene, else "{color} {kind}" when that pair is
unique (never an ambiguous reference). Spatial relations are strict: "A left of B" means A's box
ends before B's box starts (no shared pixel column); for "what shape is left of R" every other
shape must have its centre right of R's centre, so exactly one shape is even plausibly "left".

Answers are balanced by construction where the answer is chosen first (colour, count, yes/no,
digit/word) and the scene is built to match it; position questions are drawn from random scenes
and symmetric (ordered pairs both ways), so left/right and above/below are balanced too.

API:
    generate(split, n, seed=0) -> list[Sample]      samples 0..n-1 of the split's stream
    sample_at(split, index, seed=0) -> Sample       one sample; generate(...)[i] == sample_at(..., i)
    render(scene) -> uint8 (3, 336, 336)            pure function of the scene
    relevant_patches(sample) -> set[int]            patch ids (row * 24 + col) the question is about
    object_patches(obj) -> set[int]                 patch ids containing any pixel of a Shape/Text
    Vocab()                                         closed word-level vocabulary
        .encode(text) / .decode(ids) / .prompt_ids(question, image_tokens=576) / .answer_id(answer)
    pixel_values(image) -> float32                  CLIP mean/std normalisation

Prompt template (LLaVA-1.5 style, `<image>` repeated `image_tokens` times):

    <bos> USER: <image>...<image>\n{question} ASSISTANT:

so len(prompt_ids(q, N)) == N + len(encode(q)) + PROMPT_OVERHEAD (6). The target is the answer
token followed by `<eos>` (`Vocab.target_ids`).
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------- geometry constants
IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE          # 24 patches per side
NUM_PATCHES = GRID * GRID                # 576 vision tokens

SHAPE_MIN, SHAPE_MAX = 30, 80            # shape bounding-box side, px
GAP = 6                                  # min free pixels between any two objects' boxes
EDGE = 4                                 # min free pixels between an object and the image border
MIN_SHAPES, MAX_SHAPES = 2, 6
MAX_COUNT = 4                            # count answers are 0..MAX_COUNT
DISTRACTOR_TEXT_P = 0.3                  # chance of an (unasked-about) text item in non-read scenes

# --------------------------------------------------------------------------- closed world
SPLITS = ("train", "val", "test")
QTYPES = ("color", "count", "exist", "position", "read")
KINDS = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {                               # name -> nominal RGB (rendered with +-JITTER per channel)
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
COLOR_NAMES = tuple(COLORS)
JITTER = 10
DIGITS = tuple("0123456789")
WORDS = ("cat", "dog", "sun", "car", "hat", "cup", "bus", "key", "box", "pen", "map", "egg")
DIRECTIONS = ("left", "right")
RELATIONS = {"horizontal": ("left", "right"), "vertical": ("above", "below")}

# Question templates. The builders below and the vocabulary both read these, so they cannot drift.
TEMPLATES = {
    "color": "what color is the {kind}?",
    "count": "how many {plural} are there?",
    "exist": "is there {article} {thing}?",
    "which": "what shape is {direction} of the {ref}?",
    "horizontal": "is the {a} left or right of the {b}?",
    "vertical": "is the {a} above or below the {b}?",
    "read_number": "what number is written?",
    "read_word": "what word is written?",
}

# 5x7 bitmap font for the digits and the letters of WORDS (rendered upper-case).
FONT = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
}
DIGIT_SCALES = (3, 4, 5, 6)              # font pixel size: digits 15-30 px wide, 21-42 px tall
WORD_SCALES = (3, 4)                     # 3-letter words 51-68 px wide, 21-28 px tall

# CLIP ViT-L/14-336 image normalisation (openai/clip-vit-large-patch14-336 preprocessor_config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MAX_TRIES = 1000                        # resample budget per sample (typically 1-3 are needed)


# --------------------------------------------------------------------------- scene graph
@dataclass(frozen=True)
class Shape:
    kind: str                            # one of KINDS
    color: str                           # one of COLOR_NAMES
    bbox: tuple[int, int, int, int]      # (x0, y0, x1, y1), pixels x0 <= x < x1; tight around the drawing
    rgb: tuple[int, int, int]            # rendered colour (nominal colour + jitter)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)


@dataclass(frozen=True)
class Text:
    content: str                         # a digit "0".."9" or a word of WORDS (lower-case)
    kind: str                            # "number" or "word"
    bbox: tuple[int, int, int, int]      # tight around the glyphs, same convention as Shape.bbox
    scale: int                           # font pixel size in image pixels
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    texts: tuple[Text, ...]              # zero or one item
    background: tuple[int, int, int]     # base RGB
    texture: str                         # "plain", "noise" or "gradient"
    texture_seed: int                    # drives the texture, so render(scene) is a pure function


@dataclass(frozen=True, eq=False)
class Sample:
    image: torch.Tensor                  # (3, 336, 336) uint8
    question: str
    answer: str                          # a single vocabulary token
    qtype: str                           # one of QTYPES
    scene: Scene
    focus: tuple[tuple[str, int], ...]   # objects the question mentions: ("shape", i) / ("text", i)
    uid: str                             # "{split}/{seed}/{index}"


# --------------------------------------------------------------------------- drawing
@functools.lru_cache(maxsize=None)
def shape_mask(kind: str, size: int) -> torch.Tensor:
    """(size, size) bool mask of a shape; every drawing touches all four sides of its box."""
    r = torch.arange(size, dtype=torch.float32)
    ys, xs = torch.meshgrid(r, r, indexing="ij")
    c = (size - 1) / 2
    if kind == "circle":
        m = (xs - c) ** 2 + (ys - c) ** 2 <= (size / 2) ** 2
    elif kind == "square":
        m = torch.ones(size, size, dtype=torch.bool)
    elif kind == "triangle":             # upright isosceles: apex centred on top, base on the bottom row
        m = (xs - c).abs() <= (ys + 1) / 2
    elif kind == "cross":                # plus sign, arms a third of the size thick
        m = ((xs - c).abs() <= size / 6) | ((ys - c).abs() <= size / 6)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return m


@functools.lru_cache(maxsize=None)
def text_mask(content: str, scale: int) -> torch.Tensor:
    """(7 * scale, (6 * len - 1) * scale) bool mask: 5x7 glyphs, one blank column between them."""
    rows = [" ".join(FONT[ch.upper()][y] for ch in content) for y in range(7)]
    grid = torch.tensor([[c == "#" for c in row] for row in rows], dtype=torch.bool)
    return grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def _object_mask(obj: Shape | Text) -> torch.Tensor:
    if isinstance(obj, Shape):
        return shape_mask(obj.kind, obj.bbox[2] - obj.bbox[0])
    return text_mask(obj.content, obj.scale)


def render(scene: Scene) -> torch.Tensor:
    """Draw a scene: (3, 336, 336) uint8. Deterministic; objects never overlap."""
    s = IMAGE_SIZE
    img = torch.tensor(scene.background, dtype=torch.int16)[:, None, None].repeat(1, s, s)
    if scene.texture == "noise":         # light monochrome grain
        g = torch.Generator().manual_seed(scene.texture_seed)
        img += torch.randint(-10, 11, (1, s, s), generator=g, dtype=torch.int16)
    elif scene.texture == "gradient":    # gentle linear ramp along x or y
        rng = random.Random(scene.texture_seed)
        amp = rng.randint(8, 20) * rng.choice((-1, 1))
        ramp = torch.linspace(-amp, amp, s).round().to(torch.int16)
        img += ramp[None, None, :] if rng.random() < 0.5 else ramp[None, :, None]
    img = img.clamp_(0, 255).to(torch.uint8)
    for obj in (*scene.shapes, *scene.texts):
        x0, y0, x1, y1 = obj.bbox
        region = img[:, y0:y1, x0:x1]     # a view: assigning through it draws into img
        region[:, _object_mask(obj)] = torch.tensor(obj.rgb, dtype=torch.uint8)[:, None]
    return img


def object_patches(obj: Shape | Text) -> set[int]:
    """Patch indices (row * GRID + col) of the 24 x 24 grid containing any pixel of the object."""
    full = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    x0, y0, x1, y1 = obj.bbox
    full[y0:y1, x0:x1] = _object_mask(obj)
    hit = full.view(GRID, PATCH_SIZE, GRID, PATCH_SIZE).any(dim=3).any(dim=1)
    return set(hit.flatten().nonzero().flatten().tolist())


def relevant_patches(sample: Sample) -> set[int]:
    """Patches covering the objects the question mentions (empty when it mentions none present,
    e.g. "how many crosses are there?" -> "0", or an existence question answered "no")."""
    out: set[int] = set()
    for what, i in sample.focus:
        out |= object_patches(sample.scene.shapes[i] if what == "shape" else sample.scene.texts[i])
    return out


# --------------------------------------------------------------------------- scene sampling
def _jitter(rng: random.Random, rgb) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in rgb)


def _apart(a, b) -> bool:
    """Boxes at least GAP pixels apart along some axis (hence non-overlapping)."""
    return (a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1])


def _place(rng: random.Random, sizes: list[tuple[int, int]]) -> list[tuple[int, int, int, int]] | None:
    """Rejection-sample non-overlapping boxes of the given (w, h); biggest placed first."""
    boxes: list = [None] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0] * sizes[i][1]):
        w, h = sizes[i]
        for _ in range(100):
            x0 = rng.randint(EDGE, IMAGE_SIZE - EDGE - w)
            y0 = rng.randint(EDGE, IMAGE_SIZE - EDGE - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(b is None or _apart(box, b) for b in boxes):
                boxes[i] = box
                break
        else:
            return None
    return boxes


def _random_text(rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    kind = kind or rng.choice(("number", "word"))
    return (rng.choice(DIGITS) if kind == "number" else rng.choice(WORDS)), kind


def _compose(rng: random.Random, specs: list[tuple[str, str]], text: tuple[str, str] | None) -> Scene | None:
    """Lay out shapes `specs` [(kind, colour)] (in random list order) and an optional (content,
    kind) text on a random background. None when the layout does not fit (caller resamples)."""
    specs = list(specs)
    rng.shuffle(specs)
    sizes = [(s, s) for s in (rng.randint(SHAPE_MIN, SHAPE_MAX) for _ in specs)]
    scale = 0
    if text is not None:
        scale = rng.choice(DIGIT_SCALES if text[1] == "number" else WORD_SCALES)
        h, w = text_mask(text[0], scale).shape
        sizes.append((w, h))
    boxes = _place(rng, sizes)
    if boxes is None:
        return None
    shapes = tuple(Shape(k, c, boxes[i], _jitter(rng, COLORS[c])) for i, (k, c) in enumerate(specs))
    texts = ()
    if text is not None:
        grey = rng.randint(215, 255)
        texts = (Text(text[0], text[1], boxes[-1], scale, (grey, grey, grey)),)
    base = rng.randint(25, 70)           # dark base so every palette colour (white too) stands out
    background = tuple(min(255, max(0, base + rng.randint(-12, 12))) for _ in range(3))
    texture = rng.choice(("plain", "noise", "gradient"))
    return Scene(shapes, texts, background, texture, rng.getrandbits(63))


def _other_kind(rng: random.Random, kind: str) -> str:
    return rng.choice([k for k in KINDS if k != kind])


def _random_specs(rng: random.Random, n: int, exclude_kind: str | None = None) -> list[tuple[str, str]]:
    kinds = [k for k in KINDS if k != exclude_kind]
    return [(rng.choice(kinds), rng.choice(COLOR_NAMES)) for _ in range(n)]


def _distractor(rng: random.Random):
    return _random_text(rng) if rng.random() < DISTRACTOR_TEXT_P else None


def _indices(scene: Scene, kind: str, color: str | None = None) -> list[int]:
    return [i for i, s in enumerate(scene.shapes) if s.kind == kind and (color is None or s.color == color)]


# --------------------------------------------------------------------------- question builders
# Each builder returns (scene, question, answer, focus) or None (resample).

def _build_color(rng: random.Random):
    kind, color = rng.choice(KINDS), rng.choice(COLOR_NAMES)
    specs = [(kind, color)] + _random_specs(rng, rng.randint(MIN_SHAPES - 1, MAX_SHAPES - 1), exclude_kind=kind)
    scene = _compose(rng, specs, _distractor(rng))
    if scene is None:
        return None
    (i,) = _indices(scene, kind)          # exactly one by construction
    return scene, TEMPLATES["color"].format(kind=kind), color, (("shape", i),)


def _build_count(rng: random.Random):
    kind, count = rng.choice(KINDS), rng.randint(0, MAX_COUNT)
    n_other = rng.randint(max(0, MIN_SHAPES - count), MAX_SHAPES - count)
    specs = [(kind, rng.choice(COLOR_NAMES)) for _ in range(count)] + _random_specs(rng, n_other, exclude_kind=kind)
    scene = _compose(rng, specs, _distractor(rng))
    if scene is None:
        return None
    focus = tuple(("shape", i) for i in _indices(scene, kind))
    return scene, TEMPLATES["count"].format(plural=PLURALS[kind]), str(len(focus)), focus


def _build_exist(rng: random.Random):
    kind, color = rng.choice(KINDS), rng.choice(COLOR_NAMES)
    yes, with_color = rng.random() < 0.5, rng.random() < 0.5
    if not with_color:                   # "is there a cross?"
        n_yes = rng.randint(1, 2) if yes else 0
        specs = [(kind, rng.choice(COLOR_NAMES)) for _ in range(n_yes)]
        specs += _random_specs(rng, rng.randint(max(1, MIN_SHAPES - n_yes), MAX_SHAPES - n_yes), exclude_kind=kind)
        thing, want = kind, None
    else:                                # "is there a red cross?" with hard negatives when "no"
        specs = [(kind, color)] if yes else []
        if not yes and rng.random() < 0.7:
            specs.append((kind, rng.choice([c for c in COLOR_NAMES if c != color])))
        if not yes and rng.random() < 0.7:
            specs.append((_other_kind(rng, kind), color))
        while len(specs) < MIN_SHAPES or (len(specs) < MAX_SHAPES and rng.random() < 0.6):
            spec = (rng.choice(KINDS), rng.choice(COLOR_NAMES))
            if spec != (kind, color):
                specs.append(spec)
        thing, want = f"{color} {kind}", color
    scene = _compose(rng, specs, _distractor(rng))
    if scene is None:
        return None
    focus = tuple(("shape", i) for i in _indices(scene, kind, want))
    assert bool(focus) == yes
    article = "an" if thing[0] in "aeiou" else "a"
    return scene, TEMPLATES["exist"].format(article=article, thing=thing), ("yes" if yes else "no"), focus


def _references(scene: Scene, rng: random.Random) -> dict[int, str]:
    """Unambiguous noun phrase for each shape that has one: kind if unique (sometimes with its
    colour for variety), else "colour kind" if that pair is unique."""
    refs = {}
    for i, s in enumerate(scene.shapes):
        if len(_indices(scene, s.kind)) == 1:
            refs[i] = s.kind if rng.random() < 0.5 else f"{s.color} {s.kind}"
        elif len(_indices(scene, s.kind, s.color)) == 1:
            refs[i] = f"{s.color} {s.kind}"
    return refs


def _left_of(a: Shape, b: Shape) -> bool:
    return a.bbox[2] <= b.bbox[0]        # a ends strictly before b starts (no shared column)


def _above(a: Shape, b: Shape) -> bool:
    return a.bbox[3] <= b.bbox[1]


def _build_position(rng: random.Random):
    variant = rng.choice(("which", "relation"))
    scene = _compose(rng, _random_specs(rng, rng.randint(3, 5)), _distractor(rng))
    if scene is None:
        return None
    shapes, refs = scene.shapes, _references(scene, rng)
    candidates = []
    if variant == "which":               # "what shape is left of the red square?"
        for r, ref in refs.items():
            for direction in DIRECTIONS:
                sign = -1 if direction == "left" else 1
                rx = shapes[r].center[0]
                there = [j for j in range(len(shapes)) if j != r and
                         (_left_of(shapes[j], shapes[r]) if direction == "left" else _left_of(shapes[r], shapes[j]))]
                # every other shape must be clearly on the other side (centre-wise), so the
                # single shape found is the only plausible reading
                rest_ok = all(sign * (shapes[j].center[0] - rx) < 0 for j in range(len(shapes))
                              if j != r and j not in there)
                if len(there) == 1 and rest_ok:
                    q = TEMPLATES["which"].format(direction=direction, ref=ref)
                    candidates.append((q, shapes[there[0]].kind, (("shape", r), ("shape", there[0]))))
    else:                                # "is the circle left or right of the cross?"
        for a, ref_a in refs.items():
            for b, ref_b in refs.items():
                if a == b:
                    continue
                focus = (("shape", a), ("shape", b))
                sa, sb = shapes[a], shapes[b]
                if _left_of(sa, sb) or _left_of(sb, sa):
                    candidates.append((TEMPLATES["horizontal"].format(a=ref_a, b=ref_b),
                                       "left" if _left_of(sa, sb) else "right", focus))
                if _above(sa, sb) or _above(sb, sa):
                    candidates.append((TEMPLATES["vertical"].format(a=ref_a, b=ref_b),
                                       "above" if _above(sa, sb) else "below", focus))
    if not candidates:
        return None
    q, answer, focus = rng.choice(candidates)
    return scene, q, answer, focus


def _build_read(rng: random.Random):
    content, kind = _random_text(rng)
    scene = _compose(rng, _random_specs(rng, rng.randint(MIN_SHAPES, MAX_SHAPES - 1)), (content, kind))
    if scene is None:
        return None
    q = TEMPLATES["read_number" if kind == "number" else "read_word"]
    return scene, q, content, (("text", 0),)


_BUILDERS = {"color": _build_color, "count": _build_count, "exist": _build_exist,
             "position": _build_position, "read": _build_read}


# --------------------------------------------------------------------------- public generator
def _sample_seed(split: str, seed: int, index: int) -> int:
    """64-bit seed of one sample. Hashing the split name gives each split its own stream."""
    digest = hashlib.sha256(f"graphprune.tools.vqa|{split}|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_at(split: str, index: int, seed: int = 0) -> Sample:
    """Sample `index` of the (split, seed) stream; independent of how many others are generated."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = random.Random(_sample_seed(split, seed, index))
    qtype = rng.choice(QTYPES)
    for _ in range(_MAX_TRIES):
        built = _BUILDERS[qtype](rng)
        if built is not None:
            break
    else:  # pragma: no cover - never observed; layouts fit almost always
        raise RuntimeError(f"could not build a {qtype} sample for {split}/{seed}/{index}")
    scene, question, answer, focus = built
    return Sample(render(scene), question, answer, qtype, scene, focus, f"{split}/{seed}/{index}")


def generate(split: str, n: int, seed: int = 0) -> list[Sample]:
    """Samples 0..n-1 of `split` ("train", "val" or "test"); same arguments -> identical data."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [sample_at(split, i, seed) for i in range(n)]


# --------------------------------------------------------------------------- tokenizer
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>", "<unk>")
PROMPT_USER, PROMPT_ASSISTANT = "USER:", "ASSISTANT:"
PROMPT_OVERHEAD = 6                      # <bos> USER : \n ... ASSISTANT :
ANSWERS = (*COLOR_NAMES, *KINDS, *DIGITS, *WORDS, "yes", "no", "left", "right", "above", "below")

# special tokens | newline | word | single digit | any other single non-space character
_TOKEN_RE = re.compile(r"<[a-z]+>|\n|[A-Za-z]+|\d|[^\sA-Za-z\d]")
_NO_SPACE_BEFORE = {"?", ":", ",", ".", "\n"}


def tokenize(text: str) -> list[str]:
    """Split into word-level tokens; digits are one token each, spaces are dropped."""
    return _TOKEN_RE.findall(text)


def _closed_vocabulary() -> list[str]:
    """Every token the generator and prompt template can emit, sorted (specials excluded)."""
    words: set[str] = set()
    for template in TEMPLATES.values():
        words.update(tokenize(re.sub(r"\{\w+\}", " ", template)))
    fillers = [*KINDS, *PLURALS.values(), *COLOR_NAMES, *DIRECTIONS, "a", "an", *ANSWERS,
               PROMPT_USER, PROMPT_ASSISTANT, "\n"]
    for f in fillers:
        words.update(tokenize(f))
    return sorted(words - set(SPECIAL_TOKENS))


class Vocab:
    """Word-level vocabulary of the synthetic benchmark; ids are fixed by construction:
    <pad>=0, <bos>=1, <eos>=2, <image>=3, <unk>=4, then the closed vocabulary sorted."""

    def __init__(self):
        self.itos: list[str] = [*SPECIAL_TOKENS, *_closed_vocabulary()]
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.image_id, self.unk_id = range(len(SPECIAL_TOKENS))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Token ids; unknown words (after a lower-case retry) map to <unk>."""
        return [self.stoi.get(t, self.stoi.get(t.lower(), self.unk_id)) for t in tokenize(text)]

    def decode(self, ids, skip_special: bool = False) -> str:
        """Inverse of encode for generator text (single spaces, no space before ? : , . or \\n)."""
        out = ""
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            tok = self.itos[i]
            if skip_special and tok in SPECIAL_TOKENS:
                continue
            out += tok if (not out or out.endswith("\n") or tok in _NO_SPACE_BEFORE) else " " + tok
        return out

    def prompt_ids(self, question: str, image_tokens: int = NUM_PATCHES) -> list[int]:
        """<bos> USER: <image> x image_tokens \\n{question} ASSISTANT:  (LLaVA-1.5 layout)."""
        return ([self.bos_id] + self.encode(PROMPT_USER) + [self.image_id] * image_tokens
                + self.encode("\n" + question) + self.encode(PROMPT_ASSISTANT))

    def answer_id(self, answer: str) -> int:
        """The single token of an answer; raises if the answer is not exactly one known token."""
        ids = self.encode(answer)
        if len(ids) != 1 or ids[0] == self.unk_id:
            raise ValueError(f"answer {answer!r} is not a single vocabulary token")
        return ids[0]

    def target_ids(self, answer: str) -> list[int]:
        """What the model should generate after the prompt: the answer token then <eos>."""
        return [self.answer_id(answer), self.eos_id]


def pixel_values(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) -> float32 normalised with CLIP's mean/std."""
    if image.dtype != torch.uint8 or image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"expected uint8 (3, H, W) or (B, 3, H, W), got {image.dtype} {tuple(image.shape)}")
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std
