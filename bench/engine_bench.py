"""The engine on the GPU at full size (Wan2.1-T2V-1.3B config, 21 latent frames of 60x104 in 7
chunks of 3): random weights in the real Self-Forcing checkpoint layout (a .pt with
generator_ema/model.* keys, bf16), random text features and injected noise. Runs

  1. `monarchrt generate --device cuda` with Monarch (released 30x52 tiles, and f_tied = 3) and
     with dense self-attention, twice each (the first video captures the CUDA graphs), and reads
     its per-chunk timings; Monarch once more with the command's own seeded re-noising draws (its
     default, made on the host during the passes) instead of the injected ones; with --profile
     also the GPU time per kind of step;
  2. parity: the independent PyTorch implementation (python/tests/wan_reference.py) on the same
     card in float32 (TF32 off) on the same weights and noise; relative L2 per chunk;
  3. the same pipeline in PyTorch eager in bf16 (SDPA for dense, the reference's einsum Monarch),
     timed per chunk, as the anchor.

Usage (on the GPU machine, after scripts/gpu_check.sh build):
    python3 bench/engine_bench.py [--cli build-gpu/monarchrt] [--workdir /tmp/engine] [--skip-eager]
It prints one table; docs/perf.md records the results."""
import argparse
import os
import re
import subprocess
import sys
import time
from collections import OrderedDict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python", "tests"))
import wan_reference as ref  # noqa: E402

D, HEADS, LAYERS, FFN, FREQ, TEXT_DIM, TEXT_LEN, C = 1536, 12, 30, 8960, 256, 4096, 512, 16


def shapes():
    s = OrderedDict()
    s["patch_embedding.weight"], s["patch_embedding.bias"] = (D, C, 1, 2, 2), (D,)
    s["text_embedding.0.weight"], s["text_embedding.0.bias"] = (D, TEXT_DIM), (D,)
    s["text_embedding.2.weight"], s["text_embedding.2.bias"] = (D, D), (D,)
    s["time_embedding.0.weight"], s["time_embedding.0.bias"] = (D, FREQ), (D,)
    s["time_embedding.2.weight"], s["time_embedding.2.bias"] = (D, D), (D,)
    s["time_projection.1.weight"], s["time_projection.1.bias"] = (6 * D, D), (6 * D,)
    for i in range(LAYERS):
        b = f"blocks.{i}."
        for a in ("self_attn", "cross_attn"):
            for m in "qkvo":
                s[f"{b}{a}.{m}.weight"], s[f"{b}{a}.{m}.bias"] = (D, D), (D,)
            s[f"{b}{a}.norm_q.weight"] = s[f"{b}{a}.norm_k.weight"] = (D,)
        s[b + "norm3.weight"] = s[b + "norm3.bias"] = (D,)
        s[b + "ffn.0.weight"], s[b + "ffn.0.bias"] = (FFN, D), (FFN,)
        s[b + "ffn.2.weight"], s[b + "ffn.2.bias"] = (D, FFN), (D,)
        s[b + "modulation"] = (1, 6, D)
    s["head.modulation"], s["head.head.weight"], s["head.head.bias"] = (1, 2, D), (4 * C, D), (4 * C,)
    return s


