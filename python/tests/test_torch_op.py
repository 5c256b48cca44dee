"""Tests of the monarchrt PyTorch op: gradients (gradcheck in float64 on CPU, every mode), opcheck,
torch.compile without graph breaks, KV-cache steps, errors, 2-process DDP and FSDP2 training steps (gloo),
and, on a CUDA machine, the CUDA kernels against the fp64 CPU reference."""
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import monarchrt

CUDA = torch.cuda.is_available() and \
    torch._C._dispatch_has_kernel_for_dispatch_key("monarchrt::monarch_attention", "CUDA")


def rand(B, S, H, D, dtype=torch.float64, device="cpu", scale=1.0, requires_grad=True):
    return (scale * torch.randn(B, S, H, D, dtype=dtype, device=device)).requires_grad_(requires_grad)


def tokens(grid):
    return grid[0] * grid[1] * grid[2]


# (grid, tiling, B, H, D, mode kwargs, key frames): small odd shapes, every mode.
MODES = [
    ((2, 3, 5), (1, 1, 1), 1, 2, 4, {}, None),                                   # bidirectional
    ((3, 2, 3), (1, 1, 1), 2, 1, 3, {"causal_chunk_frames": 1}, None),           # block-causal
    ((2, 4, 3), (2, 2, 1), 1, 1, 5, {}, None),                                   # f_tied 2, h_reduce 2
    ((2, 2, 6), (1, 1, 2), 1, 2, 4, {"causal_chunk_frames": 1}, None),           # w_reduce 2, causal
    ((1, 3, 4), (1, 1, 1), 1, 2, 4, {"kv_cache": True}, 3),                      # KV cache, whole
    ((1, 2, 3), (1, 1, 1), 1, 1, 4, {"kv_cache": True, "sink_frames": 1, "window_frames": 2}, 5),
    ((1, 2, 3), (1, 1, 1), 1, 1, 4,                                              # ring buffer of 4
     {"kv_cache": True, "sink_frames": 1, "window_frames": 2, "cache_capacity_frames": 4, "cache_frames": 6}, 4),
]


