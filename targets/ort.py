"""Run an ONNX export (graphprune.targets.onnx.export_onnx) with ONNX Runtime.

    from graphprune.targets.ort import OrtPrunedModel
    ort_model = OrtPrunedModel("out/fastv")                  # CPU, or CUDA when it really loads
    out = ort_model(**inputs)                                 # same PrunedOutput as PrunedModel
    ids = ort_model.generate(**inputs, max_new_tokens=32)
    print(ort_model.provider)                                 # "CPUExecutionProvider" / "CUDAExecutionProvider"

The runner needs only the export directory (no Hugging Face model): the host-side work (where
the vision tokens are, text layout, compacting the prompt after a vision-stage selection,
embedding lookup from embed_tokens.npy, merging image features, per-layer cache bookkeeping,
decoding through transformers' generate) is graphprune.lower.runtime.PrunedModel's own code; only the three graph
calls go to ONNX Runtime sessions. Tensors cross the host boundary as CPU torch tensors; on the
CUDA execution provider inputs and outputs are bound with IOBinding (outputs on the device, then
copied back for the host-side bookkeeping).
"""
from __future__ import annotations

import importlib
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from transformers import GenerationConfig, PretrainedConfig

from graphprune.errors import GraphpruneError, InputError
from graphprune.families import Family
from graphprune.families.base import MODALITIES, check_video_unit
from graphprune.families.llava_next import LlavaNextFamily
from graphprune.lower.runtime import PrunedModel
from graphprune.rewrite.positions import LAYER_POSITIONS

from .manifest import Manifest

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise GraphpruneError("onnxruntime is not installed: pip install 'graphprune[onnx]' (or onnxruntime-gpu "
                              "for CUDA)") from e
    return onnxruntime


class _HostFamily(Family):
    """What the host side needs of a model family, read from the manifest (LLaVA-style inputs)."""

    def __init__(self, manifest: Manifest, embed: torch.Tensor):
        self.model = None
        self.model_class = manifest["model_class"]
        self.name = manifest["family"]
        self.position_axes = 1
        self._image_token = manifest["image_token_id"]
        self._video_token = manifest.get("video_token_id")
        self._embed = embed
        self._window = manifest.get("sliding_window")

    def binding_window(self):
        return self._window

    def image_token_id(self):
        return self._image_token

    def video_token_id(self):
        return self._video_token

    def embed(self, input_ids):
        return torch.nn.functional.embedding(input_ids, self._embed)

    def embed_rows(self):
        return self._embed.shape[0]


