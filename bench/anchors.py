"""Dense-attention anchors for bench_cuda, on the same card in the same run: cuDNN and
FlashAttention-2 (torch SDPA backends), B=1, H=12, D=128, bf16, the shapes of targets.md and the
engine's cross-attention (a chunk's queries against 512 text keys).
Median of many calls timed with CUDA events, inputs rotated so L2 does not hold them."""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
PER_FRAME = 1560
# (name, query tokens, key tokens)
SHAPES = [("SF chunk, KV 3 frames", 3 * PER_FRAME, 3 * PER_FRAME), ("SF chunk, KV 9 frames", 3 * PER_FRAME, 9 * PER_FRAME),
          ("SF chunk, KV 15 frames", 3 * PER_FRAME, 15 * PER_FRAME),
          ("SF chunk, KV 21 frames", 3 * PER_FRAME, 21 * PER_FRAME),
          ("full 32760 bidirectional", 21 * PER_FRAME, 21 * PER_FRAME),
          ("cross-attention 4680 x 512", 3 * PER_FRAME, 512)]


def time_ms(fn, sets):
    for i in range(3):
        fn(*sets[i % len(sets)])
    times = []
    for r in range(REPS):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = sets[r % len(sets)]
        s.record()
        fn(*args)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def main():
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"{'shape':28s} {'cuDNN ms':>10s} {'FA2 ms':>10s} {'dense TFLOP':>12s}")
    for name, sq, skv in SHAPES:
        sets = [(torch.randn(1, 12, sq, 128, device="cuda", dtype=torch.bfloat16),
                 torch.randn(1, 12, skv, 128, device="cuda", dtype=torch.bfloat16),
                 torch.randn(1, 12, skv, 128, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
        res = []
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    res.append(time_ms(torch.nn.functional.scaled_dot_product_attention, sets))
            except RuntimeError as err:  # backend not available for this shape
                print(f"  {backend}: {err}".splitlines()[0])
                res.append(float("nan"))
        flops = 4 * sq * skv * 128 * 12
        print(f"{name:28s} {res[0]:10.3f} {res[1]:10.3f} {flops / 1e12:12.3f}")
    # Backward of the full bidirectional shape: time of out.backward(grad) alone.
    sq = 21 * PER_FRAME
    res = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        q, k, v = (torch.randn(1, 12, sq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(1, 12, sq, 128, device="cuda", dtype=torch.bfloat16)
        try:
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            res.append(time_ms(lambda: out.backward(grad, retain_graph=True), [()]))
        except RuntimeError as err:
            print(f"  {backend}: {err}".splitlines()[0])
            res.append(float("nan"))
    print(f"{'bwd full 32760 bidirect.':28s} {res[0]:10.3f} {res[1]:10.3f} {2.5 * 4 * sq * sq * 128 * 12 / 1e12:12.3f}")


if __name__ == "__main__":
    main()
