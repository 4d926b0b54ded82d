"""`graphprune visualize`: an image with the patches a pipeline dropped dimmed.

    graphprune visualize --image IMG --question Q --pipeline "fastv(layer=2, keep=64)" --out OUT.png

Which patches are kept is read off graphprune's own outputs: the tokens the last LLM layer holds
in its KV cache (`PrunedOutput.cache[-1].index`, original prompt indices, and `.mask`: static-mode
slots that were invalidated count as dropped), mapped to the model's patch grid. Patches whose
kept token is a merge of several patches (MustDrop's window merge, VisionTrim's TGVC complement
tokens) are outlined; which patches each merge absorbed is not drawn (the passes do not expose
it). PNG files are read and written without extra dependencies (zlib); other formats need Pillow.
"""
from __future__ import annotations

import torch

from graphprune import tokenops
from graphprune.tools.images import write_png


def kept_patches(out, input_ids: torch.Tensor, image_token_id: int, layer: int = -1) -> list[list[list[int]]]:
    """[sample][image] -> ascending patch indices (row-major in the image's token grid) whose
    vision token is valid in `layer`'s KV cache after prefill (default: the last layer)."""
    return [[[p for p, ok in img if ok] for img in s] for s in _vision_slots(out, input_ids, image_token_id, layer)]


def _vision_slots(out, input_ids, image_token_id, layer):
    """[sample][image] -> [(patch, valid)] for every vision token layer `layer` holds (valid or not),
    in sequence order."""
    c = out.cache[layer]
    res = []
    for b in range(input_ids.shape[0]):
        pos = (input_ids[b] == image_token_id).nonzero()[:, 0].tolist()
        starts = [i for i, p in enumerate(pos) if i == 0 or p != pos[i - 1] + 1]
        where = {}
        for img, (s, e) in enumerate(zip(starts, starts[1:] + [len(pos)])):
            for j, p in enumerate(pos[s:e]):
                where[p] = (img, j)
        per = [[] for _ in starts]
        for idx, m in zip(c.index[b].tolist(), c.mask[b].tolist()):
            if idx in where:
                img, j = where[idx]
                per[img].append((j, bool(m)))
        res.append(per)
    return res


def merged_patches(pruned, inputs: dict) -> tuple[object, list[list[set[int]]]]:
    """(PrunedOutput, [sample][image] -> patch indices whose token in the last layer carries a
    merged value). A kept token is merged when a selection replaced its value by something other
    than its own state (compared with every token-shaped input of the choosing function)."""
    from graphprune.tools.instrument import record_selections
    rec = record_selections(pruned, inputs)
    flags = None
    for stage in ("vision", "prefill"):
        for node, args, out, choice_kw in rec[stage]:
            if node.target is tokenops.protect_topk:
                continue
            picked, values = out[2], out[3]
            v = (args[0] if node.target is tokenops.withdraw_all else args[1]).shape[-1]   # tokens before
            prev = torch.zeros(picked.shape[:2] + (v,), dtype=torch.bool) if flags is None else flags
            prev = prev.reshape(picked.shape[0], picked.shape[1], -1)   # vision (images, 1, k) -> LLM (B, n, k)
            flags = prev.gather(2, picked)
            if values is not None and choice_kw is not None:
                flags = flags | _changed(values, picked, choice_kw, v)
    out = rec["output"]
    slots = _vision_slots(out, inputs["input_ids"], pruned.model.config.image_token_id, -1)
    merged = []
    for b, sample in enumerate(slots):
        merged.append([])
        for i, img in enumerate(sample):
            f = flags[b, i].tolist() if flags is not None and flags.shape[-1] == len(img) else [False] * len(img)
            merged[-1].append({p for (p, ok), m in zip(img, f) if ok and m})
    return out, merged


def _changed(values, picked, kwargs, v: int) -> torch.Tensor:
    """(B, n, k) kept tokens whose new value equals none of the chooser's (B, n, v, D) inputs there."""
    b, n, k, d = values.shape
    same = torch.zeros(b, n, k, dtype=torch.bool)
    for t in kwargs.values():
        if isinstance(t, torch.Tensor) and t.dim() == 4 and tuple(t.shape) == (b, n, v, d):
            own = t.gather(2, picked[..., None].expand(b, n, k, d))
            same |= torch.isclose(values.float(), own.float(), rtol=1e-5, atol=1e-6).all(-1)
    return ~same


