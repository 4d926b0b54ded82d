"""Small models built on the spot from configs (no download), and the one small trained model
that ships with the package (`vqa_llava`, graphprune/tools/weights/vqa_llava/).

They have the real architectures (LLaVA-1.5: CLIP tower with CLS + MLP projector + Llama;
Qwen2-VL: windowless ViT with 2x2 patch merger + Qwen2 LM with M-RoPE), only narrower and
shallower, so every capture, anatomy and pass runs exactly as on the full-size checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.compat import plain_model_kwargs


@dataclass
class Example:
    """Model inputs the way the HF processor would produce them (image tokens already expanded)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    pixel_values_images: torch.Tensor | None = None      # Video-LLaVA's processor name for pixel_values
    pixel_attention_mask: torch.Tensor | None = None     # Idefics3 / SmolVLM: the real pixels of each tile
    token_type_ids: torch.Tensor | None = None           # Gemma 3: 1 at image tokens; PaliGemma: 0 prefix, 1 suffix

    def as_kwargs(self) -> dict:
        """The inputs that are set, by the processor's names."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def sample(self, i: int) -> "Example":
        """Sample i alone, its left padding removed. Every example gives each sample the same images
        and videos, so the per-image inputs (pixel rows, grids, sizes) split evenly by sample."""
        real = self.attention_mask[i].bool()
        per_token = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
        b = self.input_ids.shape[0]
        out = {k: (v[i][real][None] if k in per_token else v.chunk(b)[i])
               for k, v in vars(self).items() if v is not None}
        out.setdefault("pixel_values", None)
        return Example(**out)


def tiny_llava(seed: int = 0, *, layers: int = 4, image_size: int = 84, patch: int = 14,
               hidden: int = 64, vision_hidden: int = 48, vision_layers: int = 3):
    """LLaVA-1.5 architecture: 6x6 patch grid (36 vision tokens per image) by default."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                          num_hidden_layers=vision_layers, num_attention_heads=4,
                          image_size=image_size, patch_size=patch, projection_dim=vision_hidden)
    tc = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=160,
                     max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=150,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    _spread_logits(model)
    return model


