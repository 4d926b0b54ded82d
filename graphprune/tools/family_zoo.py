"""Tiny random-weight models of every supported family, built from configs (no download), and
prompts laid out token for token as each family's processor writes them, separators included.

    model = family_zoo.build("qwen2_5_vl")
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"))

`items` lists what each sample shows, in prompt order ("image" / "video"); every sample of a batch
shows the same. `pad[i]` shortens sample i's instruction by that many tokens (left padding).
"""
from __future__ import annotations

import torch

from graphprune.compat import qwen2vl_takes_mm_token_type_ids, rope_config, transformers_major
from graphprune.tools.zoo import Example, _mrope_section, _spread_logits, left_pad

TEXT = dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_qwen2_5_vl(seed: int = 0, *, layers: int = 4, hidden: int = 64, text: dict | None = None,
                    vision: dict | None = None):
    """Qwen2.5-VL architecture: windowed ViT (full attention in block 1), 2x2 merger, M-RoPE LM.
    `text` / `vision`: config entries over these (larger models for timing: graphprune.tools.speed_video)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config={**dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, **TEXT,
                            **rope_config(10000.0, _mrope_section(hidden // TEXT["num_attention_heads"]))),
                     **(text or {})},
        vision_config={**dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                              fullatt_block_indexes=[1], tokens_per_second=2, in_channels=3), **(vision or {})},
        image_token_id=150, video_token_id=151, vision_start_token_id=148, vision_end_token_id=149)
    return _finish(Qwen2_5_VLForConditionalGeneration, cfg, seed)


def tiny_qwen3_vl(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """Qwen3-VL architecture: ViT (16-pixel patches, learned 8x8 position grid, 2x2 merger) whose
    layers 0 and 1 feed DeepStack features into the outputs of LM layers 0 and 1, Qwen3 LM (q/k
    RMSNorm per head) with interleaved M-RoPE (sections [4, 2, 2] of the 8 rotary frequencies: height
    at 1, 4 and width at 2, 5, as [24, 20, 20] of 64 are in the real model)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = hidden // TEXT["num_attention_heads"]
    half = head_dim // 2
    sections = [half - 2 * (half // 4), half // 4, half // 4]
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections,
                                "mrope_interleaved": True}}
    cfg = Qwen3VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, head_dim=head_dim,
                         **TEXT, **rope),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=150, video_token_id=151, vision_start_token_id=148, vision_end_token_id=149,
        tie_word_embeddings=False)
    return _finish(Qwen3VLForConditionalGeneration, cfg, seed)


def tiny_llava_next(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """LLaVA-NeXT architecture: CLIP tower (4x4 patches per 56-pixel crop), anyres crop grids
    [[56, 112], [112, 56], [112, 112]], image_newline, Llama LM."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, patch_size=14, projection_dim=48)
    cfg = LlavaNextConfig(vision_config=vc, text_config=dict(model_type="llama", hidden_size=hidden,
                                                             intermediate_size=2 * hidden, num_hidden_layers=layers,
                                                             **TEXT),
                          image_token_id=150, vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
    return _finish(LlavaNextForConditionalGeneration, cfg, seed)


def tiny_llava_onevision(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """LLaVA-OneVision architecture: SigLIP tower (no CLS; 8x8 patches per 112-pixel crop, pooled to
    4x4 per video frame), anyres_max_9 crop grids, image_newline, Qwen2 LM."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                            image_size=112, patch_size=14)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=dict(model_type="qwen2", hidden_size=hidden,
                                                                  intermediate_size=2 * hidden,
                                                                  num_hidden_layers=layers, **TEXT),
                               image_token_id=150, video_token_id=151, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                               image_grid_pinpoints=[[112, 224], [224, 112], [224, 224]], tie_word_embeddings=False)
    return _finish(LlavaOnevisionForConditionalGeneration, cfg, seed)