class _BucketHostFamily(_HostFamily, LlavaNextFamily):
    """An anyres family (LLaVA-NeXT, OneVision) exported for one shape bucket (manifest
    "image_bucket" or "video_bucket"): LlavaNextFamily's prompt layout over the bucket's newline
    slots (Family.with_videos for videos), the features from vision.onnx, one image or video per
    call. Images of another size, videos of another shape, and the other kind are refused."""

    def __init__(self, manifest: Manifest, embed: torch.Tensor, vision: "OrtGraph"):
        super().__init__(manifest, embed)
        self.vision = vision
        self.bucket = manifest.get("image_bucket")
        self.video_bucket = manifest.get("video_bucket")
        if self.video_bucket is not None:        # (pixel_values / image_sizes given: "unexpected inputs")
            self.vision_inputs, self.image_feature_inputs = ("pixel_values_videos",), ()
            self.video_newline = self.video_bucket["closing_newlines"]
        else:
            self.vision_inputs, self.image_feature_inputs = ("pixel_values", "image_sizes"), ("image_sizes",)

    def body(self):
        return None                       # no Hugging Face model: image_features runs vision.onnx

    def config(self):
        """The anyres facts image_packing reads, from the manifest's packing."""
        p = self.bucket["packing"]
        return SimpleNamespace(image_grid_pinpoints=p["grid_pinpoints"],
                               vision_config=SimpleNamespace(image_size=p["crop_size"], patch_size=p["patch_size"]))

    def modeling_module(self):
        return importlib.import_module(self.bucket["packing"]["modeling_module"])

    def _check_size(self, image_size) -> None:
        """Images packed like the export's (AnyresPacking: crop grid and unpadded patch grid) share its
        vision.onnx; an export without a packing in its manifest takes its own image size only."""
        size = [int(x) for x in torch.as_tensor(image_size).tolist()]
        if "packing" in self.bucket:
            packing = self.image_packing(size)
            want = self.bucket["packing"]
            if [list(packing.grid), list(packing.unpadded)] == [want["crop_grid"], want["unpadded"]]:
                return
            got = f"{packing.grid[0]} x {packing.grid[1]} crops unpadded to {packing.unpadded[0]} x {packing.unpadded[1]}"
        elif size == self.bucket["image_size"]:
            return
        else:
            got = "another size"
        h, w = self.bucket["image_size"]
        raise InputError(f"image_sizes {size} ({got}): this export holds one shape bucket, images packed like {h}x{w} "
                         f"(pixel_values {tuple(self.bucket['pixel_values'][1:])} per image); export again "
                         "with an example of the size you serve")

    def newline_slots(self, image_size: torch.Tensor) -> torch.Tensor:
        self._check_size(image_size)
        slots = torch.zeros(self.bucket["features_per_image"], dtype=torch.bool, device=image_size.device)
        slots[self.bucket["newline_slots"]] = True
        return slots

    def image_features(self, body, pixel_values, image_sizes=None, **kw):
        if image_sizes is None:
            raise InputError("the prompt has image tokens but no image_sizes were given")
        for size in image_sizes:
            self._check_size(size)
        per_image = tuple(self.bucket["pixel_values"][1:])
        if tuple(pixel_values.shape[1:]) != per_image:
            h, w = self.bucket["image_size"]
            raise InputError(f"pixel_values {tuple(pixel_values.shape)}: this export's shape bucket takes images "
                             f"of {h}x{w} as (images, {', '.join(map(str, per_image))})")
        return torch.cat([self.vision(image[None])[0] for image in pixel_values])

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES, **inputs):
        if inputs.get("pixel_values_videos") is not None:       # before the layout counts its frames
            self._check_videos(inputs["pixel_values_videos"])
        return super().vision_layout(input_ids, video_unit, modalities, **inputs)

    def _check_videos(self, pixel_values_videos) -> None:
        per_video = tuple(self.video_bucket["pixel_values_videos"][1:])
        if tuple(pixel_values_videos.shape[1:]) != per_video:
            raise InputError(f"pixel_values_videos {tuple(pixel_values_videos.shape)}: this export holds one shape "
                             f"bucket, videos of (videos, {', '.join(map(str, per_video))}) (frames, channels, height, "
                             "width); export again with an example of the videos you serve")

    def video_features(self, body, pixel_values_videos, **kw):
        self._check_videos(pixel_values_videos)
        return torch.cat([self.vision(video[None])[0] for video in pixel_values_videos])


class _Node:
    def __init__(self, name):
        self.name = name


class _Graph:
    def __init__(self, names):
        self._placeholders = [_Node(n) for n in names]

    def find_nodes(self, *, op, target=None):
        return list(self._placeholders) if op == "placeholder" else []