@pytest.mark.parametrize("grid,tiling,B,H,D,kw,kf", MODES)
def test_gradcheck_float64(grid, tiling, B, H, D, kw, kf):
    torch.manual_seed(0)
    S = tokens(grid)
    Skv = S if kf is None else kf * grid[1] * grid[2]
    q, k, v = rand(B, S, H, D), rand(B, Skv, H, D), rand(B, Skv, H, D)

    def f(q, k, v):
        return monarchrt.monarch_attention(q, k, v, grid, tiling, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("grid,tiling,B,H,D,kw,kf", [MODES[1], MODES[5]])
def test_gradcheck_float64_plain_op(grid, tiling, B, H, D, kw, kf):
    # The op without the log-sum-exp output has its own autograd registration (the backward
    # then recomputes every statistic); monarch_attention() uses it when no gradient is needed.
    torch.manual_seed(0)
    S = tokens(grid)
    Skv = S if kf is None else kf * grid[1] * grid[2]
    q, k, v = rand(B, S, H, D), rand(B, Skv, H, D), rand(B, Skv, H, D)
    params = monarchrt._params(grid, tiling, 1, None, kw.get("causal_chunk_frames", 0), kw.get("kv_cache", False),
                               kw.get("sink_frames", 0), kw.get("window_frames", 0))

    def f(q, k, v):
        return torch.ops.monarchrt.monarch_attention(q, k, v, *params)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_log_sum_exp_output():
    # One-row tiles: the stage-2 log-sum-exp is the dense one over all allowed keys (block-causal).
    torch.manual_seed(9)
    grid, D = (3, 2, 5), 8
    q, k, v = (rand(2, tokens(grid), 3, D, requires_grad=False) for _ in range(3))
    params = monarchrt._params(grid, (1, 2, 1), 1, None, 1)
    for dtype in (torch.float64, torch.float32):
        out, lse = torch.ops.monarchrt.monarch_attention_lse(q.to(dtype), k.to(dtype), v.to(dtype), *params)
        assert lse.dtype == torch.float32 and lse.shape == (2, 3, tokens(grid))
        assert torch.equal(out, torch.ops.monarchrt.monarch_attention(q.to(dtype), k.to(dtype), v.to(dtype), *params))
        z = torch.einsum("bshd,bthd->bhst", q, k) / D ** 0.5
        per = grid[1] * grid[2]
        allowed = torch.arange(tokens(grid))[None, :] // per <= torch.arange(tokens(grid))[:, None] // per
        want = z.masked_fill(~allowed, float("-inf")).logsumexp(-1)
        assert (lse.double() - want).abs().max() < 1e-4


def test_float32_path_matches_float64_reference():
    torch.manual_seed(1)
    grid = (3, 5, 7)
    q, k, v = (rand(2, tokens(grid), 3, 16) for _ in range(3))
    g = torch.randn(2, tokens(grid), 3, 16, dtype=torch.float64)
    outs, grads = [], []
    for dtype in (torch.float64, torch.float32):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = monarchrt.monarch_attention(*x, grid, causal_chunk_frames=1)
        out.backward(g.to(dtype))
        outs.append(out.double())
        grads.append([t.grad.double() for t in x])
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        assert (a - b).norm() / a.norm() < 1e-4


def test_opcheck():
    torch.manual_seed(2)
    grid = (2, 3, 4)
    q, k, v = (rand(1, tokens(grid), 2, 8, dtype=torch.float32) for _ in range(3))
    params = ([2, 3, 4], [1, 1, 1], 1, 0.0, 1, False, 0, 0, 0, 0)
    torch.library.opcheck(torch.ops.monarchrt.monarch_attention.default, (q, k, v) + params)
    torch.library.opcheck(torch.ops.monarchrt.monarch_attention_lse.default, (q, k, v) + params)
    g = torch.randn_like(q)
    torch.library.opcheck(torch.ops.monarchrt.monarch_attention_backward.default,
                          (g, q.detach(), k.detach(), v.detach()) + params)
    out, lse = torch.ops.monarchrt.monarch_attention_lse(q.detach(), k.detach(), v.detach(), *params)
    torch.library.opcheck(torch.ops.monarchrt.monarch_attention_backward.default,
                          (g, q.detach(), k.detach(), v.detach()) + params, {"out": out, "lse": lse})
    cache_k, cache_v = torch.zeros(1, 3 * 12, 2, 8), torch.zeros(1, 3 * 12, 2, 8)
    new = torch.randn(1, 12, 2, 8)
    torch.library.opcheck(torch.ops.monarchrt.kv_cache_write_.default,
                          (cache_k, cache_v, new, new.clone(), [1, 3, 4], [1, 1, 1], 0, 0, 0, 3))


class TinyVideoBlock(torch.nn.Module):
    """A self-attention block of a video transformer, [B, S, C] -> [B, S, C]."""

    def __init__(self, dim, heads, grid, attention="monarch"):
        super().__init__()
        self.heads, self.grid, self.attention = heads, grid, attention
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).unbind(2)
        if self.attention == "monarch":
            o = monarchrt.monarch_attention(q, k, v, self.grid)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return x + self.proj(o.reshape(B, S, C))


def test_torch_compile_has_no_graph_break():
    torch.manual_seed(3)
    grid = (2, 3, 5)
    model = TinyVideoBlock(16, 2, grid)
    x = torch.randn(2, tokens(grid), 16)
    eager = model(x)
    eager.square().mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    out = compiled(x)
    out.square().mean().backward()
    assert torch.allclose(out, eager, atol=1e-6)
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad, w, atol=1e-6)


