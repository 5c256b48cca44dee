"""Monarch-structured attention for video diffusion transformers, as a PyTorch op.

Tensors follow the FlashAttention convention ``[B, S, H, D]`` (batch, tokens, heads, head dim),
tokens in row-major video order ``(t * h + y) * w + x`` of a ``grid = (T, h, w)`` latent video.
A ``tiling = (f_tied, h_reduce, w_reduce)`` cuts the grid into tiles of ``b1 x b2`` tokens
(``b1 = f_tied * h / h_reduce`` rows, ``b2 = w / w_reduce`` columns); ``(1, 1, 1)`` makes one tile
per latent frame (95% sparsity at 30 x 52). Math: docs of the repository (monarch-attention.md).

Devices and dtypes: CPU tensors of float64 run the fp64 reference (exact, for gradcheck), of
float32 / float16 / bfloat16 the fast fp32 CPU path; CUDA tensors of bfloat16 / float16 the CUDA
kernels (head dim 64 or 128). Gradients: one iteration, every mode.

Swapping it into a Wan / Self-Forcing style self-attention (q, k, v after the qk norm and RoPE,
shaped [B, S, H, D]):

    # before: x = flash_attn_func(q, k, v)   or   sdpa(q.transpose(1, 2), ...).transpose(1, 2)
    x = monarchrt.monarch_attention(q, k, v, grid=(frames, 30, 52), tiling=(1, 1, 1))
    # block-causal training (chunks of 3 latent frames):
    x = monarchrt.monarch_attention(q, k, v, grid, causal_chunk_frames=3)
    # autoregressive inference with a KV cache (the chunk's K/V are written into the cache):
    x = monarchrt.monarch_attention_kv(q, k, v, cache_k, cache_v, grid=(3, 30, 52), cache_frames=n)
"""
import torch

from . import _C  # noqa: F401  (loads the library; registers torch.ops.monarchrt)

__all__ = ["monarch_attention", "monarch_attention_kv", "kv_cache_write_", "cache_rows"]

_ops = torch.ops.monarchrt


def _params(grid, tiling, num_iters, scale, causal_chunk_frames, kv_cache=False, sink_frames=0, window_frames=0,
            cache_capacity_frames=0, cache_frames=0):
    grid = [int(x) for x in grid]
    tiling = [int(x) for x in tiling]
    if len(grid) != 3:
        raise ValueError(f"grid must be (T, h, w), got {grid}")
    if len(tiling) != 3:
        raise ValueError(f"tiling must be (f_tied, h_reduce, w_reduce), got {tiling}")
    return (grid, tiling, int(num_iters), float(scale or 0.0), int(causal_chunk_frames), bool(kv_cache),
            int(sink_frames), int(window_frames), int(cache_capacity_frames), int(cache_frames))


def monarch_attention(q, k, v, grid, tiling=(1, 1, 1), num_iters=1, causal_chunk_frames=0, scale=None, *,
                      kv_cache=False, sink_frames=0, window_frames=0, cache_capacity_frames=0, cache_frames=0):
    """Monarch attention of q over k, v, all ``[B, S, H, D]``; returns ``[B, S, H, D]`` like q.

    grid: (T, h, w) of the query tokens. tiling: (f_tied, h_reduce, w_reduce).
    num_iters: refinement iterations (>= 1; gradients for 1). causal_chunk_frames: block-causal
    chunk in frames (0 = bidirectional). scale: softmax scale (default 1/sqrt(D)).
    kv_cache=True: q is the current chunk and k, v the cache (the chunk last), attended through
    the first ``sink_frames`` and the last ``window_frames`` frames (0 = all); with
    ``cache_capacity_frames`` > 0, k and v are a ring buffer of that many frames holding
    ``cache_frames`` written frames. Differentiable in q, k and v.
    """
    params = _params(grid, tiling, num_iters, scale, causal_chunk_frames, kv_cache, sink_frames, window_frames,
                     cache_capacity_frames, cache_frames)
    if num_iters == 1 and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # Training: the forward also keeps each query's stage-2 log-sum-exp, which (with the
        # output) spares the CUDA backward a sweep over the recomputed intermediates.
        return _ops.monarch_attention_lse(q, k, v, *params)[0]
    return _ops.monarch_attention(q, k, v, *params)


