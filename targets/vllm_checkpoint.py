"""A folder vLLM can serve, written from graphprune's shipped VQA model (or another `save_pretrained` LLaVA).

    python -m graphprune.targets.vllm_checkpoint OUT_DIR [SOURCE_DIR]

vLLM serves a LLaVA folder with its tokenizer and processor files; the shipped model has neither (its
vocabulary is `graphprune.tools.vqa.Vocab`), and transformers >= 5 saves the CLIP tower's weights as
`vision_tower.embeddings...` where vLLM's loader wants `vision_tower.vision_model.embeddings...`
(transformers reads both); and vLLM's CPU attention kernel takes head sizes from 32 up (`CPUAttentionBackend.
get_supported_head_sizes`) where the shipped LM's are 16. This writes config and weights with the tower's
keys renamed and, where needed, the LM's heads widened to 32 without changing what the model computes
(`widen_heads`), a word-level
tokenizer that splits text as `vqa.tokenize` does (same ids as `Vocab`), and a `LlavaProcessor` whose
image processor normalises 336 x 336 images exactly as `vqa.pixel_values` does.
"""
from __future__ import annotations

import os
import shutil
import sys

TOWER = "vision_tower."
MIN_HEAD_DIM = 32          # vLLM CPU attention's smallest head size


def tower_key(key: str) -> str:
    """The name vLLM's CLIPVisionModel loads a CLIP-tower weight under (other keys unchanged)."""
    head, sep, rest = key.partition(TOWER)
    if not sep or head not in ("", "model.") or rest.startswith("vision_model."):
        return key
    return f"{head}{TOWER}vision_model.{rest}"


def head_size(text_config: dict) -> int:
    return text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"]


def widen_heads(weights: dict, text_config: dict, head_dim: int = MIN_HEAD_DIM) -> dict:
    """The LM's attention weights for heads of `head_dim` that compute what the `text_config` heads do.

    Rotary pairs dimension i with i + d/2 at frequency theta^(-2i/d); a head of size d' = 2^k d has
    every frequency of the size-d head at the even i, so old pair (m, m + d/2) goes to (r m, r m + d'/2)
    with r = d'/d, and the other q/k dimensions are zero (their scores add nothing). q is scaled by
    sqrt(d'/d) so the attention scale 1/sqrt(d') still gives the old logits; v's extra dimensions are
    zero and o_proj ignores them."""
    import torch

    heads, kv_heads = text_config["num_attention_heads"], text_config["num_key_value_heads"]
    d = head_size(text_config)
    if d >= head_dim:
        return weights
    if head_dim % d or (head_dim // d) & (head_dim // d - 1):
        raise ValueError(f"cannot widen heads of size {d} to {head_dim}: the ratio must be a power of two")
    r, half = head_dim // d, d // 2
    rope_slots = torch.cat([torch.arange(half) * r, torch.arange(half) * r + head_dim // 2])     # old dim -> new

    def rows(w, n_heads, slots, scale=1.0):
        w = w.reshape(n_heads, d, -1)
        out = w.new_zeros(n_heads, head_dim, w.shape[-1])
        out[:, slots] = w * scale
        return out.reshape(n_heads * head_dim, -1)

    out = dict(weights)
    for key, w in weights.items():
        if "language_model." not in key:
            continue
        if key.endswith("self_attn.q_proj.weight"):
            out[key] = rows(w, heads, rope_slots, (head_dim / d) ** 0.5)
        elif key.endswith("self_attn.k_proj.weight"):
            out[key] = rows(w, kv_heads, rope_slots)
        elif key.endswith("self_attn.v_proj.weight"):
            out[key] = rows(w, kv_heads, torch.arange(d))
        elif key.endswith("self_attn.o_proj.weight"):
            out[key] = rows(w.T, heads, torch.arange(d)).T
        elif "self_attn" in key and key.endswith("bias"):
            raise ValueError(f"{key}: widening heads with attention biases is not supported")
    return out


def word_tokenizer(vocab):
    """A PreTrainedTokenizerFast with `vocab`'s ids and `graphprune.tools.vqa.tokenize`'s splitting."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from graphprune.tools import vqa

    tok = Tokenizer(models.WordLevel(dict(vocab.stoi), unk_token="<unk>"))
    # the pattern's matches are the tokens; what lies between them (spaces) is dropped
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(vqa._TOKEN_RE.pattern), behavior="removed", invert=True)
    tok.decoder = decoders.WordPiece(prefix="##")       # joins tokens with single spaces
    names = vqa.SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=names[vocab.pad_id], bos_token=names[vocab.bos_id],
                                   eos_token=names[vocab.eos_id], unk_token=names[vocab.unk_id],
                                   extra_special_tokens={"image_token": names[vocab.image_id]})


def image_processor(image_size: int):
    """CLIPImageProcessor that maps a (image_size x image_size) RGB image to `vqa.pixel_values` of it."""
    from transformers import CLIPImageProcessor

    from graphprune.tools import vqa

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
                              crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=list(vqa.CLIP_MEAN),
                              image_std=list(vqa.CLIP_STD), do_convert_rgb=True)


def write_vllm_checkpoint(out_dir: str, source_dir: str | None = None) -> str:
    """Write the servable folder for the VQA model in `source_dir` (default: the shipped one); returns out_dir."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import LlavaProcessor

    from graphprune.tools import vqa, zoo

    src = source_dir or zoo.vqa_weights_dir()
    os.makedirs(out_dir, exist_ok=True)
    for name in ("generation_config.json",):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    weights = widen_heads(load_file(os.path.join(src, "model.safetensors")), cfg["text_config"])
    save_file({tower_key(k): v.contiguous() for k, v in weights.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    cfg["text_config"]["head_dim"] = max(MIN_HEAD_DIM, head_size(cfg["text_config"]))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    vision = cfg["vision_config"]
    processor = LlavaProcessor(image_processor=image_processor(vision["image_size"]), tokenizer=word_tokenizer(vqa.Vocab()),
                               patch_size=vision["patch_size"],
                               vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
                               num_additional_image_tokens=1)
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m graphprune.targets.vllm_checkpoint OUT_DIR [SOURCE_DIR]")
    print(write_vllm_checkpoint(*sys.argv[1:]))