def test_kv_cache_steps_equal_block_causal_and_grads_reach_only_new_kv():
    torch.manual_seed(4)
    chunk, frames, h, w = 2, 6, 2, 3
    per = h * w
    q, k, v = (rand(1, frames * per, 2, 8, requires_grad=False) for _ in range(3))
    full = monarchrt.monarch_attention(q, k, v, (frames, h, w), causal_chunk_frames=chunk)
    cache_k, cache_v = torch.zeros(1, frames * per, 2, 8, dtype=torch.float64), \
        torch.zeros(1, frames * per, 2, 8, dtype=torch.float64)
    for f0 in range(0, frames, chunk):
        rows = slice(f0 * per, (f0 + chunk) * per)
        new_k = k[:, rows].clone().requires_grad_()
        new_v = v[:, rows].clone().requires_grad_()
        qc = q[:, rows].clone().requires_grad_()
        n = f0 + chunk
        out = monarchrt.monarch_attention_kv(qc, new_k, new_v, cache_k[:, :n * per], cache_v[:, :n * per],
                                             (chunk, h, w), cache_frames=n)
        assert torch.allclose(out, full[:, rows], atol=1e-12)
        out.sum().backward()
        assert new_k.grad is not None and new_v.grad is not None and qc.grad is not None
        assert not cache_k.requires_grad
    assert torch.equal(cache_k, k) and torch.equal(cache_v, v)  # written in place


def test_ring_buffer_cache_matches_cache_in_order():
    torch.manual_seed(5)
    chunk, frames, h, w, sink, window, capacity = 1, 6, 2, 3, 1, 2, 4
    per = h * w
    q, k, v = (rand(1, frames * per, 1, 8, requires_grad=False) for _ in range(3))
    ring_k = torch.full((1, capacity * per, 1, 8), float("nan"), dtype=torch.float64)
    ring_v = ring_k.clone()
    for f in range(frames):
        rows = slice(f * per, (f + 1) * per)
        out = monarchrt.monarch_attention_kv(q[:, rows], k[:, rows], v[:, rows], ring_k, ring_v, (chunk, h, w),
                                             cache_frames=f + 1, sink_frames=sink, window_frames=window, ring=True)
        want = monarchrt.monarch_attention(q[:, rows], k[:, :(f + 1) * per], v[:, :(f + 1) * per], (chunk, h, w),
                                           kv_cache=True, sink_frames=sink, window_frames=window)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, want, atol=1e-12)


def test_errors_name_the_argument_and_leave_inputs_alone():
    grid = (2, 3, 5)
    q = torch.randn(1, 30, 2, 8)
    before = q.clone()
    with pytest.raises(ValueError, match="grid"):
        monarchrt.monarch_attention(q, q, q, (2, 3, 4))
    with pytest.raises(ValueError, match="layout.h_reduce"):
        monarchrt.monarch_attention(q, q, q, grid, tiling=(1, 2, 1))
    with pytest.raises(ValueError, match="k: dtype"):
        monarchrt.monarch_attention(q, q.double(), q, grid)
    with pytest.raises(ValueError, match="4-d"):
        monarchrt.monarch_attention(q[0], q[0], q[0], grid)
    with pytest.raises(ValueError, match="dtype"):
        monarchrt.monarch_attention(q.int(), q.int(), q.int(), grid)
    with pytest.raises(ValueError, match="causal"):  # a chunk of 1 frame splits 2-frame tiles
        monarchrt.monarch_attention(q, q, q, grid, tiling=(2, 1, 1), causal_chunk_frames=1)
    with pytest.raises(NotImplementedError, match="num_iters"):
        x = q.clone().requires_grad_()
        monarchrt.monarch_attention(x, q, q, grid, num_iters=2).sum().backward()
    # The backward op's optional forward statistics: both or neither, of the right shapes.
    params = monarchrt._params(grid, (1, 1, 1), 1, None, 0)
    out, lse = torch.ops.monarchrt.monarch_attention_lse(q, q, q, *params)
    with pytest.raises(ValueError, match="together"):
        torch.ops.monarchrt.monarch_attention_backward(q, q, q, q, *params, out=out)
    with pytest.raises(ValueError, match="lse must be float32"):
        torch.ops.monarchrt.monarch_attention_backward(q, q, q, q, *params, out=out, lse=lse[:, :1])
    with pytest.raises(ValueError, match="out must have"):
        torch.ops.monarchrt.monarch_attention_backward(q, q, q, q, *params, out=out.double(), lse=lse)
    assert torch.equal(q, before)
    # cache_rows, the helper that finds a chunk's rows in the cache, names what it cannot place.
    assert monarchrt.cache_rows((1, 1, 2), 3, sink_frames=1, cache_capacity_frames=2).tolist() == [2, 3]
    for kwargs, rule in [(dict(cache_frames=0), "cache_frames = 0"),
                         (dict(cache_frames=3, cache_capacity_frames=1, sink_frames=1), "must exceed sink_frames"),
                         (dict(cache_frames=3, sink_frames=-1), "sink_frames = -1")]:
        with pytest.raises(ValueError, match=rule):
            monarchrt.cache_rows((1, 1, 2), **kwargs)
    with pytest.raises(ValueError, match="grid"):
        monarchrt.cache_rows((0, 1, 2), 3)


