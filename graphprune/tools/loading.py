"""Models by name for the CLI and the tools: the built-in tiny models, a local folder or a model
in the local Hugging Face cache (never the network), and an example prompt for the tiny ones."""
from __future__ import annotations

import json
import os

from graphprune.compat import plain_model_kwargs
from graphprune.errors import InputError

TINY = ("tiny-llava", "tiny-qwen2vl", "tiny-qwen2.5vl", "tiny-llava-next", "tiny-llava-onevision")
# built-in tiny models of the other families: name -> (family_zoo family, what its sample prompt shows)
_FAMILY_TINY = {"tiny-qwen2.5vl": ("qwen2_5_vl", ("image", "video")), "tiny-llava-next": ("llava_next", ("image",)),
                "tiny-llava-onevision": ("llava_onevision", ("video",))}


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_model(name: str, *, trust_remote_code: bool = False, allow_pickle_weights: bool = False):
    """(model, source) for a built-in tiny name, a local path or a cached hub id.

    No code from the model's folder runs unless `trust_remote_code` (a folder that ships its own
    Python is refused before transformers sees it, so its interactive prompt never appears), and
    weights load from safetensors only unless `allow_pickle_weights` (unpickling can run code)."""
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
    if os.path.isdir(name):
        check_model_folder(name, trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights)
    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {name!r}: not a built-in model ({', '.join(TINY)}), a local directory or a "
                         f"hub id in the local Hugging Face cache ({_first_line(e)}); for a full-size model "
                         "without weights use --config") from None
    cls = model_class_for(cfg)
    try:
        model = cls.from_pretrained(name, local_files_only=True, attn_implementation="sdpa", dtype="auto",
                                    **plain_model_kwargs(trust_remote_code=trust_remote_code,
                                                         use_safetensors=not allow_pickle_weights))
    except (OSError, ValueError) as e:
        hint = "" if allow_pickle_weights else (" (graphprune reads safetensors weights only; for pickle weights you "
                                                "trust pass --allow-pickle-weights)")
        raise InputError(f"cannot load the weights of {name!r} from local files: {_first_line(e)}{hint}") from None
    return model.eval(), "pretrained (local files)"


def check_model_folder(path: str, *, trust_remote_code: bool = False, allow_pickle_weights: bool = False) -> None:
    """Refuse a model folder that ships Python code (unless trusted) or holds weights only in a
    pickle format (unless allowed), naming the option that overrides it."""
    files = os.listdir(path)
    if not trust_remote_code:
        code = sorted(f for f in files if f.endswith(".py"))
        auto_map = None
        try:
            with open(os.path.join(path, "config.json")) as f:
                auto_map = json.load(f).get("auto_map")
        except (OSError, ValueError, AttributeError):
            pass
        if code or auto_map:
            what = ", ".join(code) if code else f"auto_map {sorted(auto_map)} in config.json"
            raise InputError(f"{path}: the model folder ships its own Python code ({what}); graphprune does not run "
                             "code from model folders. Pass --trust-remote-code (trust_remote_code=True) only if "
                             "you trust it")
    weights = [f for f in files if f.endswith(".safetensors")]
    pickles = sorted(f for f in files if f.endswith(PICKLE_WEIGHTS))
    if not weights and not (allow_pickle_weights and pickles):
        found = (f"only pickle weights ({', '.join(pickles)}), which can run code when loaded; convert them to "
                 "safetensors, or pass --allow-pickle-weights (allow_pickle_weights=True) if you trust them"
                 if pickles else "no weights (*.safetensors); for a model without weights use --config")
        raise InputError(f"{path}: {found}")


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