def draw(image: torch.Tensor, grid: tuple[int, int], kept: set[int], merged: set[int] = frozenset(),
         dim: float = 0.25, scale: int = 1) -> torch.Tensor:
    """uint8 (3, H, W): patches not in `kept` dimmed to `dim` of their brightness, `merged` ones
    outlined in orange. The image is cut into the grid's rows x cols cells."""
    img = image.float().clone()
    if scale > 1:
        img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    h, w = img.shape[-2:]
    rows, cols = grid
    ys = [round(r * h / rows) for r in range(rows + 1)]
    xs = [round(c * w / cols) for c in range(cols + 1)]
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        if p not in kept:
            img[:, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] *= dim
    colour = torch.tensor([255.0, 150.0, 0.0])[:, None]
    for p in merged:
        r, c = divmod(p, cols)
        y0, y1, x0, x1 = ys[r], ys[r + 1] - 1, xs[c], xs[c + 1] - 1
        for y in (y0, y1):
            img[:, y, x0:x1 + 1] = colour
        for x in (x0, x1):
            img[:, y0:y1 + 1, x] = colour
    return img.round().clamp(0, 255).to(torch.uint8)


def dimmed_count(image: torch.Tensor, drawn: torch.Tensor, grid: tuple[int, int]) -> int:
    """How many grid cells of `drawn` are darker than in `image` (the test's view of the picture)."""
    rows, cols = grid
    h, w = image.shape[-2:]
    n = 0
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        ys, xs = slice(round(r * h / rows) + 1, round((r + 1) * h / rows) - 1), slice(round(c * w / cols) + 1,
                                                                                     round((c + 1) * w / cols) - 1)
        n += bool(drawn[:, ys, xs].float().mean() < image[:, ys, xs].float().mean() * 0.9)
    return n


# -- PNG ----------------------------------------------------------------------------------------


# -- the command -------------------------------------------------------------------------------

# bounds on what one drawing may cost (the drawing is a float copy of the scaled image: 12 bytes a
# pixel; --scale 100 once took 22 GB)
MAX_SCALE = 16
MAX_SIDE = 4096                     # pixels per side of the written PNG
MAX_IMAGE_PIXELS = 40_000_000       # of an input image file, read from its header before decoding


def check_image_file(path: str) -> None:
    """Refuse an image file whose header declares more than MAX_IMAGE_PIXELS pixels."""
    import os
    import struct

    from graphprune.errors import InputError
    if not os.path.isfile(path):
        raise InputError(f"image {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
    else:
        try:
            from PIL import Image
        except ImportError:
            raise InputError(f"image {path}: not a PNG file (other formats need Pillow)") from None
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for unreadable files
            raise InputError(f"cannot read image {path}: {e}") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"image {path} is {w}x{h} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are read")



def visualize(vm, image: torch.Tensor, question: str, pipeline: str, out_path: str, *, scale: int = 1) -> dict:
    """Prune vm.model with `pipeline`, run the question on the image, write the picture; returns
    what was drawn (kept / merged patch indices, counts, the report's totals)."""
    from graphprune import prune
    from graphprune.errors import InputError
    from graphprune.tools.images import resize
    from graphprune.tools.vqa_model import Item
    if not isinstance(scale, int) or scale < 1 or vm.image_size * scale > MAX_SIDE:
        raise InputError(f"scale {scale!r}: a positive integer with {vm.image_size} x scale <= {MAX_SIDE} pixels "
                         f"(at most {MAX_SIDE // vm.image_size} for this model)")
    pm = prune(vm.model, pipeline)
    inputs = vm.inputs([Item(image, question, "")])
    out, merged = merged_patches(pm, inputs)
    kept = kept_patches(out, inputs["input_ids"], vm.model.config.image_token_id)[0]
    if len(kept) != 1:
        raise ValueError(f"expected one image in the prompt, found {len(kept)}")
    shown = resize(image, vm.image_size)
    write_png(out_path, draw(shown, vm.grid, set(kept[0]), merged[0][0], scale=scale))
    answer = vm.decode([int(out.logits[0, -1].argmax())]) if vm.vocab is not None else None
    return {"pipeline": " | ".join(repr(p) for p in pm.pipeline) or "(unpruned)", "grid": list(vm.grid),
            "patches": vm.tokens_per_image, "kept": sorted(kept[0]), "merged": sorted(merged[0][0]),
            "dimmed": vm.tokens_per_image - len(kept[0]), "answer": answer, "kv_bytes": out.report.kv_bytes,
            "tokens_per_layer": out.report.tokens_per_layer, "out": out_path,
            "size": [int(shown.shape[-1]) * scale, int(shown.shape[-2]) * scale]}