def _shut_down():
    """Destroys the process group once nothing holds it and both ranks are done communicating.
    Left to interpreter exit (sharded parameters and the mesh still holding the group), the
    teardown aborted now and then ("terminate called without an active exception" with no Python
    frame: 5 of about 80 runs of the FSDP test; none in 80 runs since)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _ddp_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank
    grid = (2, 3, 5)
    model = torch.nn.parallel.DistributedDataParallel(TinyVideoBlock(16, 2, grid))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different data per rank
    x = torch.randn(2, tokens(grid), 16)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    results[rank] = (float(loss), all(torch.equal(gathered[0], g) for g in gathered))
    del model, opt
    _shut_down()


def test_ddp_two_processes(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    assert len(results) == 2
    for rank in range(2):
        loss, synced = results[rank]
        assert synced, "parameters differ between ranks after the DDP step"
        assert loss == loss  # not NaN
    assert results[0][0] != results[1][0]  # the ranks saw different data


def _fsdp_worker(rank, world, init_file, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    grid = (2, 3, 5)
    model = TinyVideoBlock(16, 2, grid)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))  # CPU even where a GPU is visible
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2 * world, tokens(grid), 16, generator=torch.Generator().manual_seed(7))[2 * rank:2 * rank + 2]
    model(x).square().mean().backward()
    opt.step()
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    if rank == 0:
        results["params"] = [t.tolist() for t in full]
    del model, opt
    _shut_down()


def test_fsdp_two_processes_match_one_process(tmp_path):
    """FSDP2 (fully_shard, gloo): the sharded step equals one process on both ranks' data."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    torch.manual_seed(0)
    grid = (2, 3, 5)
    model = TinyVideoBlock(16, 2, grid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, tokens(grid), 16, generator=torch.Generator().manual_seed(7))
    model(x).square().mean().backward()
    opt.step()
    for got, want in zip(results["params"], model.parameters()):
        assert torch.allclose(torch.tensor(got), want.detach(), atol=1e-6)


# ---- CUDA ----------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the extension built with CUDA")

