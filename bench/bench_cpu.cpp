// CPU benchmark: times the fast fp32 CPU path of Monarch and dense attention on video shapes and
// prints time and achieved GFLOP/s of real work (specification section 5). Not a test: it only
// prints. Usage: bench_cpu [--grid T,h,w] [--heads N] [--head-dim D] [--iters N] [--dense]
// [--backward] (--backward also times cpu::monarch_attention_backward, one iteration, counting
// 2.5x the forward FLOPs).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "monarchrt/attention.h"
#include "monarchrt/workload.h"

using namespace monarchrt;

int main(int argc, char** argv) {
  VideoGrid grid{21, 30, 52};
  int64_t heads = 1, D = 128;
  int iters = 1;
  bool dense = false, backward = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_cpu: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--grid") {
      long long T, h, w;
      if (std::sscanf(next(), "%lld,%lld,%lld", &T, &h, &w) != 3) {
        std::fprintf(stderr, "bench_cpu: --grid expects T,h,w\n");
        return 2;
      }
      grid = VideoGrid{T, h, w};
    } else if (a == "--heads") {
      heads = std::atoll(next());
    } else if (a == "--head-dim") {
      D = std::atoll(next());
    } else if (a == "--iters") {
      iters = std::atoi(next());
    } else if (a == "--dense") {
      dense = true;
    } else if (a == "--backward") {
      backward = true;
    } else {
      std::fprintf(stderr, "usage: bench_cpu [--grid T,h,w] [--heads N] [--head-dim D] [--iters N] [--dense] [--backward]\n");
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  std::vector<float> q, k, v;
  SyntheticWorkload spec;
  spec.grid = grid;
  spec.heads = heads;
  spec.head_dim = D;
  Status s = make_synthetic_workload(spec, &q, &k, &v);
  if (!s.ok()) {
    std::fprintf(stderr, "bench_cpu: %s\n", s.to_string().c_str());
    return 1;
  }
  const int64_t S = grid.tokens();
  std::vector<float> out(q.size());
  auto view = [&](std::vector<float>& x) { return TensorView::contiguous(x.data(), DType::kF32, 1, S, heads, D); };
  AttentionParams p;
  p.grid = grid;
  p.num_iters = iters;
  TileGeometry g;
  make_tile_geometry(grid, p.layout, &g);
  std::printf("CPU path, %d threads, grid %s, heads %lld, D %lld\n", cpu::num_threads(),
              grid.to_string().c_str(), (long long)heads, (long long)D);
  for (int which = 0; which < (dense ? 2 : 1); ++which) {
    const auto t0 = std::chrono::steady_clock::now();
    s = which == 0 ? cpu::monarch_attention(view(q), view(k), view(v), view(out), p)
                   : cpu::dense_attention(view(q), view(k), view(v), view(out), p);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!s.ok()) {
      std::fprintf(stderr, "bench_cpu: %s\n", s.to_string().c_str());
      return 1;
    }
    const double flops = heads * (which == 0 ? iters * monarch_flops(g.tiles, g.tiles, g.b1, g.b2, D)
                                             : dense_flops(S, S, D));
    std::printf("%-8s %8.3f s  %7.2f GFLOP  %6.1f GFLOP/s\n", which == 0 ? "monarch" : "dense", secs,
                flops * 1e-9, flops * 1e-9 / secs);
  }
  if (backward) {
    // The upstream gradient: standard normal.
    std::vector<float> dout(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
    Rng rng(7);
    for (float& x : dout) x = static_cast<float>(rng.normal());
    AttentionParams pb = p;
    pb.num_iters = 1;  // the backward pass supports one iteration
    const auto t0 = std::chrono::steady_clock::now();
    s = cpu::monarch_attention_backward(view(q), view(k), view(v), view(dout), view(dq), view(dk),
                                        view(dv), pb);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!s.ok()) {
      std::fprintf(stderr, "bench_cpu: %s\n", s.to_string().c_str());
      return 1;
    }
    const double flops = 2.5 * heads * monarch_flops(g.tiles, g.tiles, g.b1, g.b2, D);
    std::printf("%-8s %8.3f s  %7.2f GFLOP  %6.1f GFLOP/s  (monarch backward, 1 iteration; FLOPs "
                "counted as 2.5x the forward formula)\n",
                "backward", secs, flops * 1e-9, flops * 1e-9 / secs);
  }
  return 0;
}