class OrtGraph:
    """An ONNX Runtime session that looks to graphprune.lower.runtime like a stage GraphModule: inputs
    by the graph's placeholder names (None-valued ones, specialised away at export, must stay
    None), outputs named by meta["graphprune_outputs"]."""

    def __init__(self, stage: str, session, spec: dict, device_id: int | None):
        self.stage, self.session, self.spec = stage, session, spec
        self.graph = _Graph(list(spec["graph_inputs"]) + list(spec["none_inputs"]))
        self.meta = {"graphprune_outputs": list(spec["graph_outputs"])}
        self._onnx_inputs = dict(spec["graph_inputs"])
        self._declared = {i["name"]: i for i in spec["inputs"]}
        self._outputs = [o["name"] for o in spec["outputs"]]
        self._device_id = device_id

    def __call__(self, *args):
        feeds = {}
        for node, value in zip(self.graph._placeholders, args):
            name = self._onnx_inputs.get(node.name)
            if name is None:
                if value is not None:
                    raise InputError(f"{self.stage}.onnx was exported with {node.name}=None (this pipeline had no "
                                     "such input); it cannot take a value for it")
                continue
            if value is None:
                raise InputError(f"{self.stage}.onnx needs {node.name}, got None")
            feeds[name] = np.ascontiguousarray(self._conform(node.name, value).detach().cpu().numpy())
        if self._device_id is None:
            outs = self.session.run(self._outputs, feeds)
        else:
            io = self.session.io_binding()
            for name, arr in feeds.items():
                io.bind_cpu_input(name, arr)
            for name in self._outputs:
                io.bind_output(name, "cuda", self._device_id)
            self.session.run_with_iobinding(io)
            outs = io.copy_outputs_to_cpu()
        return tuple(torch.from_numpy(np.asarray(o)) for o in outs)

    def _conform(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` in the dtype the graph declares (floating point is cast: float64 pixel_values
        run in torch, so they run here), or an InputError naming the input, if its dtype or
        fixed sizes differ."""
        decl = self._declared[self._onnx_inputs[name]]
        want = getattr(torch, decl["dtype"])
        if value.dtype != want:
            if not (value.dtype.is_floating_point and want.is_floating_point):
                raise InputError(f"{self.stage}.onnx input {name}: dtype {str(value.dtype).replace('torch.', '')}, "
                                 f"the export takes {decl['dtype']}")
            value = value.to(want)
        shape = decl["shape"]
        if value.dim() != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, value.shape)):
            raise InputError(f"{self.stage}.onnx input {name}: shape {tuple(value.shape)}, the export takes "
                             f"{shape} (named axes are free)")
        return value


class OrtPrunedModel(PrunedModel):
    """A pruned model served from an ONNX export: `forward` / `__call__` and `generate` as
    graphprune.lower.runtime.PrunedModel (same arguments, same outputs), graphs run by ONNX Runtime.

    providers: None (CUDA if onnxruntime-gpu loads it for real, else CPU), or a list as
    onnxruntime takes it. A session that silently fell back from CUDA to CPU (onnxruntime-gpu
    without its CUDA libraries) is detected from `session.get_providers()`; `provider` says what
    runs, `fallback` why CUDA was not used (None if it was not asked for or it loaded).
    """

    def __init__(self, out_dir, providers=None, *, model=None, device_id: int = 0, session_options=None):
        ort = _onnxruntime()
        torch.nn.Module.__init__(self)         # no Hugging Face model: PrunedModel.__init__ does not apply
        self.manifest = Manifest.load(out_dir)
        m = self.manifest
        host = _host_family(m, model)          # Qwen2(.5)-VL: vision and M-RoPE positions in torch
        embed = _embedding(m)
        want = list(providers) if providers is not None else (
            [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU])
        names = [p if isinstance(p, str) else p[0] for p in want]
        self.fallback = None
        sessions = self._sessions(ort, want, session_options)
        active = sessions["prefill"].get_providers()
        if CUDA in names and not all(CUDA in s.get_providers() for s in sessions.values()):
            self.fallback = (f"{CUDA} was requested but did not load (onnxruntime fell back to {active}); "
                             "running on the CPU")
            warnings.warn(self.fallback, RuntimeWarning, stacklevel=2)
            sessions = self._sessions(ort, [CPU], session_options)
        on_cuda = all(CUDA in s.get_providers() for s in sessions.values())
        self.provider = CUDA if on_cuda else sessions["prefill"].get_providers()[0]
        self.sessions = sessions
        dev = device_id if on_cuda else None
        graphs = {k: OrtGraph(k, s, m.stage(k), dev) for k, s in sessions.items()}

        # the state PrunedModel's host-side code reads (see graphprune.lower.runtime); a shape-bucket
        # vision stage runs inside the family, where the model's get_image_features would
        bucket = "image_bucket" in m or "video_bucket" in m
        self.family = host or (_BucketHostFamily(m, embed, graphs["vision"]) if bucket else _HostFamily(m, embed))
        staged = {"vision": graphs.get("vision") if host is None and not bucket else None,
                  "prefill": graphs["prefill"]}
        # (vision_passes: none run per shape bucket here; an export's vision passes are inside its graphs)
        self.program = SimpleNamespace(stages={k: SimpleNamespace(gm=g) for k, g in staged.items()},
                                       family=self.family, vision_passes=[])
        self.executables = staged                  # what PrunedModel runs per stage
        self.attention, self.linear = "onnxruntime", "onnxruntime"
        self.video_unit = check_video_unit(m.get("video_unit", "frame"))     # what a video's keep counts
        # compact positions between layers: the decode graph takes each layer's new position
        self.layer_positions = any(io["name"] == LAYER_POSITIONS for io in m["stages"]["decode"]["inputs"])
        self.decode_gm = self.decode_exec = graphs["decode"]
        self.base = None
        self.num_layers = m["num_layers"]
        self.report = None
        self._static_gm = self._static_fn = None
        self.results = [SimpleNamespace(info=dict(b)) for b in m["budgets"]]
        self.pipeline = _passes(m["pipeline"])
        # what transformers' generate reads of a model: its config and generation defaults
        self.config = PretrainedConfig(image_token_id=m["image_token_id"], eos_token_id=m.get("eos_token_id"),
                                       pad_token_id=m.get("pad_token_id"))
        self.generation_config = GenerationConfig(eos_token_id=m.get("eos_token_id"), pad_token_id=m.get("pad_token_id"))
        self._embed = embed

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")         # tensors cross the host boundary as CPU tensors

    @property
    def dtype(self) -> torch.dtype:
        return self._embed.dtype

    def get_input_embeddings(self):
        return torch.nn.Embedding.from_pretrained(self._embed)

    def _sessions(self, ort, providers, session_options) -> dict:
        sessions = {}
        for k in self.manifest["stages"]:
            path = self.manifest.path(k)
            try:
                sessions[k] = ort.InferenceSession(path, sess_options=session_options, providers=providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds (InvalidProtobuf, Fail, ...)
                raise InputError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); re-export the model") \
                    from None
            declared = {i["name"] for i in self.manifest.stage(k)["inputs"]}
            actual = {i.name for i in sessions[k].get_inputs()}
            if declared != actual:
                raise InputError(f"{path}: its inputs {sorted(actual)} differ from the manifest's {sorted(declared)}")
        return sessions

    def _layout(self, input_ids, **inputs):
        # the prefill graph fixes the images per sample (vision_pos is exported with a dynamic
        # batch only); the tokens per image follow from pixel_values, whose size is fixed too
        layout = super()._layout(input_ids, **inputs)
        want = self.manifest["reference_prompt"]["images_per_sample"]
        if layout is not None and layout.pos.shape[1] != want:
            raise InputError(f"the prompt has {layout.pos.shape[1]} image(s) per sample; this export takes {want} "
                             "(export again with an example of the layout you serve)")
        grids = self.manifest.get("grid_bucket")
        if layout is not None and grids is not None and layout.pos.shape[2] != grids["tokens_per_unit"]:
            given = {k: inputs[k].tolist() for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
            stated = {k: v for k, v in grids.items() if k.endswith("grid_thw")}
            raise InputError(f"the prompt's vision units hold {layout.pos.shape[2]} tokens each ({given}); this export "
                             f"holds one shape bucket, {grids['tokens_per_unit']} tokens per unit ({stated}): export "
                             "again with an example of the grids you serve")
        return layout

    def __repr__(self):
        return (f"OrtPrunedModel({self.manifest.out_dir!r}, provider={self.provider}, "
                f"pipeline={self.manifest['pipeline_repr']!r})")

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, past_key_values=None, cache=None, **unused):
        past_key_values = cache if cache is not None else past_key_values     # its name from transformers 5.24
        if past_key_values is not None and past_key_values.layers:       # decode: decode.onnx
            return super().forward(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                                   past_key_values, **unused)
        video = self.family.video_token_id()
        if not bool(((input_ids == self.family.image_token_id()) | (input_ids == video if video is not None
                                                                    else False)).any()):
            raise InputError("text-only prompt: the ONNX export holds the pruned prefill, which needs image tokens "
                             "(run text-only prompts on the unpruned model)")
        out = super().forward(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                              past_key_values, **unused)
        self.report._flops = None          # FLOPs are counted on torch graphs, not on ONNX sessions
        self.report.notes.append(f"ONNX Runtime ({self.provider})")
        return out

    def generate(self, *args, **kwargs):
        """As PrunedModel.generate (transformers' generate), each step one decode.onnx call."""
        if kwargs.get("static_cache"):
            raise InputError("static_cache=True decodes torch graphs in place; an ONNX export decodes with "
                             "decode.onnx over per-layer caches (leave static_cache unset)")
        return super().generate(*args, **kwargs)


def _host_family(m: Manifest, model):
    """The model's own family, for an export whose vision encoder and positions run on the host
    (manifest "host_vision"); None for the others, which take no model."""
    if "host_vision" not in m:
        if model is not None:
            raise InputError(f"{m.out_dir}: this export runs without the model (its vision stage is vision.onnx); "
                             "leave model= unset")
        return None
    if model is None:
        raise InputError(f"{m.out_dir}: {m['host_vision']}; pass model= ({m['model_class']}, the model it was "
                         "exported from)")
    from graphprune.families import family_of
    family = family_of(model)
    if family.model_class != m["model_class"]:
        raise InputError(f"model= is a {family.model_class}; this export is of a {m['model_class']}")
    return family


def _embedding(m: Manifest) -> torch.Tensor:
    path = m.file_path(m["embedding"]["file"])
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e}); re-export the model") from None
    if list(arr.shape) != m["embedding"]["shape"] or arr.dtype.kind != "f":
        raise InputError(f"{path}: a float array of shape {m['embedding']['shape']} was expected, got "
                         f"{arr.dtype} {list(arr.shape)}")
    return torch.from_numpy(arr)


def _passes(reprs: list[str]):
    """The pipeline's passes, rebuilt from their repr for prompt checks; a pass that does not
    rebuild keeps its repr only."""
    from graphprune.rewrite.pipeline import as_passes, load_builtin_methods
    load_builtin_methods()
    out = []
    for r in reprs:
        try:
            out += as_passes(r)
        except Exception:  # noqa: BLE001 - a pass whose options do not round-trip: no prompt check
            out.append(_Named(r))
    return out


class _Named:
    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text

    def check_prompt(self, prompt):
        return None
