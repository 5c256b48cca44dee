"""Parity of the C++ engine (`monarchrt generate`) with the independent PyTorch implementation in
wan_reference.py (float64) on the same random weights (a tiny config written as a Self-Forcing .pt
with the real key names), text features and injected noise: the latents agree chunk by chunk,
with dense and with Monarch self-attention, with the whole cache and with a rolling window (sink +
recent frames), on the CPU engine (fp32, relative L2 < 1e-4) and, where
a GPU and a CUDA build exist, on the GPU engine (bf16, < 1e-2; head dim 64). The reference's
chunked KV-cache forward is also checked against its full-sequence block-causal forward."""
import os
import struct
import subprocess
from collections import OrderedDict

import pytest
import torch

import wan_reference as ref
from test_checkpoint import cli

CFG = dict(dim=24, heads=2, layers=2, ffn=40, freq=8, text_dim=20, text_len=5, channels=4)
CFG_GPU = dict(dim=128, heads=2, layers=2, ffn=256, freq=32, text_dim=64, text_len=7, channels=16)


def random_state_dict(seed, cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    D, c = cfg["dim"], cfg
    shapes = {"patch_embedding.weight": (D, c["channels"], 1, 2, 2), "patch_embedding.bias": (D,),
              "text_embedding.0.weight": (D, c["text_dim"]), "text_embedding.0.bias": (D,),
              "text_embedding.2.weight": (D, D), "text_embedding.2.bias": (D,),
              "time_embedding.0.weight": (D, c["freq"]), "time_embedding.0.bias": (D,),
              "time_embedding.2.weight": (D, D), "time_embedding.2.bias": (D,),
              "time_projection.1.weight": (6 * D, D), "time_projection.1.bias": (6 * D,),
              "head.modulation": (1, 2, D), "head.head.weight": (4 * c["channels"], D),
              "head.head.bias": (4 * c["channels"],)}
    for i in range(c["layers"]):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, D)
        for a in ("self_attn", "cross_attn"):
            for m in "qkvo":
                shapes[f"{b}{a}.{m}.weight"], shapes[f"{b}{a}.{m}.bias"] = (D, D), (D,)
            shapes[f"{b}{a}.norm_q.weight"] = shapes[f"{b}{a}.norm_k.weight"] = (D,)
        shapes[b + "norm3.weight"] = shapes[b + "norm3.bias"] = (D,)
        shapes[b + "ffn.0.weight"], shapes[b + "ffn.0.bias"] = (c["ffn"], D), (c["ffn"],)
        shapes[b + "ffn.2.weight"], shapes[b + "ffn.2.bias"] = (D, c["ffn"]), (D,)
    sd = OrderedDict()
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            x = 1 + 0.1 * x
        elif len(shape) >= 2 and "modulation" not in name:
            x = x / (torch.tensor(shape[1:]).prod().float().sqrt())
        else:
            x = 0.1 * x
        sd[name] = x
    return sd


def save_npy(path, t):
    t = t.float().contiguous()
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % (
        "".join(f"{d}, " for d in t.shape))
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        f.write(bytes(t.flatten().view(torch.uint8).tolist()))


def load_npy_f32(path, shape):
    data = open(path, "rb").read()
    n = struct.unpack("<H", data[8:10])[0]
    assert b"'<f4'" in data[10:10 + n]
    flat = torch.frombuffer(bytearray(data[10 + n:]), dtype=torch.float32)
    return flat.view(*shape)


