"""The C++ checkpoint readers against real files: torch.save writes .pt files (nested generator /
generator_ema dicts, parameters, views, every float dtype, the real Wan key names), a safetensors
file is written here by an independent few-line writer, and `monarchrt inspect --json --sums`
must list every tensor with torch's dtype, shape and sum."""
import json
import os
import struct
import subprocess
from collections import OrderedDict

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def cli():
    for path in (os.environ.get("MONARCHRT_CLI"), os.path.join(ROOT, "build", "monarchrt"),
                 os.path.join(ROOT, "build-gpu", "monarchrt")):
        if path and os.path.exists(path):
            return path
    pytest.skip("the monarchrt command is not built (bash scripts/build.sh)")


def inspect(path):
    out = subprocess.run([cli(), "inspect", str(path), "--json", "--sums"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return {t["name"]: t for t in json.loads(out.stdout)}


NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def wan_like_state_dict():
    torch.manual_seed(0)
    sd = OrderedDict()
    sd["model.patch_embedding.weight"] = torch.randn(8, 16, 1, 2, 2)
    sd["model.blocks.0.self_attn.q.weight"] = torch.nn.Parameter(torch.randn(8, 8))
    sd["model.blocks.0.modulation"] = torch.randn(1, 6, 8)
    sd["model.blocks.0.ffn.0.weight"] = torch.randn(12, 8).bfloat16()
    sd["model.head.head.weight"] = torch.randn(8, 4).half().t()       # non-contiguous view
    sd["model.text_embedding.0.bias"] = torch.randn(20)[3:11]          # storage offset
    sd["model.time_projection.1.bias"] = torch.randn(8).double()
    sd["model.scalar"] = torch.tensor(2.5)
    return sd


def check(listing, name, tensor):
    assert name in listing, name
    entry = listing[name]
    assert entry["dtype"] == NAMES[tensor.dtype]
    assert entry["shape"] == list(tensor.shape)
    want = float(tensor.detach().double().sum())
    assert abs(entry["sum"] - want) <= 1e-6 * max(1.0, abs(want)), name


def test_torch_save_self_forcing_layout(tmp_path):
    sd = wan_like_state_dict()
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": sd, "generator_ema": OrderedDict((k, v * 2) for k, v in sd.items()),
                "critic": {"w": torch.randn(3)}, "step": 100, "note": "extra entries are ignored"}, path)
    listing = inspect(path)
    assert len(listing) == 2 * len(sd) + 1
    for k, v in sd.items():
        check(listing, "generator/" + k, v)
        check(listing, "generator_ema/" + k, v * 2)


def test_torch_save_plain_state_dict(tmp_path):
    sd = wan_like_state_dict()
    path = tmp_path / "plain.pth"
    torch.save(sd, path)
    listing = inspect(path)
    assert set(listing) == set(sd)
    for k, v in sd.items():
        check(listing, k, v)


def test_safetensors_from_an_independent_writer(tmp_path):
    tensors = {"blocks.0.self_attn.q.weight": torch.randn(4, 6), "head.modulation": torch.randn(1, 2, 6).half(),
               "blocks.0.norm3.bias": torch.randn(6).bfloat16()}
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = bytes(t.contiguous().flatten().view(torch.uint8).tolist())  # little-endian bytes
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    listing = inspect(path)
    assert set(listing) == set(tensors)
    for k, v in tensors.items():
        check(listing, k, v)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(wan_like_state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = subprocess.run([cli(), "inspect", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "cut.pt" in out.stderr and "corrupt" in out.stderr.lower()
