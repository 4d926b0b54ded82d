"""The on-disk format of an ONNX export: file names and the manifest that lists the stages.

Read by the exporter (targets.onnx), the runner (targets.ort) and the static checks (targets.lint)."""
from __future__ import annotations

import json
import os

from graphprune.errors import InputError

FORMAT = "graphprune-onnx/1"
STAGE_FILES = {"vision": "vision.onnx", "prefill": "prefill.onnx", "decode": "decode.onnx"}
EMBED_FILE = "embed_tokens.npy"
MANIFEST = "manifest.json"
# the manifest's "host_vision" entry: no vision.onnx, the runner needs the model
HOST_VISION_NOTE = ("the vision encoder (get_image_features / get_video_features) and the M-RoPE positions "
                    "(get_rope_index) run on the host in torch: OrtPrunedModel(out_dir, model=model)")



DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


class Manifest(dict):
    """The parsed manifest.json of an export directory (a dict), with its directory. `load`
    checks it against the format before anything reads it: a tampered or truncated folder gives
    an InputError naming the file and the key, and every file it names is one of the export's
    own names inside the folder (no absolute paths, no "..", no symlink leading out)."""

    def __init__(self, data: dict, out_dir: str | None = None):
        super().__init__(data)
        self.out_dir = out_dir

    @classmethod
    def load(cls, out_dir) -> "Manifest":
        out_dir = os.fspath(out_dir)
        path = os.path.join(out_dir, MANIFEST)
        if not os.path.isfile(path):
            raise InputError(f"{out_dir}: no {MANIFEST}; not a graphprune ONNX export (write one with "
                             "graphprune.targets.onnx.export_onnx or `graphprune export-onnx`)")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e}); re-export the model") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: a JSON object was expected, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise InputError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        _validate(data, path)
        manifest = cls(data, out_dir)
        for name in manifest.files:
            manifest.file_path(name)
        return manifest

    def stage(self, name: str) -> dict:
        return self["stages"][name]

    def path(self, name: str) -> str:
        return self.file_path(self["stages"][name]["file"])

    def file_path(self, name: str) -> str:
        """The path of one of the export's files, refused unless it stays inside the folder."""
        where = os.path.join(self.out_dir, MANIFEST)
        if name not in (*STAGE_FILES.values(), EMBED_FILE, MANIFEST):
            raise InputError(f"{where}: file name {name!r} is not one of the export's own "
                             f"({', '.join((*STAGE_FILES.values(), EMBED_FILE))})")
        path = os.path.join(self.out_dir, name)
        root = os.path.realpath(self.out_dir)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise InputError(f"{path}: links outside the export folder {self.out_dir}")
        return path

    @property
    def files(self) -> list[str]:
        return [s["file"] for s in self["stages"].values()] + [self["embedding"]["file"], MANIFEST]


# -- the schema ---------------------------------------------------------------------------------

_INT, _STR, _LIST, _DICT = (int,), (str,), (list,), (dict,)
_TOP = {"format": _STR, "model_class": _STR, "family": _STR, "image_token_id": _INT, "num_layers": _INT,
        "pipeline": _LIST, "pipeline_repr": _STR, "budgets": _LIST, "embedding": _DICT, "stages": _DICT,
        "reference_prompt": _DICT}
_STAGE = {"file": _STR, "inputs": _LIST, "outputs": _LIST, "graph_inputs": _DICT, "none_inputs": _LIST,
          "graph_outputs": _LIST}
_REFERENCE = {"images_per_sample": _INT, "vision_tokens_per_image_in_llm": _INT}