CUDA_MODES = [
    ((3, 30, 52), (1, 1, 1), 1, 2, 128, {}, None),
    ((3, 30, 52), (1, 2, 1), 1, 2, 128, {"causal_chunk_frames": 1}, None),
    ((2, 5, 7), (1, 1, 1), 2, 3, 64, {"causal_chunk_frames": 1}, None),
    ((3, 6, 10), (1, 1, 1), 1, 2, 128, {"kv_cache": True, "sink_frames": 3, "window_frames": 6}, 12),
]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid,tiling,B,H,D,kw,kf", CUDA_MODES)
def test_cuda_forward_and_gradients_match_fp64_reference(grid, tiling, B, H, D, kw, kf, dtype):
    torch.manual_seed(6)
    S = tokens(grid)
    Skv = S if kf is None else kf * grid[1] * grid[2]
    q, k, v = (rand(B, n, H, D, dtype=dtype, device="cuda", scale=1.5) for n in (S, Skv, Skv))
    g = torch.randn(B, S, H, D, dtype=dtype, device="cuda")
    out = monarchrt.monarch_attention(q, k, v, grid, tiling, **kw)
    out.backward(g)
    ref = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    want = monarchrt.monarch_attention(*ref, grid, tiling, **kw)
    want.backward(g.double().cpu())
    # The plain op's autograd (the backward recomputes the statistics) and the forward's log-sum-exp.
    params = monarchrt._params(grid, tiling, 1, None, kw.get("causal_chunk_frames", 0), kw.get("kv_cache", False),
                               kw.get("sink_frames", 0), kw.get("window_frames", 0))
    plain = torch.autograd.grad(torch.ops.monarchrt.monarch_attention(q, k, v, *params), (q, k, v), g)
    lse = torch.ops.monarchrt.monarch_attention_lse(q.detach(), k.detach(), v.detach(), *params)[1]
    want_lse = torch.ops.monarchrt.monarch_attention_lse(*(r.detach() for r in ref), *params)[1]
    checks = [("out", out, want), ("lse", lse, want_lse)]
    checks += list(zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), (r.grad for r in ref)))
    checks += list(zip(("dq plain op", "dk plain op", "dv plain op"), plain, (r.grad for r in ref)))
    for name, got, exp in checks:
        got = got.detach().double().cpu()
        assert torch.isfinite(got).all(), name
        err = ((got - exp.detach().double()).norm() / exp.detach().double().norm()).item()
        assert err < 1e-2, f"{name}: relative L2 {err:.2e}"


@cuda_only
def test_cuda_graph_capture_and_compile():
    torch.manual_seed(7)
    grid = (3, 30, 52)
    q, k, v = (rand(1, tokens(grid), 2, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    g = torch.randn_like(q)

    def step():  # forward and backward, gradients returned (no accumulation into .grad)
        out = monarchrt.monarch_attention(q, k, v, grid)
        return (out,) + torch.autograd.grad(out, (q, k, v), g)

    want = [t.detach().clone() for t in step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as the CUDA graph docs ask
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # deterministic, and the captured calls did the same work
    model = TinyVideoBlock(256, 2, grid).cuda().bfloat16()
    x = torch.randn(1, tokens(grid), 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(compiled(x).float(), model(x).float(), atol=3e-2)


@cuda_only
def test_cuda_kv_cache_steps_equal_block_causal():
    torch.manual_seed(8)
    chunk, frames, h, w = 3, 9, 30, 52
    per = h * w
    q, k, v = (rand(1, frames * per, 2, 128, dtype=torch.bfloat16, device="cuda", requires_grad=False)
               for _ in range(3))
    full = monarchrt.monarch_attention(q, k, v, (frames, h, w), causal_chunk_frames=chunk)
    cache_k, cache_v = torch.zeros_like(k), torch.zeros_like(v)
    for f0 in range(0, frames, chunk):
        rows = slice(f0 * per, (f0 + chunk) * per)
        n = f0 + chunk
        out = monarchrt.monarch_attention_kv(q[:, rows], k[:, rows], v[:, rows], cache_k[:, :n * per],
                                             cache_v[:, :n * per], (chunk, h, w), cache_frames=n)
        err = ((out.float() - full[:, rows].float()).norm() / full[:, rows].float().norm()).item()
        assert err < 1e-2
    assert torch.equal(cache_k, k)
