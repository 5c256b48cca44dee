"""An independent PyTorch implementation of the causal Wan DiT and the Self-Forcing loop, written
from ../shared/docs/self-forcing-spec.md (sections 1.3, 2.2-2.4) for parity tests of the C++
engine. It uses torch's own building blocks where the engine has hand-written loops (conv3d for
the patch embedding, complex multiplication for RoPE, scaled_dot_product_attention, layer_norm),
runs in float64 by default (any dtype and device for the GPU parity check and the eager
benchmark, bench/engine_bench.py), and supports the full-sequence block-causal forward as well as
the KV cache. Monarch attention is computed here from the specification with einsums (section 2
of ../shared/docs/monarch-attention.md, tiles gathered by the layout's token permutation), not
through the monarchrt op, except for block-causal calls."""
import math

import torch
import torch.nn.functional as F


def rms(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def rope_freqs(hd):
    """Per complex pair: (axis, inverse frequency); axis 0 = frame, 1 = row, 2 = column."""
    c_hw = 2 * (hd // 6)
    c_t = hd - 2 * c_hw
    axes, inv = [], []
    for axis, ch in ((0, c_t), (1, c_hw), (2, c_hw)):
        for i in range(ch // 2):
            axes.append(axis)
            inv.append(10000.0 ** (-2.0 * i / ch))
    return torch.tensor(axes), torch.tensor(inv, dtype=torch.float64)


def apply_rope(x, frames, th, tw, f0):
    """x [B, S, H, hd]; token n at (f0 + n // (th tw), (n // tw) % th, n % tw). Angles in float64;
    the rotation in complex128 for float64 inputs, complex64 otherwise."""
    B, S, H, hd = x.shape
    axes, inv = rope_freqs(hd)
    n = torch.arange(S)
    pos = torch.stack([f0 + n // (th * tw), (n // tw) % th, n % tw], dim=1).double()  # [S, 3]
    angle = pos[:, axes] * inv  # [S, hd/2]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    ctype = torch.complex128 if work == torch.float64 else torch.complex64
    rot = torch.polar(torch.ones_like(angle), angle).to(ctype).to(x.device)
    xc = torch.view_as_complex(x.to(work).reshape(B, S, H, hd // 2, 2).contiguous())
    return torch.view_as_real(xc * rot[None, :, None, :]).reshape(B, S, H, hd).to(x.dtype)


def tile_permutation(frames, h, w, tiling, device):
    """[tiles, b1, b2] natural token index of each (tile, row, column) (spec section 1)."""
    ft, hr, wr = tiling
    rows, cols = h // hr, w // wr
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij")
    a = ((t // ft) * hr + y // rows) * wr + x // cols
    r = (t % ft) * rows + y % rows
    c = x % cols
    perm = torch.empty(frames * h * w, dtype=torch.long)
    perm[((a * ft * rows + r) * cols + c).flatten()] = ((t * h + y) * w + x).flatten()
    return perm.view(-1, ft * rows, cols).to(device)


def monarch_attention(q, k, v, qgrid, tiling, scale):
    """One-iteration Monarch attention (spec section 2) of q [B, Sq, H, D] over every key of
    k, v [B, Sk, H, D] (no mask): Sq and Sk whole frames of the grid (h, w) = qgrid[1:]."""
    T, h, w = qgrid
    B, Sq, H, D = q.shape
    pq = tile_permutation(T, h, w, tiling, q.device)
    pk = tile_permutation(k.shape[1] // (h * w), h, w, tiling, q.device)
    Q = q[:, pq].permute(0, 4, 1, 2, 3, 5)  # [B, H, A, b1, b2, D]
    K = k[:, pk].permute(0, 4, 1, 2, 3, 5)  # [B, H, F, b1, b2, D]
    V = v[:, pk].permute(0, 4, 1, 2, 3, 5)
    z = scale * torch.einsum("bhmkjd,bhnkid->bhmnkji", Q, K)  # stage 1: query (m,k,j) vs key row (n,k)
    lse = torch.logsumexp(z, -1, keepdim=True)
    R = torch.exp(z - lse)
    aL = torch.einsum("bhmnkji,bhnkid->bhmnkjd", R, K)
    Y = torch.einsum("bhmnkji,bhnkid->bhmnkjd", R, V)
    cL = (R * (z - lse)).sum(-1)  # [B, H, A, F, b1 (k), b2 (j)]
    u = scale * torch.einsum("bhmljd,bhmnkjd->bhmljnk", Q, aL) - cL.permute(0, 1, 2, 5, 3, 4)[:, :, :, None]
    L = torch.softmax(u.flatten(-2), -1).view_as(u)  # stage 2 over all (key tile, row)
    o = torch.einsum("bhmljnk,bhmnkjd->bhmljd", L, Y)  # [B, H, A, b1, b2, D]
    out = torch.empty_like(q)
    out[:, pq.flatten()] = o.permute(0, 2, 3, 4, 1, 5).reshape(B, Sq, H, D)
    return out


class WanReference:
    def __init__(self, sd, heads, eps=1e-6, attention="dense", tiling=(1, 1, 1), dtype=torch.float64, device="cpu",
                 sink_frames=0, window_frames=0):
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
        self.heads, self.eps, self.attention, self.tiling = heads, eps, attention, tiling
        # KV-cache window (spec section 4): the first sink_frames and the window_frames most recent
        # frames (the current chunk included) are attended; 0 = every frame.
        self.sink_frames, self.window_frames = sink_frames, window_frames
        self.dtype, self.device = dtype, torch.device(device)
        self.dim = self.w["patch_embedding.weight"].shape[0]
        self.layers = sum(1 for k in self.w if k.endswith(".modulation") and k.startswith("blocks."))

    def lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def set_text(self, ctx):
        ctx = ctx.to(device=self.device, dtype=self.dtype)
        c = self.lin(F.gelu(self.lin(ctx, "text_embedding.0"), approximate="tanh"), "text_embedding.2")
        self.text = []
        for i in range(self.layers):
            p = f"blocks.{i}.cross_attn."
            self.text.append((rms(self.lin(c, p + "k"), self.w[p + "norm_k.weight"], self.eps), self.lin(c, p + "v")))

    def time(self, t):
        half = self.w["time_embedding.0.weight"].shape[1] // 2
        w = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        s = torch.cat([torch.cos(t * w), torch.sin(t * w)]).to(device=self.device, dtype=self.dtype)
        e = self.lin(F.silu(self.lin(s, "time_embedding.0")), "time_embedding.2")
        e0 = self.lin(F.silu(e), "time_projection.1").view(6, self.dim)
        return e, e0

    def attend(self, q, k, v, grid, **mode):
        """q [B, Sq, H, hd], k/v [B, Sk, H, hd]."""
        if self.attention == "monarch":
            if not mode.get("causal_chunk_frames"):
                return monarch_attention(q, k, v, grid, self.tiling, q.shape[-1] ** -0.5)
            import monarchrt
            return monarchrt.monarch_attention(q, k, v, grid, self.tiling, **mode)
        mask = None
        if mode.get("causal_chunk_frames"):
            per = grid[1] * grid[2]
            chunk = torch.arange(q.shape[1], device=q.device) // (per * mode["causal_chunk_frames"])
            mask = chunk[:, None] >= chunk[None, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2)

    def forward(self, x, t, start_frame, cache=None, causal_chunk_frames=0):
        """x [B, F, C, H, W] -> flow, same layout. With `cache` (list of per-layer dicts with 'k', 'v'
        [B, frames*tokens, heads, hd] tensors), the chunk's K/V are written at its frames and the
        queries attend frames [0, start + F) (or the sink and the window of them); without, a
        full-sequence (block-causal) pass."""
        B, Fr, C, Hl, Wl = x.shape
        pw_ = self.w["patch_embedding.weight"]
        ph, pww = pw_.shape[3], pw_.shape[4]
        th, tw = Hl // ph, Wl // pww
        S, D, H = Fr * th * tw, self.dim, self.heads
        hd = D // H
        x = x.to(device=self.device, dtype=self.dtype)
        h = F.conv3d(x.permute(0, 2, 1, 3, 4), pw_, self.w["patch_embedding.bias"], stride=(1, ph, pww))
        xs = h.flatten(2).transpose(1, 2)  # [B, S, D], tokens (frame, row, col)
        e, e0 = self.time(torch.tensor(float(t), dtype=torch.float64))
        for i in range(self.layers):
            b = f"blocks.{i}."
            m = self.w[b + "modulation"][0] + e0  # [6, D]
            hn = F.layer_norm(xs, (D,), eps=self.eps) * (1 + m[1]) + m[0]
            q = rms(self.lin(hn, b + "self_attn.q"), self.w[b + "self_attn.norm_q.weight"], self.eps)
            k = rms(self.lin(hn, b + "self_attn.k"), self.w[b + "self_attn.norm_k.weight"], self.eps)
            v = self.lin(hn, b + "self_attn.v")
            q = apply_rope(q.view(B, S, H, hd), Fr, th, tw, start_frame)
            k = apply_rope(k.view(B, S, H, hd), Fr, th, tw, start_frame)
            v = v.view(B, S, H, hd)
            if cache is not None:
                per = th * tw
                cache[i]["k"][:, start_frame * per:(start_frame + Fr) * per] = k
                cache[i]["v"][:, start_frame * per:(start_frame + Fr) * per] = v
                used = start_frame + Fr
                frames = [f for f in range(used) if not self.window_frames or f < self.sink_frames
                          or f >= used - self.window_frames]
                idx = torch.cat([torch.arange(f * per, (f + 1) * per) for f in frames]).to(self.device)
                o = self.attend(q, cache[i]["k"][:, idx], cache[i]["v"][:, idx], (Fr, th, tw), kv_cache=True)
            else:
                o = self.attend(q, k, v, (Fr, th, tw), causal_chunk_frames=causal_chunk_frames)
            xs = xs + self.lin(o.reshape(B, S, D), b + "self_attn.o") * m[2]
            hn = F.layer_norm(xs, (D,), self.w[b + "norm3.weight"], self.w[b + "norm3.bias"], eps=self.eps)
            cq = rms(self.lin(hn, b + "cross_attn.q"), self.w[b + "cross_attn.norm_q.weight"], self.eps).view(B, S, H, hd)
            tk, tv = self.text[i]
            L = tk.shape[1]
            co = F.scaled_dot_product_attention(cq.transpose(1, 2), tk.view(B, L, H, hd).transpose(1, 2),
                                                tv.view(B, L, H, hd).transpose(1, 2)).transpose(1, 2)
            xs = xs + self.lin(co.reshape(B, S, D), b + "cross_attn.o")
            hn = F.layer_norm(xs, (D,), eps=self.eps) * (1 + m[4]) + m[3]
            xs = xs + self.lin(F.gelu(self.lin(hn, b + "ffn.0"), approximate="tanh"), b + "ffn.2") * m[5]
        hm = self.w["head.modulation"][0]
        hn = F.layer_norm(xs, (D,), eps=self.eps) * (1 + hm[1] + e) + hm[0] + e
        out = self.lin(hn, "head.head")  # [B, S, ph * pw * C_out]
        Co = out.shape[-1] // (ph * pww)
        out = out.view(B, Fr, th, tw, ph, pww, Co).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(B, Fr, Co, Hl, Wl)


def self_forcing_steps():
    sigma = torch.linspace(1.0, 0.0, 1001)[:-1]  # float32 tables, shift 5
    sigma = 5.0 * sigma / (1.0 + 4.0 * sigma)
    timesteps = sigma * 1000.0
    return [(float(timesteps[i]), float(sigma[i])) for i in (0, 250, 500, 750)]


def self_forcing_generate(model, noise, renoise, chunk, on_chunk=None):
    """noise [B, T, C, H, W]; renoise [chunks, 3, B, chunk, C, H, W]; returns clean latents."""
    B, T, C, Hl, Wl = noise.shape
    pw_ = model.w["patch_embedding.weight"]
    th, tw = Hl // pw_.shape[3], Wl // pw_.shape[4]
    D = model.dim
    like = dict(dtype=model.dtype, device=model.device)
    cache = [{"k": torch.zeros(B, T * th * tw, model.heads, D // model.heads, **like),
              "v": torch.zeros(B, T * th * tw, model.heads, D // model.heads, **like)}
             for _ in range(model.layers)]
    steps = self_forcing_steps()
    out = torch.zeros(B, T, C, Hl, Wl, **like)
    for k in range(T // chunk):
        s = k * chunk
        xt = noise[:, s:s + chunk].to(**like)
        for j, (t, sigma) in enumerate(steps):
            v = model.forward(xt, t, s, cache)
            x0 = xt - sigma * v
            if j < 3:
                sn = steps[j + 1][1]
                xt = (1 - sn) * x0 + sn * renoise[k, j].to(**like)
        out[:, s:s + chunk] = x0
        if s + chunk < T:  # the last chunk's refresh is never read
            model.forward(x0, 0.0, s, cache)
        if on_chunk:
            on_chunk(k)
    return out