def _validate(data: dict, path: str) -> None:
    def need(d: dict, keys: dict, where: str):
        for k, types in keys.items():
            if k not in d:
                raise InputError(f"{path}: missing key {where}{k!r}")
            v = d[k]
            if not isinstance(v, types) or (types is _INT and isinstance(v, bool)):
                raise InputError(f"{path}: {where}{k!r} must be {'/'.join(t.__name__ for t in types)}, "
                                 f"got {type(v).__name__}")

    def strings(v, where):
        if not all(isinstance(x, str) for x in v):
            raise InputError(f"{path}: {where} must hold strings only")

    need(data, _TOP, "")
    if data["num_layers"] < 1:
        raise InputError(f"{path}: 'num_layers' must be >= 1, got {data['num_layers']}")
    strings(data["pipeline"], "'pipeline'")
    if not all(isinstance(b, dict) for b in data["budgets"]):
        raise InputError(f"{path}: 'budgets' must be a list of objects")
    for k in ("eos_token_id", "pad_token_id"):
        v = data.get(k)
        if not (v is None or (isinstance(v, int) and not isinstance(v, bool))
                or (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v))):
            raise InputError(f"{path}: {k!r} must be an integer, a list of them or null")
    need(data["reference_prompt"], _REFERENCE, "reference_prompt.")
    if "image_bucket" in data:
        _validate_bucket(data["image_bucket"], path)
    if "video_bucket" in data:
        _validate_video_bucket(data["video_bucket"], path)
    grids = data.get("grid_bucket")
    if grids is not None and not (isinstance(grids, dict) and all(
            isinstance(grids.get(k), int) and not isinstance(grids.get(k), bool) and grids[k] > 0
            for k in ("units_per_sample", "tokens_per_unit"))):
        raise InputError(f"{path}: 'grid_bucket' must state units_per_sample and tokens_per_unit (positive "
                         f"integers), got {grids!r}")
    emb = data["embedding"]
    need(emb, {"file": _STR, "shape": _LIST, "dtype": _STR}, "embedding.")
    if len(emb["shape"]) != 2 or not all(isinstance(x, int) and x > 0 for x in emb["shape"]):
        raise InputError(f"{path}: embedding.shape must be [vocab, hidden], got {emb['shape']!r}")
    want = set(STAGE_FILES) - ({"vision"} if "host_vision" in data else set())
    if set(data["stages"]) != want:
        raise InputError(f"{path}: 'stages' must name {', '.join(sorted(want))}, got {sorted(data['stages'])}")
    for name, st in data["stages"].items():
        where = f"stages.{name}."
        if not isinstance(st, dict):
            raise InputError(f"{path}: 'stages.{name}' must be an object")
        need(st, _STAGE, where)
        strings(st["none_inputs"], f"{where}none_inputs")
        strings(st["graph_outputs"], f"{where}graph_outputs")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in st["graph_inputs"].items()):
            raise InputError(f"{path}: {where}graph_inputs must map names to names")
        for kind in ("inputs", "outputs"):
            for i, io in enumerate(st[kind]):
                at = f"{where}{kind}[{i}]."
                if not isinstance(io, dict):
                    raise InputError(f"{path}: {at[:-1]} must be an object")
                need(io, {"name": _STR, "dtype": _STR, "shape": _LIST}, at)
                if io["dtype"] not in DTYPES:
                    raise InputError(f"{path}: {at}dtype {io['dtype']!r} is not one of {', '.join(DTYPES)}")
                if not all((isinstance(d, int) and not isinstance(d, bool) and d >= 0) or isinstance(d, str)
                           for d in io["shape"]):
                    raise InputError(f"{path}: {at}shape must hold sizes and axis names, got {io['shape']!r}")
        declared = {io["name"] for io in st["inputs"]}
        missing = sorted(set(st["graph_inputs"].values()) - declared)
        if missing:
            raise InputError(f"{path}: {where}graph_inputs name inputs {missing} that {where}inputs lacks")
        if len(st["graph_outputs"]) != len(st["outputs"]):
            raise InputError(f"{path}: {where}graph_outputs and {where}outputs differ in length")


def _validate_bucket(bucket, path: str) -> None:
    """The shape bucket of an anyres export: image_size [H, W], pixel_values [1, crops, C, H, W] (one
    image per vision.onnx call), features_per_image placeholder rows, newline_slots among them."""
    def sizes(v, n=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))

    if not isinstance(bucket, dict):
        raise InputError(f"{path}: 'image_bucket' must be an object")
    for key, ok in (("image_size", lambda v: sizes(v, 2)), ("pixel_values", lambda v: sizes(v, 5) and v[0] == 1),
                    ("features_per_image", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
                    ("newline_slots", sizes)):
        if key not in bucket:
            raise InputError(f"{path}: missing key image_bucket.{key!r}")
        if not ok(bucket[key]):
            raise InputError(f"{path}: image_bucket.{key!r} is malformed: {bucket[key]!r}")
    if any(x >= bucket["features_per_image"] for x in bucket["newline_slots"]):
        raise InputError(f"{path}: image_bucket.newline_slots reach past its {bucket['features_per_image']} "
                         "features_per_image")
    packing = bucket.get("packing")        # absent in older exports: they take their own image size only
    if packing is None:
        return
    checks = (("crop_grid", lambda v: sizes(v, 2)), ("unpadded", lambda v: sizes(v, 2)),
              ("grid_pinpoints", lambda v: isinstance(v, list) and v and all(sizes(p, 2) for p in v)),
              ("crop_size", lambda v: sizes([v]) and v > 0), ("patch_size", lambda v: sizes([v]) and v > 0),
              # imported by the runner: only a transformers modeling module
              ("modeling_module", lambda v: isinstance(v, str) and v.startswith("transformers.models.")
               and v.replace(".", "").replace("_", "").isalnum()))
    for key, ok in checks:
        if not isinstance(packing, dict) or key not in packing or not ok(packing[key]):
            raise InputError(f"{path}: image_bucket.packing.{key} is missing or malformed: "
                             f"{packing.get(key) if isinstance(packing, dict) else packing!r}")


def _validate_video_bucket(bucket, path: str) -> None:
    """The shape bucket of an anyres video export: pixel_values_videos [1, frames, C, H, W] (one video
    per vision.onnx call), features_per_video placeholder rows, closing_newlines among them."""
    def count(v, least):
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if not isinstance(bucket, dict):
        raise InputError(f"{path}: 'video_bucket' must be an object")
    for key, ok in (("pixel_values_videos", lambda v: isinstance(v, list) and len(v) == 5 and v[0] == 1
                     and all(count(x, 1) for x in v)),
                    ("features_per_video", lambda v: count(v, 1)), ("closing_newlines", lambda v: count(v, 0))):
        if key not in bucket:
            raise InputError(f"{path}: missing key video_bucket.{key!r}")
        if not ok(bucket[key]):
            raise InputError(f"{path}: video_bucket.{key!r} is malformed: {bucket[key]!r}")