def tiny_mistral3(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """Mistral 3 architecture: Pixtral tower (14-pixel patches, 2-D RoPE, images at their own size),
    2x2 patch merger, Mistral LM (no sliding window)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    vc = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=112, patch_size=14, head_dim=8)
    cfg = Mistral3Config(vision_config=vc, text_config=dict(model_type="mistral", hidden_size=hidden, head_dim=16,
                                                            intermediate_size=2 * hidden, num_hidden_layers=layers,
                                                            sliding_window=None, **TEXT),
                         image_token_index=150, spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    return _finish(Mistral3ForConditionalGeneration, cfg, seed)


def tiny_aya_vision(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """Aya Vision architecture: SigLIP tower (8x8 patches per 112-pixel tile), 2x2 pixel-shuffle
    projector (16 tokens per tile), Cohere2 LM (RoPE in its sliding layers, whose window spans the
    whole context here: graphprune refuses a window that binds)."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    vc = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=112, patch_size=14)
    tc = dict(model_type="cohere2", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"], sliding_window=512, **TEXT)
    cfg = AyaVisionConfig(vision_config=vc, text_config=tc, image_token_index=150, downsample_factor=2,
                          vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=False)
    return _finish(AyaVisionForConditionalGeneration, cfg, seed)


def tiny_llava_next_video(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """LLaVA-NeXT-Video architecture: CLIP tower (4x4 patches per 56-pixel crop; video frames pooled
    2x2 to 2x2), anyres crop grids [[56, 112], [112, 56], [112, 112]], image_newline, Llama LM."""
    from transformers import CLIPVisionConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, patch_size=14, projection_dim=48)
    cfg = LlavaNextVideoConfig(vision_config=vc, text_config=dict(model_type="llama", hidden_size=hidden,
                                                                  intermediate_size=2 * hidden,
                                                                  num_hidden_layers=layers, **TEXT),
                               image_token_id=150, video_token_id=151, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", spatial_pool_mode="average",
                               spatial_pool_stride=2, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                               tie_word_embeddings=False)
    return _finish(LlavaNextVideoForConditionalGeneration, cfg, seed)


def tiny_video_llava(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """Video-LLaVA architecture: CLIP image and video towers (4x4 patches per 56-pixel frame, CLS
    kept: "full" features, 17 tokens per image or frame), one projector, Llama LM."""
    from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, patch_size=14, projection_dim=48)
    cfg = VideoLlavaConfig(vision_config=vc, text_config=dict(model_type="llama", hidden_size=hidden,
                                                              intermediate_size=2 * hidden, num_hidden_layers=layers,
                                                              **TEXT),
                           image_token_index=150, video_token_index=151, vision_feature_layer=-2,
                           vision_feature_select_strategy="full", tie_word_embeddings=False)
    return _finish(VideoLlavaForConditionalGeneration, cfg, seed)


def tiny_internvl(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """InternVL architecture: InternViT tower (8x8 patches per 112-pixel tile), pixel shuffle 0.5
    (16 tokens per tile), Qwen2 LM."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=[112, 112], patch_size=[14, 14])
    cfg = InternVLConfig(vision_config=vc, text_config=dict(model_type="qwen2", hidden_size=hidden,
                                                            intermediate_size=2 * hidden, num_hidden_layers=layers,
                                                            **TEXT),
                         image_token_id=150, image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    return _finish(InternVLForConditionalGeneration, cfg, seed)


def tiny_glm4v(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """GLM-4.1V architecture: ViT (14-pixel patches, 2x2 merger, 2 temporal patches per frame), GLM-4
    LM (four norms per layer, fused gate_up MLP, M-RoPE on the first half of each head, interleaved)."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    sections = _mrope_section(hidden // TEXT["num_attention_heads"] // 2)       # of the rotated half
    if transformers_major() >= 5:
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections,
                                    "partial_rotary_factor": 0.5}}
    else:       # 4.x GLM-4.1V: default RoPE (not Qwen's "mrope" type) with the sections in rope_scaling
        rope = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "rope_scaling": {"rope_type": "default", "mrope_section": sections}}
    cfg = Glm4vConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, **TEXT, **rope),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=112, in_channels=3),
        image_token_id=150, video_token_id=151, image_start_token_id=152, image_end_token_id=153,
        video_start_token_id=154, video_end_token_id=155, tie_word_embeddings=False)
    return _finish(Glm4vForConditionalGeneration, cfg, seed)


