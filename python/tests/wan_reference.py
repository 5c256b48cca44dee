"""An independent PyTorch implementation of the causal Wan DiT and the Self-Forcing loop, written
from ../shared/docs/self-forcing-spec.md (sections 1.3, 2.2-2.4) for parity tests of the C++
engine. It uses torch's own building blocks where the engine has hand-written loops (conv3d for
the patch embedding, complex multiplication for RoPE, scaled_dot_product_attention, layer_norm),
runs in float64, and supports the full-sequence block-causal forward as well as the KV cache."""
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
    """x [B, S, H, hd]; token n at (f0 + n // (th tw), (n // tw) % th, n % tw)."""
    B, S, H, hd = x.shape
    axes, inv = rope_freqs(hd)
    n = torch.arange(S)
    pos = torch.stack([f0 + n // (th * tw), (n // tw) % th, n % tw], dim=1).double()  # [S, 3]
    angle = pos[:, axes] * inv  # [S, hd/2]
    rot = torch.polar(torch.ones_like(angle), angle).to(torch.complex128)
    xc = torch.view_as_complex(x.double().reshape(B, S, H, hd // 2, 2).contiguous())
    return torch.view_as_real(xc * rot[None, :, None, :]).reshape(B, S, H, hd).to(x.dtype)


class WanReference:
    def __init__(self, sd, heads, eps=1e-6, attention="dense", tiling=(1, 1, 1)):
        self.w = {k: v.double() for k, v in sd.items()}
        self.heads, self.eps, self.attention, self.tiling = heads, eps, attention, tiling
        self.dim = self.w["patch_embedding.weight"].shape[0]
        self.layers = sum(1 for k in self.w if k.endswith(".modulation") and k.startswith("blocks."))

    def lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def set_text(self, ctx):
        c = self.lin(F.gelu(self.lin(ctx.double(), "text_embedding.0"), approximate="tanh"), "text_embedding.2")
        self.text = []
        for i in range(self.layers):
            p = f"blocks.{i}.cross_attn."
            self.text.append((rms(self.lin(c, p + "k"), self.w[p + "norm_k.weight"], self.eps), self.lin(c, p + "v")))

    def time(self, t):
        half = self.w["time_embedding.0.weight"].shape[1] // 2
        w = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        s = torch.cat([torch.cos(t * w), torch.sin(t * w)])
        e = self.lin(F.silu(self.lin(s, "time_embedding.0")), "time_embedding.2")
        e0 = self.lin(F.silu(e), "time_projection.1").view(6, self.dim)
        return e, e0

    def attend(self, q, k, v, grid, **mode):
        """q [B, Sq, H, hd], k/v [B, Sk, H, hd]."""
        if self.attention == "monarch":
            import monarchrt
            return monarchrt.monarch_attention(q, k, v, grid, self.tiling, **mode)
        mask = None
        if mode.get("causal_chunk_frames"):
            per = grid[1] * grid[2]
            chunk = torch.arange(q.shape[1]) // (per * mode["causal_chunk_frames"])
            mask = chunk[:, None] >= chunk[None, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2)

    def forward(self, x, t, start_frame, cache=None, causal_chunk_frames=0):
        """x [B, F, C, H, W] -> flow, same layout. With `cache` (list of per-layer dicts with 'k', 'v'
        [B, frames*tokens, heads, hd] tensors), the chunk's K/V are written at its frames and the
        queries attend frames [0, start + F); without, a full-sequence (block-causal) pass."""
        B, Fr, C, Hl, Wl = x.shape
        pw_ = self.w["patch_embedding.weight"]
        ph, pww = pw_.shape[3], pw_.shape[4]
        th, tw = Hl // ph, Wl // pww
        S, D, H = Fr * th * tw, self.dim, self.heads
        hd = D // H
        h = F.conv3d(x.double().permute(0, 2, 1, 3, 4), pw_, self.w["patch_embedding.bias"], stride=(1, ph, pww))
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
                used = (start_frame + Fr) * per
                o = self.attend(q, cache[i]["k"][:, :used], cache[i]["v"][:, :used], (Fr, th, tw), kv_cache=True)
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


def self_forcing_generate(model, noise, renoise, chunk):
    """noise [B, T, C, H, W]; renoise [chunks, 3, B, chunk, C, H, W]; returns clean latents."""
    B, T, C, Hl, Wl = noise.shape
    pw_ = model.w["patch_embedding.weight"]
    th, tw = Hl // pw_.shape[3], Wl // pw_.shape[4]
    D = model.dim
    cache = [{"k": torch.zeros(B, T * th * tw, model.heads, D // model.heads, dtype=torch.float64),
              "v": torch.zeros(B, T * th * tw, model.heads, D // model.heads, dtype=torch.float64)}
             for _ in range(model.layers)]
    steps = self_forcing_steps()
    out = torch.zeros(B, T, C, Hl, Wl, dtype=torch.float64)
    for k in range(T // chunk):
        s = k * chunk
        xt = noise[:, s:s + chunk].double()
        for j, (t, sigma) in enumerate(steps):
            v = model.forward(xt, t, s, cache)
            x0 = xt - sigma * v
            if j < 3:
                sn = steps[j + 1][1]
                xt = (1 - sn) * x0 + sn * renoise[k, j].double()
        out[:, s:s + chunk] = x0
        model.forward(x0, 0.0, s, cache)
    return out
