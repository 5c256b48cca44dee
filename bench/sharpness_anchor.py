"""How the bf16 error of dense attention's forward and backward grows with the sharpness of the
logits, through PyTorch's SDPA backends on this GPU: the anchor for the same effect in the Monarch
kernels (docs/numerics.md, "Precision on the GPU").

Inputs as in the project's GPU tests: q, k ~ 1.5 N(0, 1), v and the upstream gradient ~ N(0, 1),
[1, 2 heads, S tokens, D] with S = 1560 (one 30 x 52 frame); the scale is a factor times
1 / sqrt(D). Each bf16 result is compared with float64 (the math backend) on the same rounded
inputs; printed: the relative L2 error of out and the largest of dq, dk, dv.

Usage (on the GPU machine): python3 bench/sharpness_anchor.py [--tokens 1560] [--head-dim 128]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def run(backend, q, k, v, g, scale):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    out.backward(g)
    return out, q.grad, k.grad, v.grad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1560)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    S, D = args.tokens, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 2, S, D)
    q, k = (1.5 * torch.randn(shape, generator=gen, device="cuda") for _ in range(2))
    v, g = (torch.randn(shape, generator=gen, device="cuda") for _ in range(2))
    q, k, v, g = (t.bfloat16() for t in (q, k, v, g))
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    print(f"card: {torch.cuda.get_device_name()}; S = {S}, D = {D}, bf16 against float64 on the same inputs")
    print(f"{'scale / (1/sqrt(D))':>20s} {'logit std':>10s} " +
          " ".join(f"{n + ' out':>11s} {n + ' grads':>12s}" for n, _ in backends))
    for factor in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0):
        scale = factor / D ** 0.5
        want = run(SDPBackend.MATH, *(t.double() for t in (q, k, v, g)), scale)
        cells = []
        for _, backend in backends:
            try:
                got = run(backend, q, k, v, g, scale)
                cells.append(f"{rel(got[0], want[0]):11.2e} {max(rel(a, b) for a, b in zip(got[1:], want[1:])):12.2e}")
            except RuntimeError as e:  # a backend this build or card does not offer
                cells.append(f"{'-':>11s} {'-':>12s}")
                print(f"  ({backend}: {str(e).splitlines()[0]})")
        print(f"{factor:20.1f} {scale * 2.25 * D ** 0.5:10.2f} " + " ".join(cells))


if __name__ == "__main__":
    main()