def tiny_idefics3(seed: int = 0, *, layers: int = 4, hidden: int = 64, model_type: str = "idefics3"):
    """Idefics3 architecture (SmolVLM with model_type="smolvlm"): SigLIP-style tower (8x8 patches per
    112-pixel tile), pixel shuffle by 2 (16 tokens per tile), Llama LM as the body's text_model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=112,
              patch_size=14)
    cfg = AutoConfig.for_model(model_type, vision_config=vc, scale_factor=2, image_token_id=150,
                               tie_word_embeddings=False,
                               text_config=dict(model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden,
                                                num_hidden_layers=layers, **TEXT))
    return _finish(AutoModelForImageTextToText._model_mapping[type(cfg)], cfg, seed)


def tiny_smolvlm(seed: int = 0, **kw):
    return tiny_idefics3(seed, model_type="smolvlm", **kw)


def tiny_gemma3(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """Gemma 3 architecture: SigLIP tower (8x8 patches per 112-pixel image, average-pooled to 4x4; no head,
    as in the released models), Gemma 3 LM (sliding and full attention layers, 128-token window, QK norms,
    scaled embeddings). transformers initialises the projector's mm_input_projection_weight to zeros (every
    image feature 0): it is drawn at random here, so that the images matter."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        head_dim=16, query_pre_attn_scalar=16, sliding_window=128,
                                        layer_types=["sliding_attention", "full_attention"] * (layers // 2), **TEXT),
                       vision_config=dict(_siglip(112), vision_use_head=False), mm_tokens_per_image=16,
                       image_token_index=150, boi_token_index=GEMMA3_BOI, eoi_token_index=GEMMA3_EOI)
    model = _unit_gemma_norms(_finish(Gemma3ForConditionalGeneration, cfg, seed))
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    return model


