"""A pruned model on disk: the Hugging Face checkpoint (safetensors) plus the pipeline that was applied.

    pruned.save_pretrained("out/fastv")          # config.json, model.safetensors, ..., graphprune.json
    pruned = graphprune.from_pretrained("out/fastv")

Pruning is a rewrite of the captured graphs, not of the weights, so the directory is the model's
own checkpoint (transformers' auto classes load it as the unpruned model) and `graphprune.json`
names the passes (their text form, as `graphprune.prune` parses it) and the lowering options;
loading captures the model again and re-applies them. Nothing is pickled: the weights load as
safetensors only, the model class comes from graphprune's known families (never remote code).
"""
from __future__ import annotations

import json
import os

from graphprune.compat import plain_model_kwargs
from graphprune.errors import InputError, PassConfigError, UnsupportedModelError
from graphprune.families import supported_model_types
from graphprune.rewrite.pipeline import as_passes, load_builtin_methods
from graphprune.version import __version__

SPEC_FILE = "graphprune.json"


def pipeline_text(passes) -> list[str]:
    """Each pass as text that parses back to the same pass; a pass that does not round-trip fails."""
    load_builtin_methods()
    texts = [repr(p) for p in passes]
    for text in texts:
        try:
            again = [repr(p) for p in as_passes(text)]
        except Exception as e:  # noqa: BLE001 - any parse failure means the text does not round-trip
            raise PassConfigError(f"pass {text!r} cannot be saved: its text form does not parse back ({e}); "
                                  "register the pass (graphprune.register_pass) under the name its repr uses") from e
        if again != [text]:
            raise PassConfigError(f"pass {text!r} cannot be saved: its text form parses back as {again}")
    return texts


def save_pruned(pruned, directory, **save_kwargs) -> None:
    """Write the model's checkpoint (safetensors) and graphprune.json beside it."""
    texts = pipeline_text(pruned.pipeline)          # checked before anything is written
    pruned.model.save_pretrained(directory, **save_kwargs)
    spec = {"graphprune_version": __version__, "pipeline": texts, "attention": pruned.attention,
            "linear": pruned.linear}
    with open(os.path.join(directory, SPEC_FILE), "w") as f:
        json.dump(spec, f, indent=2)
        f.write("\n")


def load_checkpoint(directory, **model_kwargs):
    """(the Hugging Face model, graphprune.json's contents) of a saved pruned model."""
    import transformers
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.isfile(path):
        raise InputError(f"{directory} holds no {SPEC_FILE}: not a directory written by PrunedModel.save_pretrained")
    with open(path) as f:
        spec = json.load(f)
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if config.model_type not in supported_model_types() or not hasattr(transformers, str(arch)):
        raise UnsupportedModelError(str(arch), "model family",
                                    f"model_type {config.model_type!r}; graphprune loads these model types: "
                                    f"{', '.join(supported_model_types())}")
    model_kwargs.setdefault("attn_implementation", "sdpa")
    model = getattr(transformers, arch).from_pretrained(directory, config=config, use_safetensors=True,
                                                        trust_remote_code=False, **plain_model_kwargs(**model_kwargs))
    return model.eval(), spec
