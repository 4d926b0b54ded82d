"""Models by name for the CLI and the tools: the built-in tiny models, a local folder or a model
in the local Hugging Face cache (never the network), and an example prompt for the tiny ones."""
from __future__ import annotations

from graphprune.errors import InputError

TINY = ("tiny-llava", "tiny-qwen2vl", "tiny-qwen2.5vl", "tiny-llava-next", "tiny-llava-onevision")
# built-in tiny models of the other families: name -> (family_zoo family, what its sample prompt shows)
_FAMILY_TINY = {"tiny-qwen2.5vl": ("qwen2_5_vl", ("image", "video")), "tiny-llava-next": ("llava_next", ("image",)),
                "tiny-llava-onevision": ("llava_onevision", ("video",))}


def load_model(name: str):
    """(model, source) for a built-in tiny name, a local path or a cached hub id."""
    from graphprune.tools import zoo
    if name == "tiny-llava":
        return zoo.tiny_llava(), "built-in tiny model (graphprune.tools.zoo.tiny_llava)"
    if name == "tiny-qwen2vl":
        return zoo.tiny_qwen2vl(), "built-in tiny model (graphprune.tools.zoo.tiny_qwen2vl)"
    if name in _FAMILY_TINY:
        from graphprune.tools import family_zoo
        family = _FAMILY_TINY[name][0]
        return family_zoo.build(family), f"built-in tiny model (graphprune.tools.family_zoo.build({family!r}))"
    from transformers import AutoConfig

    from graphprune.tools.accountant import model_class_for
    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {name!r}: not a built-in model ({', '.join(TINY)}), a local directory or a "
                       f"hub id in the local Hugging Face cache ({_first_line(e)}); for a full-size model "
                       "without weights use --config") from None
    cls = model_class_for(cfg)
    try:
        model = cls.from_pretrained(name, local_files_only=True, attn_implementation="sdpa", dtype="auto")
    except OSError as e:
        raise InputError(f"cannot load the weights of {name!r} from the local cache: {_first_line(e)}") from None
    return model.eval(), "pretrained (local files)"


def _first_line(e) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def sample_prompt(model, name: str, *, any_model: bool = False):
    """(example, source) for a tiny model (or, with any_model, any LLaVA / Qwen2-VL); else (None, None)."""
    from graphprune.tools import zoo
    cls = type(model).__name__
    if name == "tiny-llava" or (any_model and cls == "LlavaForConditionalGeneration"):
        return zoo.llava_example(model), "graphprune.tools.zoo.llava_example"
    if name == "tiny-qwen2vl" or (any_model and cls == "Qwen2VLForConditionalGeneration"):
        return zoo.qwen2vl_example(model), "graphprune.tools.zoo.qwen2vl_example"
    by_type = {fam: items for fam, items in _FAMILY_TINY.values()}
    kind = getattr(model.config, "model_type", None)
    if name in _FAMILY_TINY or (any_model and kind in by_type):
        from graphprune.tools import family_zoo
        items = by_type[kind]
        return family_zoo.example(model, items=items), f"graphprune.tools.family_zoo.example(items={items})"
    return None, None