def tiny_paligemma(seed: int = 0, *, layers: int = 4, hidden: int = 64):
    """PaliGemma architecture: SigLIP tower (4x4 patches per 56-pixel image), linear projector,
    Gemma LM (prefix-LM attention over the prompt)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig(text_config=dict(model_type="gemma", hidden_size=hidden, intermediate_size=2 * hidden,
                                           num_hidden_layers=layers, head_dim=16, **TEXT),
                          vision_config=dict(_siglip(56), projection_dim=hidden), image_token_index=150,
                          projection_dim=hidden)
    return _unit_gemma_norms(_finish(PaliGemmaForConditionalGeneration, cfg, seed))


def _unit_gemma_norms(model):
    """Gemma's RMSNorms scale by 1 + weight: transformers 5 initialises the weights to 0, 4.x to 1
    (twice the activations, and rounding errors past fp32 test tolerances); 0 on both."""
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if "norm" in name:
                p.zero_()
    return model


def _siglip(image_size: int) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=image_size, patch_size=14)


def _finish(cls, cfg, seed):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    _spread_logits(model)
    return model


BUILDERS = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl, "llava_next": tiny_llava_next,
            "llava_onevision": tiny_llava_onevision,
            "mistral3": tiny_mistral3, "aya_vision": tiny_aya_vision,
            "llava_next_video": tiny_llava_next_video, "video_llava": tiny_video_llava,
            "internvl": tiny_internvl, "glm4v": tiny_glm4v, "idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm,
            "gemma3": tiny_gemma3, "paligemma": tiny_paligemma}


def build(family: str, seed: int = 0, **kw):
    from graphprune.tools.zoo import tiny_llava, tiny_qwen2vl
    builders = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2vl, **BUILDERS}
    return builders[family](seed, **kw).to(torch.float32)


# ------------------------------------------------------------------------------------------- prompts

def example(model, *, batch: int = 1, items=("image",), prefix: int = 5, suffix: int = 7, pad=(), seed: int = 0,
            grid: tuple[int, int] = (8, 8), frames: int = 4, image_size: tuple[int, int] | None = None) -> Example:
    """A processor-style prompt for `model`'s family (see the module docstring). Qwen: images of
    `grid` patches, videos of `frames` frames of that grid; LLaVA-NeXT: images of `image_size` (H, W),
    default (50, 90); Mistral 3: (84, 112)."""
    kind = model.config.model_type
    g = torch.Generator().manual_seed(seed)
    pad = tuple(pad) + (0,) * (batch - len(pad))
    layout = {"llava": _LLAVA, "qwen2_vl": _QWEN, "qwen2_5_vl": _QWEN, "qwen3_vl": _QWEN, "glm4v": _QWEN, "llava_next": _LLAVA_NEXT,
              "llava_onevision": _LLAVA_NEXT,
              "llava_next_video": _LLAVA_NEXT, "video_llava": _VIDEO_LLAVA, "internvl": _INTERNVL,
              "mistral3": _MISTRAL3, "aya_vision": _AYA_VISION, "idefics3": _IDEFICS3, "smolvlm": _IDEFICS3,
              "gemma3": _GEMMA3, "paligemma": _PALIGEMMA}.get(kind)
    if layout is None:
        raise ValueError(f"family_zoo.example: no prompt layout for model_type {kind!r}")
    rows, vision = [], layout(model, g, batch, items, grid=grid, frames=frames, image_size=image_size)
    for b in range(batch):
        if kind == "paligemma":          # PaliGemmaProcessor: the images first, then <bos> prompt "\n"
            ids = [t for block in vision["blocks"] for t in block] + [1] + _text(g, prefix + suffix - pad[b] - 1)
            rows.append(ids + [PALIGEMMA_NEWLINE])
            continue
        ids = [1] + _text(g, prefix)
        for block in vision["blocks"]:
            ids += block + _text(g, 2)
        rows.append(ids + _text(g, suffix - pad[b]))
    input_ids, mask = left_pad(rows)
    ex = Example(input_ids, mask, **vision["inputs"])
    if kind in ("gemma3", "paligemma"):  # their processors' token types: Gemma 3 1 at image tokens, PaliGemma 0
        ex.token_type_ids = (input_ids == model.config.image_token_id).long() * (kind == "gemma3")
    # what the installed transformers' processor returns: the vision-token types only where the model takes them
    if kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v") and qwen2vl_takes_mm_token_type_ids(model):
        cfg = model.config
        ex.mm_token_type_ids = (input_ids == cfg.image_token_id).int().masked_fill(input_ids == cfg.video_token_id, 2)
    return ex


def _text(g, n):
    return torch.randint(3, 140, (n,), generator=g).tolist()


def _QWEN(model, g, batch, items, *, grid, frames, **_):
    """<|vision_start|> <|image_pad|> x t*h*w/merge^2 <|vision_end|> per image (the same with
    <|video_pad|> per video: one block for all its frames), as Qwen2(.5)-VL's processor writes;
    Qwen3-VL's videos: per frame (temporal patch) its time stamp `<0.5 seconds>` as text, then
    <|vision_start|> <|video_pad|> x h*w/merge^2 <|vision_end|> (Qwen3VLProcessor.replace_video_token,
    at 2 fps); GLM-4.1V's images: <|begin_of_image|> <|image|> x t*h*w/merge^2 <|end_of_image|>."""
    cfg = model.config
    if cfg.model_type == "glm4v":
        if "video" in items:
            raise ValueError("GLM-4.1V prompts here hold images only")
        start, end = cfg.image_start_token_id, cfg.image_end_token_id
    else:
        start, end = cfg.vision_start_token_id, cfg.vision_end_token_id
    vc = cfg.vision_config
    h, w = grid
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    t_video = frames // vc.temporal_patch_size
    blocks, inputs = [], {"pixel_values": None}
    for item in items:
        t = 1 if item == "image" else t_video
        pads = cfg.image_token_id if item == "image" else cfg.video_token_id
        if item == "video" and cfg.model_type == "qwen3_vl":
            frame = [start] + [pads] * (h * w // vc.spatial_merge_size ** 2) + [end]
            # a temporal patch's time: the mean of its frames' times (Qwen3VLProcessor._calculate_timestamps)
            seconds = [(2 * f * vc.temporal_patch_size + vc.temporal_patch_size - 1) / 4 for f in range(t)]
            blocks.append([tok for s in seconds for tok in _seconds_text(s) + frame])
            continue
        blocks.append([start] + [pads] * (t * h * w // vc.spatial_merge_size ** 2) + [end])
    n_img, n_vid = items.count("image"), items.count("video")
    if n_img:
        inputs["pixel_values"] = torch.randn(batch * n_img * h * w, patch_dim, generator=g)
        inputs["image_grid_thw"] = torch.tensor([[1, h, w]] * batch * n_img)
    if n_vid:
        inputs["pixel_values_videos"] = torch.randn(batch * n_vid * t_video * h * w, patch_dim, generator=g)
        inputs["video_grid_thw"] = torch.tensor([[t_video, h, w]] * batch * n_vid)
        if cfg.model_type == "qwen2_5_vl":     # temporal_patch_size / fps, at 2 fps
            inputs["second_per_grid_ts"] = torch.tensor([vc.temporal_patch_size / 2.0] * batch * n_vid)
    return {"blocks": blocks, "inputs": inputs}


QWEN3_LT, QWEN3_DOT, QWEN3_SECONDS, QWEN3_GT, QWEN3_DIGIT_0 = 130, 131, 132, 133, 110    # "<", ".", " seconds", ">"


def _seconds_text(seconds: float) -> list[int]:
    """The tokens of a Qwen3-VL frame time stamp f"<{seconds:.1f} seconds>", a digit a token."""
    digits = [QWEN3_DOT if c == "." else QWEN3_DIGIT_0 + int(c) for c in f"{seconds:.1f}"]
    return [QWEN3_LT] + digits + [QWEN3_SECONDS, QWEN3_GT]


def _LLAVA_NEXT(model, g, batch, items, *, image_size, frames, **_):
    """One <image> per feature: the base view's patches, then each row of the unpadded crop grid
    followed by its newline slot (LlavaNextProcessor._get_number_of_features; OneVision's crop grids
    stay under anyres_max_9 here). OneVision videos: <video> x frames * pooled^2 + 1 newline
    (LlavaOnevisionProcessor.replace_video_token); LLaVA-NeXT-Video: <video> x frames * patches / 4
    (LlavaNextVideoProcessor.replace_video_token)."""
    from transformers.image_processing_utils import select_best_resolution
    cfg = model.config
    if "video" in items and cfg.model_type == "llava_next":
        raise ValueError("LLaVA-NeXT prompts hold images only")
    crop, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    image_size = image_size or (50, 90)
    best_h, best_w = select_best_resolution(list(image_size), cfg.image_grid_pinpoints)
    side = crop // patch
    tokens = side * side + llava_next_rows(image_size, side * best_h // crop, side * best_w // crop)[0]
    crops = 1 + (best_h // crop) * (best_w // crop)
    pooled = -(-side // 2)           # OneVision: bilinear to ceil(side / 2); NeXT-Video: 2x2 average pool
    video = frames * pooled ** 2 + 1 if cfg.model_type == "llava_onevision" else frames * (side // 2) ** 2
    blocks = [[cfg.image_token_id] * tokens if item == "image" else [cfg.video_token_id] * video for item in items]
    n_img, n_vid = items.count("image"), items.count("video")
    inputs = {"pixel_values": None}
    if n_img:
        inputs["pixel_values"] = torch.randn(batch * n_img, crops, 3, crop, crop, generator=g)
        inputs["image_sizes"] = torch.tensor([list(image_size)] * batch * n_img)
    if n_vid:
        inputs["pixel_values_videos"] = torch.randn(batch * n_vid, frames, 3, crop, crop, generator=g)
    return {"blocks": blocks, "inputs": inputs}


def _LLAVA(model, g, batch, items, **_):
    """<image> x patches per image (LlavaProcessor, the "default" strategy: no CLS), images only."""
    if "video" in items:
        raise ValueError("LLaVA-1.5 prompts hold images only")
    vc = model.config.vision_config
    blocks = [[model.config.image_token_id] * (vc.image_size // vc.patch_size) ** 2 for _ in items]
    return {"blocks": blocks, "inputs": {"pixel_values": torch.randn(batch * len(items), 3, vc.image_size,
                                                                     vc.image_size, generator=g)}}


def _VIDEO_LLAVA(model, g, batch, items, *, frames, **_):
    """<image> x (patches + CLS) per image, <video> x frames x (patches + CLS) per video
    (VideoLlavaProcessor with the "full" strategy); the images as pixel_values_images, the name its
    image processor returns by default."""
    cfg = model.config
    vc = cfg.vision_config
    per_frame = (vc.image_size // vc.patch_size) ** 2 + 1
    blocks = [[cfg.image_token_id] * per_frame if item == "image" else [cfg.video_token_id] * (frames * per_frame)
              for item in items]
    n_img, n_vid = items.count("image"), items.count("video")
    inputs = {"pixel_values": None}
    if n_img:
        inputs["pixel_values_images"] = torch.randn(batch * n_img, 3, vc.image_size, vc.image_size, generator=g)
    if n_vid:
        inputs["pixel_values_videos"] = torch.randn(batch * n_vid, frames, 3, vc.image_size, vc.image_size, generator=g)
    return {"blocks": blocks, "inputs": inputs}


INTERNVL_START, INTERNVL_END = 151, 152        # <img>, </img>


def _INTERNVL(model, g, batch, items, **_):
    """<img> <IMG_CONTEXT> x tiles x 16 </img> per image, two tiles each (InternVLProcessor; its
    pixel_values: every image's tiles in prompt order)."""
    if "video" in items:
        raise ValueError("InternVL prompts here hold images only")
    cfg = model.config
    tiles, size = 2, cfg.vision_config.image_size[0]
    block = [INTERNVL_START] + [cfg.image_token_id] * tiles * cfg.image_seq_length + [INTERNVL_END]
    return {"blocks": [block for _ in items],
            "inputs": {"pixel_values": torch.randn(batch * len(items) * tiles, 3, size, size, generator=g)}}


MISTRAL3_BREAK, MISTRAL3_END = 151, 152     # [IMG_BREAK], [IMG_END] (12, 13 in Mistral's tokenizer)


def _MISTRAL3(model, g, batch, items, *, image_size, **_):
    """Per image, rows of [IMG] x (W / 28) each closed by [IMG_BREAK], the last by [IMG_END]
    (PixtralProcessor, whose patch is the tower's 14 pixels x the 2x2 merge); images of
    `image_size` rounded down to whole merged patches."""
    if "video" in items:
        raise ValueError("Mistral 3 prompts hold images only")
    cfg = model.config
    side = cfg.vision_config.patch_size * cfg.spatial_merge_size
    image_size = image_size or (84, 112)
    rows, cols = max(1, image_size[0] // side), max(1, image_size[1] // side)
    block = ([cfg.image_token_id] * cols + [MISTRAL3_BREAK]) * rows
    block[-1] = MISTRAL3_END
    n = batch * len(items)
    return {"blocks": [block for _ in items],
            "inputs": {"pixel_values": torch.randn(n, 3, rows * side, cols * side, generator=g),
                       "image_sizes": torch.tensor([[rows * side, cols * side]] * n)}}


AYA_START, AYA_END, AYA_TILE_1, AYA_GLOBAL = 151, 152, 153, 154   # <|START_OF_IMG|> ... TILE_GLOBAL


def _AYA_VISION(model, g, batch, items, **_):
    """Per image <|START_OF_IMG|> TILE_1 <|IMG_PATCH|> x 16 TILE_GLOBAL <|IMG_PATCH|> x 16 <|END_OF_IMG|>:
    one local tile and the global view (AyaVisionProcessor.replace_image_token)."""
    if "video" in items:
        raise ValueError("Aya Vision prompts hold images only")
    cfg = model.config
    vc = cfg.vision_config
    patches = [cfg.image_token_id] * (vc.image_size // (vc.patch_size * cfg.downsample_factor)) ** 2
    block = [AYA_START, AYA_TILE_1] + patches + [AYA_GLOBAL] + patches + [AYA_END]
    tiles = 2 * batch * len(items)
    return {"blocks": [block for _ in items],
            "inputs": {"pixel_values": torch.randn(tiles, 3, vc.image_size, vc.image_size, generator=g)}}


IDEFICS3_FAKE, IDEFICS3_GLOBAL, IDEFICS3_NEWLINE = 151, 152, 155    # <fake_token_around_image>, <global-img>, "\n"
IDEFICS3_ROW_COL = (153, 154)                                        # <row_1_col_1>, <row_1_col_2>


def _IDEFICS3(model, g, batch, items, **_):
    """Per image one row of 2 tiles and the global view (Idefics3Processor.replace_image_token):
    <fake> <row_1_col_1> <image> x 16 <fake> <row_1_col_2> <image> x 16 "\n" "\n" <fake> <global-img>
    <image> x 16 <fake>; pixel_values (samples, tiles, C, H, W) with its pixel_attention_mask."""
    if "video" in items:
        raise ValueError("Idefics3 / SmolVLM prompts here hold images only")
    cfg = model.config
    vc = cfg.vision_config
    tile = [cfg.image_token_id] * ((vc.image_size // vc.patch_size) ** 2 // cfg.scale_factor ** 2)
    block = []
    for marker in IDEFICS3_ROW_COL:
        block += [IDEFICS3_FAKE, marker] + tile
    block += [IDEFICS3_NEWLINE, IDEFICS3_NEWLINE, IDEFICS3_FAKE, IDEFICS3_GLOBAL] + tile + [IDEFICS3_FAKE]
    tiles = 3 * len(items)
    return {"blocks": [block for _ in items],
            "inputs": {"pixel_values": torch.randn(batch, tiles, 3, vc.image_size, vc.image_size, generator=g),
                       "pixel_attention_mask": torch.ones(batch, tiles, vc.image_size, vc.image_size,
                                                          dtype=torch.bool)}}


GEMMA3_BOI, GEMMA3_EOI, GEMMA3_BREAK = 151, 152, 153     # <start_of_image>, <end_of_image>, "\n\n"
PALIGEMMA_NEWLINE = 154                                     # "\n", closing the prompt


def _GEMMA3(model, g, batch, items, **_):
    """Per image "\n\n" <start_of_image> <image_soft_token> x mm_tokens_per_image <end_of_image> "\n\n"
    (Gemma3Processor's full_image_sequence)."""
    if "video" in items:
        raise ValueError("Gemma 3 prompts hold images only")
    cfg = model.config
    block = [GEMMA3_BREAK, GEMMA3_BOI] + [cfg.image_token_id] * cfg.mm_tokens_per_image + [GEMMA3_EOI, GEMMA3_BREAK]
    size = cfg.vision_config.image_size
    return {"blocks": [block for _ in items],
            "inputs": {"pixel_values": torch.randn(batch * len(items), 3, size, size, generator=g)}}


def _PALIGEMMA(model, g, batch, items, **_):
    """<image> x num_image_tokens per image, ahead of the prompt (PaliGemmaProcessor)."""
    if "video" in items:
        raise ValueError("PaliGemma prompts hold images only")
    cfg = model.config
    size = cfg.vision_config.image_size
    return {"blocks": [[cfg.image_token_id] * cfg.text_config.num_image_tokens for _ in items],
            "inputs": {"pixel_values": torch.randn(batch * len(items), 3, size, size, generator=g)}}


def llava_next_rows(image_size, height: int, width: int) -> tuple[int, int, int]:
    """(placeholders, rows, columns) of the unpadded crop grid of a (H, W) image whose crops give a
    `height` x `width` patch grid: the processor's _get_unpadded_features; each row is columns
    patches and one newline slot."""
    orig_h, orig_w = image_size
    if orig_w / orig_h > width / height:
        new_h = int(round(orig_h * (width / orig_w), 7))
        height -= 2 * ((height - new_h) // 2)
    else:
        new_w = int(round(orig_w * (height / orig_h), 7))
        width -= 2 * ((width - new_w) // 2)
    return height * (width + 1), height, width