def random_weights(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sd = OrderedDict()
    for name, shape in shapes().items():
        x = torch.randn(shape, generator=g, device="cuda")
        if "norm" in name and name.endswith("weight"):
            x = 1 + 0.1 * x
        elif "modulation" in name:
            x = 0.1 * x
        elif len(shape) >= 2:
            x = x / float(np.prod(shape[1:])) ** 0.5
        else:
            x = 0.02 * x
        sd[name] = x.to(torch.bfloat16)
    return sd


def run_engine(cli, files, attention, frames, repeat, profile=False, tiling="1,1,1", injected=True):
    out = files[f"out_{attention}" if injected else "out_seeded"]
    cmd = [cli, "generate", "--device", "cuda", "--dit", files["dit"], "--ema", "--heads", str(HEADS),
           "--text", files["text"], "--frames", str(frames), "--noise", files["noise"],
           "--attention", attention, "--tiling", tiling, "--repeat", str(repeat), "--out", out]
    if injected:
        cmd += ["--renoise", files["renoise"]]
    if profile:
        cmd.append("--profile")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    print(f"engine {attention}{' --profile' if profile else ''}{'' if injected else ' (seeded draws)'}: "
          f"{time.time() - t0:.1f} s wall (loading included)", flush=True)
    if profile:
        print(r.stderr[r.stderr.index("GPU time per step"):r.stderr.index("wrote ")], flush=True)
    videos, chunks = [], []
    for line in r.stderr.splitlines():
        m = re.match(r"chunk (\d+)/(\d+) .* ([0-9.]+) s$", line)
        if m:
            chunks.append(float(m.group(3)))
        if re.match(r"\d+ chunks \(", line):
            videos.append(chunks)
            chunks = []
        if line.startswith("GPU memory"):
            print("  " + line)
    return videos, np.load(out)


def eager(sd, text, noise, renoise, attention, dtype):
    model = ref.WanReference(sd, HEADS, attention=attention, dtype=dtype, device="cuda")
    model.set_text(text)
    times, last = [], [time.perf_counter()]

    def on_chunk(k):
        torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with torch.no_grad():
        torch.cuda.synchronize()
        last[0] = time.perf_counter()
        out = ref.self_forcing_generate(model, noise, renoise, 3, on_chunk=on_chunk)
    return out.float().cpu(), times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", default=os.path.join(ROOT, "build-gpu", "monarchrt"))
    ap.add_argument("--workdir", default="/tmp/monarchrt-engine")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--skip-eager", action="store_true", help="no PyTorch eager timing")
    ap.add_argument("--skip-parity", action="store_true", help="no float32 PyTorch parity run")
    ap.add_argument("--profile", action="store_true", help="also run the engine with --profile (GPU time per step)")
    ap.add_argument("--attention", default="monarch,dense", help="self-attention kinds to run (default: both)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.workdir, exist_ok=True)
    T, Hl, Wl = args.frames, 60, 104
    print(f"card: {torch.cuda.get_device_name()}; 1.3B config, {T} frames of {Hl}x{Wl} latents, chunks of 3", flush=True)
    t0 = time.time()
    sd = random_weights(1)
    files = {k: os.path.join(args.workdir, v) for k, v in
             dict(dit="self_forcing_dmd.pt", text="text.npy", noise="noise.npy", renoise="renoise.npy",
                  out_monarch="latents_monarch.npy", out_dense="latents_dense.npy",
                  out_seeded="latents_seeded.npy").items()}
    torch.save({"generator_ema": OrderedDict(("model." + k, v.cpu()) for k, v in sd.items())}, files["dit"])
    g = torch.Generator().manual_seed(2)
    text = torch.randn(TEXT_LEN, TEXT_DIM, generator=g)
    noise = torch.randn(1, T, C, Hl, Wl, generator=g)
    renoise = torch.randn(T // 3, 3, 1, 3, C, Hl, Wl, generator=g)
    for name, t in (("text", text), ("noise", noise), ("renoise", renoise)):
        np.save(files[name], t.numpy())
    print(f"wrote the checkpoint ({os.path.getsize(files['dit']) / 1e9:.2f} GB) and inputs in {time.time() - t0:.1f} s",
          flush=True)

    kinds = [a for a in ("monarch", "dense") if a in args.attention.split(",")]
    results = {}
    for attention in kinds:
        videos, lat = run_engine(args.cli, files, attention, T, 2)
        results[attention] = (videos, torch.from_numpy(lat))
        if args.profile:
            run_engine(args.cli, files, attention, T, 1, profile=True)
    rows = []
    for attention in kinds:
        videos, lat = results[attention]
        warm = videos[-1]
        rows.append((f"engine {attention} (bf16, CUDA graphs)", warm, videos[0]))
        if attention == "monarch":
            videos3, _ = run_engine(args.cli, files, attention, T, 2, tiling="3,1,1")
            rows.append(("engine monarch f_tied=3 (90x52 tiles)", videos3[-1], videos3[0]))
            seeded, _ = run_engine(args.cli, files, attention, T, 2, injected=False)
            rows.append(("engine monarch, the CLI's seeded draws", seeded[-1], seeded[0]))
        if not args.skip_parity:
            want, _ = eager(sd, text[None], noise, renoise, attention, torch.float32)
            errs = [((lat[:, s:s + 3] - want[:, s:s + 3]).norm() / want[:, s:s + 3].norm()).item()
                    for s in range(0, T, 3)]
            print(f"parity {attention} vs PyTorch float32 reference, per chunk rel L2: " +
                  " ".join(f"{e:.2e}" for e in errs) + f"  (max {max(errs):.2e})", flush=True)
    if not args.skip_eager:
        for attention in kinds:
            eager(sd, text[None], noise[:, :3], renoise[:1], attention, torch.bfloat16)  # warm-up
            _, times = eager(sd, text[None], noise, renoise, attention, torch.bfloat16)
            rows.append((f"PyTorch eager {attention} (bf16)", times, None))
    print(f"\n{'pipeline':40s} {'chunk 1':>8s} {'chunk 7':>8s} {'7 chunks':>9s} {'first video':>12s}")
    for name, times, first in rows:
        first_s = f"{sum(first):12.3f}" if first else f"{'-':>12s}"
        print(f"{name:40s} {times[0]:8.3f} {times[-1]:8.3f} {sum(times):9.3f} {first_s}")


if __name__ == "__main__":
    main()