def cache_rows(grid, cache_frames, sink_frames=0, cache_capacity_frames=0, device=None):
    """Token rows of the cache (k/v views) that the current chunk (grid[0] frames ending at frame
    cache_frames) occupies: the last frames without a ring, the ring-buffer slots with one."""
    T, h, w = (int(x) for x in grid)
    if min(T, h, w) < 1:
        raise ValueError(f"grid must be positive (T, h, w), got {(T, h, w)}")
    if sink_frames < 0 or cache_capacity_frames < 0:
        raise ValueError(f"sink_frames = {sink_frames} and cache_capacity_frames = {cache_capacity_frames} "
                         "must be >= 0")
    if cache_frames < T:
        raise ValueError(f"cache_frames = {cache_frames} must be at least the chunk's grid T = {T}")
    if cache_capacity_frames > 0 and cache_capacity_frames <= sink_frames:
        raise ValueError(f"cache_capacity_frames = {cache_capacity_frames} must exceed sink_frames = {sink_frames}")
    per_frame = h * w
    rows = []
    for f in range(cache_frames - T, cache_frames):
        slot = f
        if cache_capacity_frames > 0 and f >= sink_frames:
            slot = sink_frames + (f - sink_frames) % (cache_capacity_frames - sink_frames)
        rows.append(torch.arange(slot * per_frame, (slot + 1) * per_frame, device=device))
    return torch.cat(rows)


def kv_cache_write_(cache_k, cache_v, new_k, new_v, grid, cache_frames, tiling=(1, 1, 1), sink_frames=0,
                    window_frames=0, ring=False):
    """Writes the chunk's keys and values (``[B, T*h*w, H, D]``) into cache_k / cache_v in place:
    at logical frames [cache_frames - T, cache_frames), i.e. the last T frames of the cache, or their
    ring-buffer slots when ``ring`` (the cache then holds cache_k.shape[1] / (h*w) frames)."""
    capacity = cache_k.shape[1] // (int(grid[1]) * int(grid[2])) if ring else 0
    _ops.kv_cache_write_(cache_k, cache_v, new_k, new_v, [int(x) for x in grid], [int(x) for x in tiling],
                         int(sink_frames), int(window_frames), int(capacity), int(cache_frames))


def monarch_attention_kv(q, new_k, new_v, cache_k, cache_v, grid, cache_frames, tiling=(1, 1, 1), num_iters=1,
                         scale=None, sink_frames=0, window_frames=0, ring=False):
    """One autoregressive step: writes the chunk's new K/V into the cache in place (no copy of
    the cache), then attends q (the chunk, ``grid = (T, h, w)``) over the cache window.

    Without ``ring`` the cache views hold exactly ``cache_frames`` frames (slice a preallocated
    buffer); with ``ring`` they are a ring buffer (sink frames first). Gradients (Self-Forcing
    training through the cache) flow to q and to new_k / new_v, never to the cached past; in that
    case the attention reads a copy of the cache with the new rows spliced in.
    """
    capacity = cache_k.shape[1] // (int(grid[1]) * int(grid[2])) if ring else 0
    with torch.no_grad():
        kv_cache_write_(cache_k, cache_v, new_k.detach(), new_v.detach(), grid, cache_frames, tiling, sink_frames,
                        window_frames, ring)
    k, v = cache_k, cache_v
    if torch.is_grad_enabled() and (new_k.requires_grad or new_v.requires_grad):
        rows = cache_rows(grid, cache_frames, sink_frames, capacity, device=cache_k.device)
        k = cache_k.detach().index_copy(1, rows, new_k)
        v = cache_v.detach().index_copy(1, rows, new_v)
    return monarch_attention(q, k, v, grid, tiling, num_iters, 0, scale, kv_cache=True, sink_frames=sink_frames,
                             window_frames=window_frames, cache_capacity_frames=capacity, cache_frames=cache_frames)


# ---- fake kernels (torch.compile, meta tensors) and autograd -----------------------------------

@torch.library.register_fake("monarchrt::monarch_attention")
def _attention_fake(q, k, v, *params):
    return q.new_empty(q.shape)


@torch.library.register_fake("monarchrt::monarch_attention_lse")
def _attention_lse_fake(q, k, v, *params):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("monarchrt::monarch_attention_backward")
def _backward_fake(grad_out, q, k, v, *params, out=None, lse=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("monarchrt::kv_cache_write_")
def _kv_write_fake(cache_k, cache_v, new_k, new_v, *params):
    return None


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v)
    ctx.params = inputs[3:]


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = _ops.monarch_attention_backward(grad_out, q, k, v, *ctx.params)
    return (dq, dk, dv) + (None,) * len(ctx.params)


torch.library.register_autograd("monarchrt::monarch_attention", _backward, setup_context=_setup_context)


def _setup_context_lse(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.params = inputs[3:]


def _backward_lse(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ops.monarch_attention_backward(grad_out, q, k, v, *ctx.params, out=out, lse=lse)
    return (dq, dk, dv) + (None,) * len(ctx.params)


torch.library.register_autograd("monarchrt::monarch_attention_lse", _backward_lse,
                                setup_context=_setup_context_lse)