def tiny_qwen2vl(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """Qwen2-VL architecture (no CLS in the vision tower, 3-D M-RoPE positions in the LM)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from graphprune.compat import rope_config

    head_dim = hidden // 4
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=160,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         **rope_config(10000.0, _mrope_section(head_dim))),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=150, video_token_id=151, vision_start_token_id=148, vision_end_token_id=149,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    _spread_logits(model)
    return model


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids, attention_mask), left-padded with id 0 as the processors pad."""
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return input_ids, mask


def _mrope_section(head_dim: int) -> list[int]:
    # temporal / height / width split of the rotary half-dimension, as Qwen2-VL's [16, 24, 24]
    t = head_dim // 8
    rest = head_dim // 2 - t
    return [t, rest // 2, rest - rest // 2]


def _spread_logits(model) -> None:
    # Random init gives nearly flat logits, so greedy decoding would hinge on 1e-7 ties; a
    # larger output head makes token choices well separated and parity tests meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)


def _text_ids(cfg) -> torch.Tensor:
    """Ids a random prompt's text may use: 3..139 within the model's vocabulary, minus its special
    tokens (pad / bos / eos / image), so that small vocabularies (the VQA model's 69) work too."""
    tc = getattr(cfg, "text_config", cfg)
    special = {cfg.image_token_id, 0, 1, 2} | {getattr(tc, k, None) for k in ("pad_token_id", "bos_token_id",
                                                                          "eos_token_id")}
    ids = [i for i in range(3, min(140, tc.vocab_size)) if i not in special]
    if not ids:
        raise ValueError(f"vocabulary of {tc.vocab_size} tokens has no ordinary text tokens for an example prompt")
    return torch.tensor(ids)


def llava_example(model, *, batch: int = 1, images_per_sample: int = 1, prefix: int = 5,
                  suffix: int = 7, pad: tuple[int, ...] = (), seed: int = 0) -> Example:
    """A processor-style LLaVA input: [pad][bos, prefix text][<image> x V]...[suffix text].

    `pad[i]` left-pads sample i (so samples may have different text lengths).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    v = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    img = cfg.image_token_id
    pad = tuple(pad) + (0,) * (batch - len(pad))
    text = _text_ids(cfg)

    def words(n):
        return text[torch.randint(0, len(text), (n,), generator=g)].tolist()

    rows = []
    for b in range(batch):
        ids = [1] + words(prefix)
        for i in range(images_per_sample):
            ids += [img] * v
            if i + 1 < images_per_sample:
                ids += words(2)
        ids += words(suffix - pad[b])
        rows.append(ids)
    input_ids, mask = left_pad(rows)
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch * images_per_sample, 3, size, size, generator=g)
    return Example(input_ids, mask, pixels)


def qwen2vl_example(model, *, batch: int = 1, grid: tuple[int, int] = (8, 8), prefix: int = 5,
                    suffix: int = 7, pad: tuple[int, ...] = (), seed: int = 0) -> Example:
    """A processor-style Qwen2-VL input with one image of `grid` patches (merged 2x2 in the LM)."""
    from graphprune.compat import qwen2vl_takes_mm_token_type_ids

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vc = cfg.vision_config
    h, w = grid
    v = (h // vc.spatial_merge_size) * (w // vc.spatial_merge_size)
    pad = tuple(pad) + (0,) * (batch - len(pad))
    rows = []
    for b in range(batch):
        ids = [1] + torch.randint(3, 140, (prefix,), generator=g).tolist()
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * v + [cfg.vision_end_token_id]
        ids += torch.randint(3, 140, (suffix - pad[b],), generator=g).tolist()
        rows.append(ids)
    input_ids, mask = left_pad(rows)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = torch.randn(batch * h * w, patch_dim, generator=g)
    thw = torch.tensor([[1, h, w]] * batch)
    # what the installed transformers' processor returns: the image-token mask only where the model takes it
    types = (input_ids == cfg.image_token_id).int() if qwen2vl_takes_mm_token_type_ids(model) else None
    return Example(input_ids, mask, pixels, thw, types)


# --------------------------------------------------------------------------- the trained VQA model
# Configs of graphprune's small trained LLaVA-architecture VLM (examples/train_vqa_model.py).
# "default" is the shipped model (graphprune/tools/weights/vqa_llava/); "tiny" is for smoke tests (the
# image size is a parameter so tests can use a small grid; the prompt then has
# (image_size // patch) ** 2 image tokens).
CONFIGS = {
    "default": dict(image_size=336, patch=14, vision_hidden=96, vision_layers=4, vision_heads=4,
                    vision_mlp=384, hidden=64, layers=8, heads=4, kv_heads=2, mlp=192,
                    projector_act="gelu"),
    "tiny": dict(image_size=56, patch=14, vision_hidden=32, vision_layers=2, vision_heads=2,
                 vision_mlp=64, hidden=32, layers=8, heads=2, kv_heads=1, mlp=64,
                 projector_act="gelu"),
}

VQA_WEIGHTS = "weights/vqa_llava"        # relative to the graphprune package directory
VQA_TRAIN_COMMAND = ("python examples/train_vqa_model.py --steps 4300 --minutes 88 --vision-steps 4500 "
                     "--vision-minutes 22 --vision-batch 32 --vision-lr 6e-3 --vision-keep 160 --pos-init sincos "
                     "--proj-steps 400 --proj-aux-weight 1 --freeze-vision --lm-keep 128 --qk-std 0.125 "
                     "--balance-types --type-share position=2 --type-share count=1.5 --attn-weight 1 --attn-layer 3 "
                     "--batch 8 --questions 24 --lr 2e-3 --eval-n 250 --eval-every 500 "
                     "--test-n 1000 --seed 0 --data-seed 0 --threads 2 --out graphprune/tools/weights/vqa_llava")


def build_model(cfg: dict, seed: int = 0, vocab=None):
    """A fresh (randomly initialised) LlavaForConditionalGeneration for a `CONFIGS` entry over
    `vocab` (default `graphprune.tools.vqa.Vocab()`): CLIP vision tower with CLS, feature layer -2,
    strategy "default", MLP projector, Llama LM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from graphprune.tools import vqa

    vocab = vocab or vqa.Vocab()
    n_img = (cfg["image_size"] // cfg["patch"]) ** 2
    vc = CLIPVisionConfig(hidden_size=cfg["vision_hidden"], intermediate_size=cfg["vision_mlp"],
                          num_hidden_layers=cfg["vision_layers"], num_attention_heads=cfg["vision_heads"],
                          image_size=cfg["image_size"], patch_size=cfg["patch"],
                          projection_dim=cfg["vision_hidden"], hidden_act="quick_gelu")
    tc = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["mlp"],
                     num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                     num_key_value_heads=cfg["kv_heads"], vocab_size=len(vocab),
                     max_position_embeddings=max(1024, n_img + 128), rope_theta=10000.0,
                     pad_token_id=vocab.pad_id, bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id,
                     tie_word_embeddings=False)
    lc = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=vocab.image_id,
                     vision_feature_layer=-2, vision_feature_select_strategy="default",
                     projector_hidden_act=cfg["projector_act"], image_seq_length=n_img,
                     pad_token_id=vocab.pad_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(lc)
    model.generation_config.pad_token_id = vocab.pad_id
    model.generation_config.bos_token_id = vocab.bos_id
    model.generation_config.eos_token_id = vocab.eos_id
    return model


def vqa_weights_dir() -> str:
    """Where the shipped VQA model lives (package data; may not exist yet)."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), *VQA_WEIGHTS.split("/"))


def vqa_llava(path: str | None = None):
    """The trained small LLaVA VQA model and its vocabulary: `(model, graphprune.tools.vqa.Vocab())`.

    Loads `graphprune/tools/weights/vqa_llava/` (shipped with the package) when `path` is None, else a
    `save_pretrained` directory written by `examples/train_vqa_model.py --out DIR`. Offline
    (local files only), eval mode, attn_implementation="sdpa". Raises FileNotFoundError naming
    what is missing and the command that trains the weights."""
    import json
    import os

    from transformers import LlavaForConditionalGeneration

    from graphprune.tools import vqa

    d = vqa_weights_dir() if path is None else os.fspath(path)
    missing = [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(d, f))]
    if missing:
        where = "the shipped VQA model weights" if path is None else "a trained VQA model"
        raise FileNotFoundError(
            f"{where} not found: {', '.join(missing)} missing in {d}. Train them with\n"
            f"    {VQA_TRAIN_COMMAND if path is None else 'python examples/train_vqa_model.py --out ' + d}\n"
            f"(see the docstring of examples/train_vqa_model.py for the exact options of the shipped run).")
    vocab = vqa.Vocab()
    meta_path = os.path.join(d, "train_meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        words = meta.get("vocab")
        if words is not None and words != [vocab.decode([i]) for i in range(len(vocab))]:
            raise ValueError(f"{meta_path}: the model's vocabulary differs from graphprune.tools.vqa.Vocab()")
    model = LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa", local_files_only=True,
                                                          **plain_model_kwargs(use_safetensors=True,
                                                                               trust_remote_code=False))
    if model.config.text_config.vocab_size != len(vocab) or model.config.image_token_id != vocab.image_id:
        raise ValueError(f"{d}: not a graphprune VQA model (vocab size / image token id differ)")
    return model.eval(), vocab
