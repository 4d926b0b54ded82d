"""Images for the tools: a dependency-free PNG writer / reader, any format through Pillow, resizing."""
from __future__ import annotations

import os
import struct
import zlib

import torch

from graphprune.errors import InputError


def write_png(path: str, image: torch.Tensor) -> None:
    """uint8 (3, H, W) -> 8-bit RGB PNG."""
    _, h, w = image.shape
    raw = image.permute(1, 2, 0).contiguous().numpy().tobytes()
    rows = b"".join(b"\x00" + raw[y * w * 3:(y + 1) * w * 3] for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))


def read_png(path: str) -> torch.Tensor:
    """8-bit grey / grey+alpha / RGB / RGBA, non-interlaced PNG -> uint8 (3, H, W)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise InputError(f"{path}: not a PNG (install Pillow to read other formats)")
    pos, idat, head = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = head
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if depth != 8 or channels is None or interlace:
        raise InputError(f"{path}: only 8-bit non-interlaced grey/RGB(A) PNGs are read without Pillow")
    raw, stride = zlib.decompress(idat), w * channels
    out, prev = bytearray(), bytearray(stride)
    for y in range(h):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            c = prev[i - channels] if i >= channels else 0
            line[i] = (line[i] + (0, a, prev[i], (a + prev[i]) // 2, _paeth(a, prev[i], c))[ftype]) & 255
        out += line
        prev = line
    px = torch.frombuffer(out, dtype=torch.uint8).reshape(h, w, channels)
    px = px[..., :1].expand(h, w, 3) if channels <= 2 else px[..., :3]
    return px.permute(2, 0, 1).contiguous()


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size) (area average down, bilinear up)."""
    if image.shape[-2:] == (size, size):
        return image
    mode = "area" if min(image.shape[-2:]) >= size else "bilinear"
    x = torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode=mode)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def read_image(path: str) -> torch.Tensor:
    """uint8 (3, H, W) from a PNG (built-in reader) or any format Pillow reads, if installed."""
    if not os.path.isfile(path):
        raise InputError(f"image {path} does not exist")
    try:
        from PIL import Image
    except ImportError:
        return read_png(path)
    import numpy as np
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    except OSError as e:
        raise InputError(f"cannot read image {path}: {e}") from None
