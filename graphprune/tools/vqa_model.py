"""The VQA model and questions the tools run on: the shipped model, a random-weight one, a local
folder or any LLaVA checkpoint, and questions from the generator or a folder of images."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from graphprune.tools.images import read_image, resize

_LOADED: dict = {}          # loaded VQA models by spec


class BenchError(ValueError):
    """Bad input to bench / demo / visualize (printed as `graphprune: error: ...`)."""


@dataclass
class Item:
    image: torch.Tensor          # (3, H, W) uint8
    question: str
    answer: str
    qtype: str = "all"
    uid: str = ""


@dataclass
class VQAModel:
    """A model and how to turn items into its inputs (a graphprune.tools.vqa.Vocab or an HF processor)."""
    model: object
    name: str
    source: str
    vocab: object = None
    processor: object = None
    grid: tuple = None                     # (rows, cols) of the patch grid

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def inputs(self, items: list[Item]) -> dict:
        """Left-padded batch: input_ids, attention_mask, pixel_values."""
        if self.processor is not None:
            prompts = [f"USER: <image>\n{it.question} ASSISTANT:" for it in items]
            self.processor.tokenizer.padding_side = "left"
            return dict(self.processor(images=[it.image.permute(1, 2, 0).numpy() for it in items], text=prompts,
                                       return_tensors="pt", padding=True))
        from graphprune.tools import vqa
        rows = [self.vocab.prompt_ids(it.question, self.tokens_per_image) for it in items]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.vocab.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        images = torch.stack([resize(it.image, self.image_size) for it in items])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=vqa.pixel_values(images))

    def decode(self, ids) -> str:
        if self.vocab is not None:
            return self.vocab.decode(ids, skip_special=True)
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def load_vqa_model(spec: str | None, *, trust_remote_code: bool = False,
                   allow_pickle_weights: bool = False) -> VQAModel:
    """A VQAModel, loaded (and captured) once per process. spec None: the shipped model; "random" /
    "random:CONFIG": zoo.build_model(zoo.CONFIGS[CONFIG]) with random weights; a save_pretrained
    directory of a graphprune VQA model; any other local path or hub id in the local Hugging Face
    cache (LLaVA-style, with its processor; offline). No code from a model folder runs and weights
    load from safetensors only unless asked (see graphprune.tools.loading.load_model)."""
    key = (spec, trust_remote_code, allow_pickle_weights)
    if key not in _LOADED:
        _LOADED[key] = _load(spec, trust_remote_code, allow_pickle_weights)
    return _LOADED[key]


def _load(spec, trust_remote_code=False, allow_pickle_weights=False):
    from graphprune.tools import zoo
    if spec is None or spec in ("shipped", "vqa"):
        try:
            model, vocab = zoo.vqa_llava()
        except FileNotFoundError as e:
            raise BenchError(f"{e}\n(or pass --model random for the same architecture with random weights)") from None
        return wrap_model(model, "shipped", "graphprune/tools/weights/vqa_llava (trained)", vocab=vocab)
    if spec == "random" or spec.startswith("random:"):
        cfg = spec.partition(":")[2] or "default"
        if cfg not in zoo.CONFIGS:
            raise BenchError(f"--model {spec}: unknown config {cfg!r} (have {', '.join(zoo.CONFIGS)})")
        from graphprune.tools import vqa
        return wrap_model(zoo.build_model(zoo.CONFIGS[cfg], 0).eval(), spec, f"zoo.CONFIGS[{cfg!r}], random weights",
                     vocab=vqa.Vocab())
    from graphprune.tools.loading import check_model_folder, load_model
    if os.path.isdir(spec):
        check_model_folder(spec, trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights)
    if _is_vqa_dir(spec):
        try:
            model, vocab = zoo.vqa_llava(spec)
        except FileNotFoundError as e:
            raise BenchError(str(e).splitlines()[0]) from None
        return wrap_model(model, spec, "trained VQA model (local directory)", vocab=vocab)
    model, source = load_model(spec, trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights)
    try:
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(spec, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BenchError(f"{spec}: no processor in the local files ({str(e).splitlines()[0]}); bench needs one to "
                         "tokenize questions") from None
    return wrap_model(model, spec, source, processor=processor)


def _is_vqa_dir(path: str) -> bool:
    """A save_pretrained directory of a graphprune VQA model (its LLM speaks graphprune.tools.vqa.Vocab)."""
    from graphprune.tools import vqa
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    image_id = cfg.get("image_token_id", cfg.get("image_token_index"))       # saved under either name
    return cfg.get("text_config", {}).get("vocab_size") == len(vqa.Vocab()) and image_id == vqa.Vocab().image_id


def wrap_model(model, name, source, **kw) -> VQAModel:
    """A VQAModel for a LLaVA-style model with a captured patch grid (kw: vocab= or processor=)."""
    from graphprune import prune
    anat = prune(model).program.anatomy.get("vision")          # captures once (prune caches it)
    if anat is None or anat.grid is None:
        raise BenchError(f"{name}: {type(model).__name__} has no captured vision stage with a patch grid")
    return VQAModel(model, name, source, grid=tuple(anat.grid), **kw)


def load_items(data: str | None, n: int, split: str = "test", seed: int = 0) -> list[Item]:
    """n items of the synthetic VQA split, or of a JSONL file / folder of them (one object a line:
    image (path relative to the file), question, answer, optional type)."""
    if data is None:
        from graphprune.tools import vqa
        return [Item(s.image, s.question, s.answer, s.qtype, s.uid) for s in vqa.generate(split, n, seed)]
    files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".jsonl")) \
        if os.path.isdir(data) else [data]
    if not files or not all(os.path.isfile(f) for f in files):
        raise BenchError(f"--data {data}: no such JSONL file (or folder with *.jsonl)")
    items = []
    for path in files:
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                missing = [k for k in ("image", "question", "answer") if k not in rec]
                if missing:
                    raise BenchError(f"{path}:{line_no}: missing {', '.join(missing)}")
                img_path = os.path.join(os.path.dirname(path), rec["image"])
                items.append(Item(read_image(img_path), rec["question"], str(rec["answer"]),
                                  rec.get("type", "all"), f"{os.path.basename(path)}:{line_no}"))
                if len(items) == n:
                    return items
    return items
