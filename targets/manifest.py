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



class Manifest(dict):
    """The parsed manifest.json of an export directory (a dict), with its directory."""

    def __init__(self, data: dict, out_dir: str | None = None):
        super().__init__(data)
        self.out_dir = out_dir

    @classmethod
    def load(cls, out_dir) -> "Manifest":
        path = os.path.join(os.fspath(out_dir), MANIFEST)
        if not os.path.isfile(path):
            raise InputError(f"{out_dir}: no {MANIFEST}; not a graphprune ONNX export (write one with "
                             "graphprune.targets.onnx.export_onnx or `graphprune export-onnx`)")
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise InputError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(data, os.fspath(out_dir))

    def stage(self, name: str) -> dict:
        return self["stages"][name]

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, self["stages"][name]["file"])

    @property
    def files(self) -> list[str]:
        return [s["file"] for s in self["stages"].values()] + [self["embedding"]["file"], MANIFEST]