def run_case(tmp_path, attention, device="cpu", cfg=CFG, tolerance=1e-4, T=6, sink=0, window=0):
    B, chunk, Hl, Wl, C = 2, 3, 4, 6, cfg["channels"]
    gen, ema = random_state_dict(1, cfg), random_state_dict(2, cfg)
    torch.save({"generator": OrderedDict(("model." + k, v) for k, v in gen.items()),
                "generator_ema": OrderedDict(("model." + k, v) for k, v in ema.items()), "step": 1},
               tmp_path / "self_forcing_dmd.pt")
    g = torch.Generator().manual_seed(3)
    text = torch.randn(B, cfg["text_len"], cfg["text_dim"], generator=g)
    noise = torch.randn(B, T, C, Hl, Wl, generator=g)
    renoise = torch.randn(T // chunk, 3, B, chunk, C, Hl, Wl, generator=g)
    for name, t in (("text", text), ("noise", noise), ("renoise", renoise)):
        save_npy(tmp_path / f"{name}.npy", t)
    out = tmp_path / "latents.npy"
    cmd = [cli(), "generate", "--device", device, "--dit", str(tmp_path / "self_forcing_dmd.pt"), "--ema", "--heads", str(cfg["heads"]),
           "--text", str(tmp_path / "text.npy"), "--frames", str(T), "--chunk", str(chunk), "--latent", f"{Hl},{Wl}",
           "--batch", str(B), "--noise", str(tmp_path / "noise.npy"), "--renoise", str(tmp_path / "renoise.npy"),
           "--attention", attention, "--out", str(out), "--sink-frames", str(sink), "--window-frames", str(window)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = load_npy_f32(out, (B, T, C, Hl, Wl)).double()
    model = ref.WanReference(ema, cfg["heads"], attention=attention, sink_frames=sink, window_frames=window)
    model.set_text(text)
    want = ref.self_forcing_generate(model, noise, renoise, chunk)
    for k in range(T // chunk):
        s = slice(k * chunk, (k + 1) * chunk)
        err = ((got[:, s] - want[:, s]).norm() / want[:, s].norm()).item()
        print(f"{device} {attention} chunk {k}: relative L2 {err:.2e}")
        assert err < tolerance, f"chunk {k}: relative L2 {err:.2e}"
    # With other weights (generator instead of generator_ema) the result differs: the flag matters.
    other = ref.WanReference(gen, cfg["heads"], sink_frames=sink, window_frames=window)
    other.set_text(text)
    assert ((got - ref.self_forcing_generate(other, noise, renoise, chunk)).norm() / want.norm()) > 1e-2


def test_engine_matches_reference_dense(tmp_path):
    run_case(tmp_path, "dense")


def test_engine_matches_reference_monarch(tmp_path):
    run_case(tmp_path, "monarch")


# A rolling window over 12 frames: the first frame stays (sink), the 3 most recent are attended;
# the engines keep only those 4 frames of K / V (a ring buffer that wraps three times).
@pytest.mark.parametrize("attention", ["dense", "monarch"])
def test_engine_matches_reference_rolling_window(tmp_path, attention):
    run_case(tmp_path, attention, T=12, sink=1, window=3)


def cuda_engine():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    run = subprocess.run([cli(), "generate", "--device", "cuda", "--frames", "3", "--out", os.devnull],
                         capture_output=True, text=True)
    if "no CUDA" in run.stderr:
        pytest.skip("the monarchrt command was built without CUDA")


@pytest.mark.parametrize("attention", ["dense", "monarch"])
@pytest.mark.parametrize("window", [0, 3])
def test_gpu_engine_matches_reference(tmp_path, attention, window):
    cuda_engine()
    run_case(tmp_path, attention, device="cuda", cfg=CFG_GPU, tolerance=1e-2, T=12 if window else 6,
             sink=1 if window else 0, window=window)


def test_reference_kv_cache_chunks_equal_block_causal_forward():
    sd = random_state_dict(4)
    model = ref.WanReference(sd, CFG["heads"])
    g = torch.Generator().manual_seed(5)
    B, T, chunk, Hl, Wl = 1, 6, 3, 4, 6
    model.set_text(torch.randn(B, CFG["text_len"], CFG["text_dim"], generator=g))
    x = torch.randn(B, T, CFG["channels"], Hl, Wl, generator=g)
    full = model.forward(x, 500.0, 0, causal_chunk_frames=chunk)
    hd = CFG["dim"] // CFG["heads"]
    cache = [{"k": torch.zeros(B, T * 6, CFG["heads"], hd, dtype=torch.float64),
              "v": torch.zeros(B, T * 6, CFG["heads"], hd, dtype=torch.float64)} for _ in range(model.layers)]
    for s in range(0, T, chunk):
        part = model.forward(x[:, s:s + chunk], 500.0, s, cache)
        assert torch.allclose(part, full[:, s:s + chunk], atol=1e-10)
