"""Finetuning with Monarch attention, end to end on one GPU (or the CPU).

A small video-shaped transformer learns to denoise synthetic latent videos (a few coloured blobs
drifting across the frames, plus Gaussian noise of a random level per sample), first with dense
attention (torch SDPA), then every self-attention is switched to Monarch attention with the same
weights and the model is finetuned; as a control, a copy continues with dense attention for the
same steps on the same batches. Prints the loss curves (each point: the mean training loss of the
last `--log-every` steps), held-out losses, and the training throughput (steps/s) of each.

    python examples/finetune.py                      # GPU: grid 4x30x52 (6240 tokens), bf16
    python examples/finetune.py --device cpu --grid 3x6x8 --dense-steps 150 --monarch-steps 100
"""
import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

import monarchrt


def parse_grid(s):
    T, h, w = (int(x) for x in s.split("x"))
    return T, h, w


def synthetic_videos(batch, grid, channels, gen, device):
    """Clean latent videos [B, T*h*w, C]: 3 blobs per video with random colour, size, position and
    velocity, summed; token (t, y, x) in row-major order like a Wan latent grid."""
    T, h, w = grid
    t = torch.arange(T, device=device).view(1, 1, T, 1, 1).float()
    y = torch.arange(h, device=device).view(1, 1, 1, h, 1).float()
    x = torch.arange(w, device=device).view(1, 1, 1, 1, w).float()

    def r(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    blobs = 3
    cy, cx = r(batch, blobs, 1, 1, 1) * h, r(batch, blobs, 1, 1, 1) * w
    vy, vx = (r(batch, blobs, 1, 1, 1) - 0.5) * h * 0.3, (r(batch, blobs, 1, 1, 1) - 0.5) * w * 0.3
    size = 1.0 + r(batch, blobs, 1, 1, 1) * 0.15 * (h + w)
    d2 = (y - cy - vy * t) ** 2 + (x - cx - vx * t) ** 2
    mask = torch.exp(-d2 / (2 * size ** 2))                              # [B, blobs, T, h, w]
    colour = torch.randn(batch, blobs, channels, generator=gen, device=device)
    video = torch.einsum("bnthw,bnc->bthwc", mask, colour)
    return video.reshape(batch, T * h * w, channels)


class Block(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x, grid, attention):
        B, S, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, C // self.heads).unbind(2)  # [B, S, H, D]
        if attention == "monarch":
            o = monarchrt.monarch_attention(q, k, v, grid, tiling=(1, 1, 1))
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        x = x + self.proj(o.reshape(B, S, C))
        return x + self.mlp(self.norm2(x))


class VideoDenoiser(torch.nn.Module):
    def __init__(self, grid, channels, dim, heads, depth):
        super().__init__()
        T, h, w = grid
        self.grid = grid
        self.attention = "dense"
        self.inp = torch.nn.Linear(channels + 1, dim)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, T * h * w, dim))
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = torch.nn.Linear(dim, channels)

    def forward(self, noisy, sigma):
        x = self.inp(torch.cat([noisy, sigma.expand(-1, noisy.shape[1], 1)], dim=-1)) + self.pos
        for block in self.blocks:
            x = block(x, self.grid, self.attention)
        return self.out(x)


def batch_of(args, gen, device):
    clean = synthetic_videos(args.batch, args.grid, args.channels, gen, device)
    sigma = 0.2 + 0.8 * torch.rand(args.batch, 1, 1, generator=gen, device=device)
    noisy = clean + sigma * torch.randn(clean.shape, generator=gen, device=device)
    return noisy, sigma, clean


def loss_of(model, batch, amp_dtype):
    noisy, sigma, clean = batch
    with torch.autocast(noisy.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred = model(noisy, sigma)
    return F.mse_loss(pred.float(), clean)


def train(model, opt, steps, args, gen, device, amp_dtype, label):
    curve, window = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_of(model, batch_of(args, gen, device), amp_dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if step % args.log_every == 0 or step == steps:
            curve.append((step, sum(window) / len(window)))
            print(f"  {label:8s} step {step:5d}  train loss {curve[-1][1]:.5f}", flush=True)
            window = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    return curve, steps / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", type=parse_grid, default=None, help="T x h x w latent grid (GPU default 4x30x52)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=2, help="head dim = dim / heads (CUDA: 64 or 128)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dense-steps", type=int, default=300)
    p.add_argument("--monarch-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.grid is None:
        args.grid = (4, 30, 52) if device.type == "cuda" else (3, 6, 8)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    held_out = batch_of(args, torch.Generator(device=device).manual_seed(args.seed + 1), device)
    model = VideoDenoiser(args.grid, args.channels, args.dim, args.heads, args.depth).to(device)
    T, h, w = args.grid
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, grid {T}x{h}x{w} ({T * h * w} tokens), dim {args.dim}, heads {args.heads}, "
          f"depth {args.depth}, batch {args.batch}, {'bf16 autocast' if amp_dtype else 'fp32'}")
    print(f"Monarch tiles {h}x{w} (one per frame): parameter sparsity "
          f"{100 * (1 - (h + w) / (h * w)):.1f}%")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    print("phase 1: dense attention (SDPA)")
    dense_curve, dense_sps = train(model, opt, args.dense_steps, args, gen, device, amp_dtype, "dense")
    with torch.no_grad():
        dense_eval = loss_of(model, held_out, amp_dtype).item()
        model.attention = "monarch"
        switch_eval = loss_of(model, held_out, amp_dtype).item()
    print(f"held-out loss: dense {dense_eval:.5f}; same weights with Monarch attention {switch_eval:.5f}")

    control = copy.deepcopy(model)
    control.attention = "dense"
    print("phase 2a: Monarch attention, finetuning")
    state = gen.get_state()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr / 2)
    monarch_curve, monarch_sps = train(model, opt, args.monarch_steps, args, gen, device, amp_dtype, "monarch")
    print("phase 2b (control): dense attention, the same steps on the same batches")
    gen.set_state(state)
    opt = torch.optim.AdamW(control.parameters(), lr=args.lr / 2)
    control_curve, control_sps = train(control, opt, args.monarch_steps, args, gen, device, amp_dtype, "dense")
    with torch.no_grad():
        monarch_eval = loss_of(model, held_out, amp_dtype).item()
        control_eval = loss_of(control, held_out, amp_dtype).item()
    print(f"held-out loss after phase 2: Monarch {monarch_eval:.5f}, dense control {control_eval:.5f}")
    print(f"throughput (steps/s): dense phase 1 {dense_sps:.2f}, Monarch phase 2a {monarch_sps:.2f}, "
          f"dense phase 2b {control_sps:.2f}")
    dense_curve += control_curve
    if not all(math.isfinite(l) for _, l in dense_curve + monarch_curve):
        raise SystemExit("non-finite loss")


if __name__ == "__main__":
    main()
