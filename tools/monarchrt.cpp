// The `monarchrt` command: run Monarch, dense or oracle top-k attention on .npy tensors
// (`attention`), compare attention variants on a workload (`analyze`) and list checkpoints
// (`inspect`). It only calls the
// public API in include/monarchrt/. Every error is printed as one line naming the argument and
// the rule it broke, with exit status 1 (2 for command-line usage errors).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "monarchrt/attention.h"
#include "monarchrt/checkpoint.h"
#include "monarchrt/npy.h"
#include "monarchrt/wan.h"
#include "monarchrt/workload.h"
#ifdef MONARCHRT_WITH_CUDA
#include "monarchrt/cuda.h"
#include "monarchrt/wan_cuda.h"
#endif

using namespace monarchrt;

namespace {

// ---- command-line parsing --------------------------------------------------------------------

struct OptionSpec {
  const char* name;     // without the leading "--"
  const char* metavar;  // nullptr for a flag
  const char* def;      // default shown in --help (nullptr: none / required)
  const char* help;
};

struct UsageError {
  std::string message;
};

class Args {
 public:
  Args(const std::vector<OptionSpec>& specs, int argc, char** argv, int first) : specs_(specs) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        help_ = true;
        continue;
      }
      if (a.rfind("--", 0) != 0) throw UsageError{"unexpected argument '" + a + "'"};
      std::string name = a.substr(2), value;
      const size_t eq = name.find('=');
      const bool inline_value = eq != std::string::npos;
      if (inline_value) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      const OptionSpec* spec = find(name);
      if (!spec) throw UsageError{"unknown option '--" + name + "' (see --help)"};
      if (spec->metavar == nullptr) {
        if (inline_value) throw UsageError{"option '--" + name + "' takes no value"};
        values_[name] = "1";
        continue;
      }
      if (!inline_value) {
        if (i + 1 >= argc) throw UsageError{"option '--" + name + "' needs a value " + spec->metavar};
        value = argv[++i];
      }
      values_[name] = value;
    }
  }
  bool help() const { return help_; }
  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::string get(const std::string& name) const {
    auto it = values_.find(name);
    if (it != values_.end()) return it->second;
    const OptionSpec* spec = find(name);
    return spec && spec->def ? spec->def : "";
  }
  std::string require(const std::string& name) const {
    if (!has(name)) throw UsageError{"missing required option --" + name};
    return get(name);
  }
  int64_t get_int(const std::string& name) const {
    const std::string s = get(name);
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0') throw UsageError{"--" + name + " expects an integer, got '" + s + "'"};
    return v;
  }
  double get_double(const std::string& name) const {
    const std::string s = get(name);
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0') throw UsageError{"--" + name + " expects a number, got '" + s + "'"};
    return v;
  }

 private:
  const OptionSpec* find(const std::string& name) const {
    for (const OptionSpec& s : specs_)
      if (name == s.name) return &s;
    return nullptr;
  }
  const std::vector<OptionSpec>& specs_;
  std::map<std::string, std::string> values_;
  bool help_ = false;
};

void print_help(const char* usage, const char* about, const std::vector<OptionSpec>& specs) {
  std::printf("usage: %s\n\n%s\n\noptions:\n", usage, about);
  for (const OptionSpec& s : specs) {
    std::string left = std::string("--") + s.name + (s.metavar ? std::string(" ") + s.metavar : "");
    std::printf("  %-26s %s", left.c_str(), s.help);
    if (s.def) std::printf(" (default: %s)", s.def);
    std::printf("\n");
  }
  std::printf("  %-26s %s\n", "-h, --help", "show this help");
}

std::vector<int64_t> parse_int_list(const std::string& s, const std::string& option, size_t count) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0') {
      throw UsageError{"--" + option + " expects " + std::to_string(count) +
                       " comma-separated integers, got '" + s + "'"};
    }
    out.push_back(v);
  }
  if (out.size() != count) {
    throw UsageError{"--" + option + " expects " + std::to_string(count) +
                     " comma-separated integers, got '" + s + "'"};
  }
  return out;
}

VideoGrid parse_grid(const std::string& s) {
  const std::vector<int64_t> v = parse_int_list(s, "grid", 3);
  return VideoGrid{v[0], v[1], v[2]};
}

MonarchLayout parse_tiling(const std::string& s, const std::string& option = "tiling") {
  const std::vector<int64_t> v = parse_int_list(s, option, 3);
  return MonarchLayout{v[0], v[1], v[2]};
}

struct Failure {
  Status status;
};
void check(const Status& s) {
  if (!s.ok()) throw Failure{s};
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- tensors from .npy -----------------------------------------------------------------------

struct HostTensor {
  NpyArray array;
  TensorView view;
};

HostTensor load_qkv(const std::string& path, const char* name) {
  HostTensor t;
  check(read_npy(path, &t.array));
  const std::vector<int64_t>& s = t.array.shape;
  int64_t B = 1, S = 0, H = 0, D = 0;
  if (s.size() == 3) {
    S = s[0], H = s[1], D = s[2];
  } else if (s.size() == 4) {
    B = s[0], S = s[1], H = s[2], D = s[3];
  } else {
    throw Failure{Status::invalid(std::string(name) + " (" + path + "): expected shape [S, H, D] or "
                                  "[B, S, H, D], got " + std::to_string(s.size()) + " dimensions")};
  }
  t.view = TensorView::contiguous(t.array.data.data(), t.array.dtype, B, S, H, D);
  return t;
}

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::kF32;
  if (s == "float16") return DType::kF16;
  if (s == "float64") return DType::kF64;
  throw UsageError{"--out-dtype must be float32, float16 or float64, got '" + s + "'"};
}

void apply_threads(const Args& a) {
  if (a.has("threads")) {
    const int64_t n = a.get_int("threads");
    if (n < 1) throw UsageError{"--threads must be at least 1"};
    cpu::set_num_threads(static_cast<int>(n));
  }
}

// ---- monarchrt attention ---------------------------------------------------------------------

const std::vector<OptionSpec> kAttentionOptions = {
    {"q", "FILE", nullptr, "queries, .npy [S, H, D] or [B, S, H, D], float16/32/64 (required)"},
    {"k", "FILE", nullptr, "keys, same layout; in KV-cache mode every cached frame (required)"},
    {"v", "FILE", nullptr, "values, same shape as k (required)"},
    {"out", "FILE", nullptr, "output .npy, same shape as q (required)"},
    {"grid", "T,h,w", nullptr, "video grid of the queries: frames, rows, columns (required)"},
    {"method", "NAME", "monarch", "monarch, dense or topk"},
    {"tiling", "F,HR,WR", "1,1,1", "Monarch layout f_tied,h_reduce,w_reduce"},
    {"iters", "N", "1", "Monarch refinement iterations"},
    {"causal-chunk", "FRAMES", "0", "block-causal chunk in frames, 0 = bidirectional"},
    {"kv-cache", nullptr, nullptr, "KV-cache call: q is the current chunk, k/v hold the cache"},
    {"sink-frames", "N", "0", "KV cache: leading frames always attended"},
    {"window-frames", "N", "0", "KV cache: most recent frames attended, 0 = all"},
    {"scale", "S", "0", "softmax scale, 0 = 1/sqrt(D)"},
    {"density", "P", "0.053", "topk: fraction of keys each query keeps"},
    {"reference", nullptr, nullptr, "use the naive fp64 reference instead of the fast CPU path"},
    {"out-dtype", "DTYPE", nullptr, "float32, float16 or float64 (default: q's dtype)"},
    {"threads", "N", nullptr, "worker threads (default: all cores, or MONARCHRT_NUM_THREADS)"},
};

int cmd_attention(int argc, char** argv) {
  Args a(kAttentionOptions, argc, argv, 2);
  if (a.help()) {
    print_help("monarchrt attention --q Q.npy --k K.npy --v V.npy --grid T,h,w --out OUT.npy [options]",
               "Computes attention of q over k, v and writes the output in q's token order.",
               kAttentionOptions);
    return 0;
  }
  apply_threads(a);
  AttentionParams p;
  p.grid = parse_grid(a.require("grid"));
  p.layout = parse_tiling(a.get("tiling"));
  p.num_iters = static_cast<int>(a.get_int("iters"));
  p.causal_chunk_frames = a.get_int("causal-chunk");
  p.kv_cache = a.has("kv-cache");
  p.sink_frames = a.get_int("sink-frames");
  p.window_frames = a.get_int("window-frames");
  p.scale = a.get_double("scale");
  const std::string method = a.get("method");
  if (method != "monarch" && method != "dense" && method != "topk") {
    throw UsageError{"--method must be monarch, dense or topk, got '" + method + "'"};
  }
  const std::string out_path = a.require("out");
  HostTensor q = load_qkv(a.require("q"), "q");
  HostTensor k = load_qkv(a.require("k"), "k");
  HostTensor v = load_qkv(a.require("v"), "v");
  const DType out_dtype = a.has("out-dtype") ? parse_dtype(a.get("out-dtype")) : q.view.dtype;
  std::vector<uint8_t> out_data(static_cast<size_t>(q.view.numel() * dtype_size(out_dtype)));
  const TensorView out = TensorView::contiguous(out_data.data(), out_dtype, q.view.batch(),
                                                q.view.tokens(), q.view.heads(), q.view.head_dim());
  const bool ref = a.has("reference");
  const auto t0 = std::chrono::steady_clock::now();
  if (method == "monarch") {
    check(ref ? ref::monarch_attention(q.view, k.view, v.view, out, p)
              : cpu::monarch_attention(q.view, k.view, v.view, out, p));
  } else if (method == "dense") {
    check(ref ? ref::dense_attention(q.view, k.view, v.view, out, p)
              : cpu::dense_attention(q.view, k.view, v.view, out, p));
  } else {
    const double density = a.get_double("density");
    check(ref ? ref::topk_attention(q.view, k.view, v.view, out, p, density)
              : cpu::topk_attention(q.view, k.view, v.view, out, p, density));
  }
  const double secs = seconds_since(t0);
  check(write_npy(out_path, out_dtype, q.array.shape, out_data.data()));
  std::fprintf(stderr, "%s attention (%s path) of q %s over k %s: %.3f s, wrote %s\n",
               method.c_str(), ref ? "fp64 reference" : "fp32 CPU", q.view.shape_string().c_str(),
               k.view.shape_string().c_str(), secs, out_path.c_str());
  return 0;
}

// ---- monarchrt analyze -----------------------------------------------------------------------

const std::vector<OptionSpec> kAnalyzeOptions = {
    {"q", "FILE", nullptr, "queries .npy (give q, k and v, or none for the synthetic workload)"},
    {"k", "FILE", nullptr, "keys .npy"},
    {"v", "FILE", nullptr, "values .npy"},
    {"grid", "T,h,w", "6,30,52", "video grid (required with files)"},
    {"heads", "N", "2", "synthetic workload: heads"},
    {"head-dim", "D", "128", "synthetic workload: head dim"},
    {"seed", "N", "0", "synthetic workload: seed"},
    {"positional", "A", "1", "synthetic workload: amplitude of the rotary positional part"},
    {"semantic", "A", "1", "synthetic workload: amplitude of the sparse object matches"},
    {"noise", "SIGMA", "0.5", "synthetic workload: noise added to q and k"},
    {"tilings", "LIST", "1,1,1;1,2,1;3,1,1", "Monarch layouts f_tied,h_reduce,w_reduce separated by ';'"
                                             " (layouts the grid does not allow are skipped)"},
    {"max-iters", "N", "3", "Monarch with 1..N iterations"},
    {"causal-chunk", "FRAMES", "0", "block-causal chunk in frames, 0 = bidirectional"},
    {"json", nullptr, nullptr, "print JSON instead of a table"},
    {"threads", "N", nullptr, "worker threads (default: all cores, or MONARCHRT_NUM_THREADS)"},
};

struct Row {
  std::string method, tiling, tile;
  int iters = 0;
  double sparsity = 0, flops_ratio = 0, rel_l2 = 0, seconds = 0;
};

double relative_l2(const std::vector<float>& x, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = static_cast<double>(x[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

std::string percent(double x, int digits = 1) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f%%", digits, 100.0 * x);
  return buf;
}

int cmd_analyze(int argc, char** argv) {
  Args a(kAnalyzeOptions, argc, argv, 2);
  if (a.help()) {
    print_help("monarchrt analyze [--q Q.npy --k K.npy --v V.npy --grid T,h,w] [options]",
               "Compares Monarch attention (several tilings, 1..N iterations) and oracle top-k at the\n"
               "same densities with dense attention on one workload: parameter sparsity, FLOPs vs\n"
               "dense, relative L2 error of the output against dense, and CPU time (fp32 CPU path).\n"
               "Without files it builds the seeded synthetic video-attention workload (see README).",
               kAnalyzeOptions);
    return 0;
  }
  apply_threads(a);
  const VideoGrid grid = parse_grid(a.get("grid"));
  const int64_t max_iters = a.get_int("max-iters");
  if (max_iters < 1 || max_iters > kMaxIterations) {
    throw UsageError{"--max-iters must be in [1, " + std::to_string(kMaxIterations) + "]"};
  }
  std::vector<MonarchLayout> tilings;
  {
    std::stringstream ss(a.get("tilings"));
    std::string item;
    while (std::getline(ss, item, ';')) tilings.push_back(parse_tiling(item, "tilings"));
    if (tilings.empty()) throw UsageError{"--tilings needs at least one layout"};
  }

  // Workload.
  std::vector<float> qs, ks, vs;
  HostTensor qf, kf, vf;
  TensorView q, k, v;
  std::string workload;
  const int files = a.has("q") + a.has("k") + a.has("v");
  if (files != 0 && files != 3) throw UsageError{"give all of --q, --k, --v or none of them"};
  if (files == 3) {
    if (!a.has("grid")) throw UsageError{"--grid is required with --q/--k/--v"};
    qf = load_qkv(a.get("q"), "q");
    kf = load_qkv(a.get("k"), "k");
    vf = load_qkv(a.get("v"), "v");
    q = qf.view, k = kf.view, v = vf.view;
    workload = "files " + a.get("q") + ", " + a.get("k") + ", " + a.get("v");
  } else {
    SyntheticWorkload spec;
    spec.grid = grid;
    spec.heads = a.get_int("heads");
    spec.head_dim = a.get_int("head-dim");
    spec.seed = static_cast<uint64_t>(a.get_int("seed"));
    spec.positional = a.get_double("positional");
    spec.semantic = a.get_double("semantic");
    spec.noise = a.get_double("noise");
    check(make_synthetic_workload(spec, &qs, &ks, &vs));
    q = TensorView::contiguous(qs.data(), DType::kF32, 1, grid.tokens(), spec.heads, spec.head_dim);
    k = TensorView::contiguous(ks.data(), DType::kF32, 1, grid.tokens(), spec.heads, spec.head_dim);
    v = TensorView::contiguous(vs.data(), DType::kF32, 1, grid.tokens(), spec.heads, spec.head_dim);
    workload = "synthetic video attention, seed " + a.get("seed");
  }
  AttentionParams base;
  base.grid = grid;
  base.causal_chunk_frames = a.get_int("causal-chunk");

  std::vector<float> dense(static_cast<size_t>(q.numel())), out(dense.size());
  const TensorView dense_view = TensorView::contiguous(dense.data(), DType::kF32, q.batch(),
                                                       q.tokens(), q.heads(), q.head_dim());
  const TensorView out_view = TensorView::contiguous(out.data(), DType::kF32, q.batch(), q.tokens(),
                                                     q.heads(), q.head_dim());
  std::vector<Row> rows;
  auto progress = [&](const std::string& what) { std::fprintf(stderr, "  running %s ...\n", what.c_str()); };

  progress("dense");
  auto t0 = std::chrono::steady_clock::now();
  check(cpu::dense_attention(q, k, v, dense_view, base));
  rows.push_back({"dense", "-", "-", 0, 0.0, 1.0, 0.0, seconds_since(t0)});

  std::vector<std::pair<std::string, double>> densities;  // (tiling, parameter density)
  for (const MonarchLayout& layout : tilings) {
    AttentionParams p = base;
    p.layout = layout;
    TileGeometry g;
    if (!make_tile_geometry(grid, layout, &g).ok() || !check_attention(q, k, v, out_view, p, true).ok()) {
      const Status why = check_attention(q, k, v, out_view, p, true);
      std::fprintf(stderr, "  skipping tiling %s: %s\n", layout.to_string().c_str(), why.message().c_str());
      continue;
    }
    const double density = monarch_parameter_density(g.b1, g.b2);
    const std::string tile = std::to_string(g.b1) + "x" + std::to_string(g.b2);
    densities.push_back({layout.to_string() + " (" + tile + ")", density});
    for (int it = 1; it <= max_iters; ++it) {
      p.num_iters = it;
      progress("monarch " + layout.to_string() + " iters " + std::to_string(it));
      t0 = std::chrono::steady_clock::now();
      check(cpu::monarch_attention(q, k, v, out_view, p));
      const double secs = seconds_since(t0);
      const double ratio = it * monarch_flops(g.tiles, g.tiles, g.b1, g.b2, q.head_dim()) /
                           dense_flops(q.tokens(), k.tokens(), q.head_dim());
      rows.push_back({"monarch", layout.to_string(), tile, it, 1.0 - density, ratio,
                      relative_l2(out, dense), secs});
    }
  }
  for (const auto& d : densities) {
    progress("oracle top-k at density " + percent(d.second));
    t0 = std::chrono::steady_clock::now();
    check(cpu::topk_attention(q, k, v, out_view, base, d.second));
    const double secs = seconds_since(t0);
    // The oracle must score every key (QK^T is half of dense) before it can pick the top k.
    rows.push_back({"oracle top-k", "matches " + d.first, "-", 0, 1.0 - d.second,
                    0.5 + 0.5 * d.second, relative_l2(out, dense), secs});
  }

  if (a.has("json")) {
    std::printf("{\"workload\": \"%s\", \"grid\": [%lld, %lld, %lld], \"shape\": \"%s\", "
                "\"causal_chunk_frames\": %lld, \"rows\": [\n",
                workload.c_str(), (long long)grid.T, (long long)grid.h, (long long)grid.w,
                q.shape_string().c_str(), (long long)base.causal_chunk_frames);
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::printf("  {\"method\": \"%s\", \"tiling\": \"%s\", \"tile\": \"%s\", \"iters\": %d, "
                  "\"sparsity\": %.6f, \"flops_vs_dense\": %.6f, \"rel_l2_vs_dense\": %.6g, "
                  "\"seconds\": %.4f}%s\n",
                  r.method.c_str(), r.tiling.c_str(), r.tile.c_str(), r.iters, r.sparsity,
                  r.flops_ratio, r.rel_l2, r.seconds, i + 1 < rows.size() ? "," : "");
    }
    std::printf("]}\n");
    return 0;
  }
  std::printf("workload: %s, grid %s, q/k/v %s, %s\n", workload.c_str(), grid.to_string().c_str(),
              q.shape_string().c_str(),
              base.causal_chunk_frames ? ("block-causal chunks of " +
                                          std::to_string(base.causal_chunk_frames) + " frames").c_str()
                                       : "bidirectional");
  std::printf("%-14s %-22s %-7s %5s %9s %9s %12s %9s\n", "method", "tiling f/h/w", "tile", "iters",
              "sparsity", "FLOPs", "rel L2 err", "time s");
  for (const Row& r : rows) {
    std::printf("%-14s %-22s %-7s %5s %9s %9s %12.4g %9.3f\n", r.method.c_str(), r.tiling.c_str(),
                r.tile.c_str(), r.iters ? std::to_string(r.iters).c_str() : "-",
                percent(r.sparsity).c_str(), percent(r.flops_ratio).c_str(), r.rel_l2, r.seconds);
  }
  std::printf("sparsity: 1 - (b1 + b2) / (b1 b2) for Monarch, 1 - kept fraction for top-k; FLOPs vs "
              "dense (top-k scores every key); error: ||out - dense|| / ||dense|| (fp32 CPU path)\n");
  return 0;
}

// ---- inspect ---------------------------------------------------------------------------------

const std::vector<OptionSpec> kInspectOptions = {
    {"json", nullptr, nullptr, "print JSON: [{\"name\", \"dtype\", \"shape\", \"sum\"?}]"},
    {"sums", nullptr, nullptr, "also read every tensor and print the sum of its elements (float64)"},
    {"check-wan", nullptr, nullptr, "check names, shapes and dtypes against the Wan2.1-T2V-1.3B DiT (825 tensors)"},
    {"ema", nullptr, nullptr, "with --check-wan on a Self-Forcing .pt: check generator_ema (default: generator)"},
};

std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      o += buf;
      continue;
    }
    o += ch;
  }
  return o;
}

int cmd_inspect(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[2]).rfind("--", 0) != 0 && std::string(argv[2]) != "-h") {
    Args a(kInspectOptions, argc, argv, 3);
    if (a.help()) throw UsageError{"--help goes alone: monarchrt inspect --help"};
    Checkpoint ck;
    check(Checkpoint::open(argv[2], &ck));
    if (a.has("check-wan")) {
      const std::string prefix = wan_checkpoint_prefix(ck, a.has("ema"));
      check(check_wan_checkpoint(ck, WanConfig(), prefix));
      std::printf("%s: the Wan2.1-T2V-1.3B DiT is complete under '%s' (825 tensors, names and shapes match)\n",
                  argv[2], prefix.c_str());
      return 0;
    }
    const bool json = a.has("json"), sums = a.has("sums");
    if (json) std::printf("[");
    int64_t total = 0;
    for (size_t i = 0; i < ck.tensors().size(); ++i) {
      const CheckpointTensor& t = ck.tensors()[i];
      const std::string shape = shape_string(t.shape);
      double sum = 0;
      if (sums) {
        std::vector<float> data;
        check(ck.read_f32(t, &data));
        for (float x : data) sum += x;
      }
      total += t.numel();
      if (json) {
        std::printf("%s{\"name\": \"%s\", \"dtype\": \"%s\", \"shape\": %s", i ? ", " : "",
                    json_escape(t.name).c_str(), dtype_name(t.dtype), shape.c_str());
        if (sums) std::printf(", \"sum\": %.17g", sum);
        std::printf("}");
      } else {
        std::printf("%-60s %-9s %s", t.name.c_str(), dtype_name(t.dtype), shape.c_str());
        if (sums) std::printf("  sum %.9g", sum);
        std::printf("\n");
      }
    }
    if (json) {
      std::printf("]\n");
    } else {
      std::printf("%zu tensors, %lld elements (%s)\n", ck.tensors().size(), static_cast<long long>(total),
                  ck.format() == Checkpoint::Format::kTorchZip ? "torch zip" : "safetensors");
    }
    return 0;
  }
  Args a(kInspectOptions, argc, argv, 2);
  if (a.help()) {
    print_help("monarchrt inspect FILE [--json] [--sums] [--check-wan [--ema]]",
               "Lists the tensors of a checkpoint (.safetensors, or .pt/.pth written by torch.save; nested\n"
               "dicts such as generator_ema/ are joined with '/'), checking the file as it goes.",
               kInspectOptions);
    return 0;
  }
  throw UsageError{"missing the checkpoint FILE (see --help)"};
}

// ---- generate --------------------------------------------------------------------------------

const std::vector<OptionSpec> kGenerateOptions = {
    {"dit", "FILE", nullptr, "DiT weights: Wan .safetensors or Self-Forcing .pt (default: a small built-in random model)"},
    {"ema", nullptr, nullptr, "with a .pt: use generator_ema (the documented choice), else generator"},
    {"heads", "N", "12", "attention heads (not stored in the weights)"},
    {"text", "FILE", nullptr, "text features .npy [text_len, text_dim] or [batch, text_len, text_dim] (default: seeded random)"},
    {"frames", "N", nullptr, "latent frames (default 21, built-in model 6)"},
    {"chunk", "N", "3", "latent frames per autoregressive chunk"},
    {"latent", "H,W", nullptr, "latent rows,columns (default 60,104; built-in model 8,12)"},
    {"batch", "N", "1", "videos generated together"},
    {"attention", "KIND", "dense", "self-attention: dense or monarch"},
    {"tiling", "F,HR,WR", "1,1,1", "Monarch layout f_tied,h_reduce,w_reduce"},
    {"sink-frames", "N", "0", "KV cache: leading frames always attended"},
    {"window-frames", "N", "0", "KV cache: most recent frames attended, 0 = all"},
    {"seed", "N", "0", "seed of the noise (and of the built-in model and text)"},
    {"noise", "FILE", nullptr, "initial noise .npy [batch, frames, channels, H, W] instead of seeded noise"},
    {"renoise", "FILE", nullptr, "re-noising draws .npy [chunks, 3, batch, chunk, channels, H, W]"},
    {"out", "FILE", "latents.npy", "where the clean latents [batch, frames, channels, H, W] go (float32)"},
    {"stream-dir", "DIR", nullptr, "also write each chunk as DIR/chunk_NNN.npy [batch, chunk, channels, H, W] when it is made (DIR is created)"},
    {"repeat", "N", "1", "generate the video N times (timings of each; the first includes CUDA-graph capture)"},
    {"device", "KIND", "auto", "cpu (fp32), cuda (bf16, one GPU) or auto (cuda where a GPU is usable)"},
    {"no-cuda-graph", nullptr, nullptr, "cuda: launch the kernels one by one instead of a graph per chunk"},
    {"profile", nullptr, nullptr, "cuda: time every step of every pass (no graphs; each pass copied in, out and synchronized on its own) and print where the time went"},
    {"threads", "N", nullptr, "worker threads (default: all cores, or MONARCHRT_NUM_THREADS)"},
};

std::vector<float> load_floats(const std::string& path, const char* what, const std::vector<int64_t>& shape) {
  NpyArray a;
  check(read_npy(path, &a));
  if (a.shape != shape) {
    throw Failure{Status::invalid(std::string(what) + " (" + path + "): shape " + shape_string(a.shape) +
                                  ", expected " + shape_string(shape))};
  }
  std::vector<float> v(size_t(a.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(load_element(a.data.data(), a.dtype, int64_t(i)));
  return v;
}

int cmd_generate(int argc, char** argv) {
  Args a(kGenerateOptions, argc, argv, 2);
  if (a.help()) {
    print_help("monarchrt generate [--dit FILE [--ema]] [--text FEATURES.npy] [options]",
               "Runs the Self-Forcing pipeline of the causal Wan DiT on the GPU (bf16) or the CPU (fp32):\n"
               "chunks of latent frames, 4 denoising steps and a cache-refresh pass each, and writes the\n"
               "clean latents. Without --dit a small random-weight model runs, so the whole path can be\n"
               "tried anywhere.",
               kGenerateOptions);
    return 0;
  }
  apply_threads(a);
  // The options that need no file, checked before anything is read (a checkpoint takes a while).
  const bool builtin = !a.has("dit");
  WanRunConfig run;
  run.batch = a.get_int("batch");
  if (run.batch < 1) throw UsageError{"--batch must be >= 1"};
  const int64_t frames = a.has("frames") ? a.get_int("frames") : (builtin ? 6 : 21);
  const int64_t chunk = a.get_int("chunk");
  if (chunk < 1) throw UsageError{"--chunk must be >= 1"};
  if (frames < 1 || frames % chunk != 0) {
    throw UsageError{"--frames must be a positive multiple of --chunk (" + std::to_string(chunk) + "), got " +
                     std::to_string(frames)};
  }
  const std::vector<int64_t> hw = parse_int_list(a.has("latent") ? a.get("latent") : (builtin ? "8,12" : "60,104"), "latent", 2);
  run.latent_h = hw[0];
  run.latent_w = hw[1];
  run.max_frames = frames;
  const std::string kind = a.get("attention");
  if (kind != "dense" && kind != "monarch") throw UsageError{"--attention must be dense or monarch, got '" + kind + "'"};
  run.monarch = kind == "monarch";
  run.layout = parse_tiling(a.get("tiling"));
  run.sink_frames = a.get_int("sink-frames");
  run.window_frames = a.get_int("window-frames");
  const int64_t repeat = a.get_int("repeat");
  if (repeat < 1) throw UsageError{"--repeat must be >= 1"};
  [[maybe_unused]] const bool auto_device = a.get("device") == "auto";
  std::string device = a.get("device");
  if (device != "auto" && device != "cpu" && device != "cuda") {
    throw UsageError{"--device must be cpu, cuda or auto, got '" + device + "'"};
  }
  {  // where the latents go must be writable before the work starts, not after it
    const std::filesystem::path out_path(a.get("out"));
    const std::filesystem::path parent = out_path.has_parent_path() ? out_path.parent_path() : ".";
    std::error_code ec;
    if (!std::filesystem::is_directory(parent, ec) || std::filesystem::is_directory(out_path, ec)) {
      check(Status::io_error("--out " + a.get("out") + ": " +
                             (std::filesystem::is_directory(out_path, ec) ? "is a folder"
                                                                          : "its folder does not exist")));
    }
  }
  const std::string stream_dir = a.has("stream-dir") ? a.get("stream-dir") : "";
  if (!stream_dir.empty()) {  // created now, so that a bad path fails before any work
    std::error_code ec, ec_dir;
    std::filesystem::create_directories(stream_dir, ec);
    if (ec || !std::filesystem::is_directory(stream_dir, ec_dir)) {
      check(Status::io_error("--stream-dir " + stream_dir + ": cannot create the folder" +
                             (ec ? " (" + ec.message() + ")" : std::string(": a file of that name exists"))));
    }
  }
  // The model's dimensions (the built-in model's, or from the checkpoint's metadata), then the
  // input files checked against them, then the weights: a wrong file fails before the long read.
  WanConfig c;
  Checkpoint ck;
  std::string prefix;
  if (builtin) {
    c.dim = 128;  // head dim 64: runs on the GPU too
    c.num_heads = 2;
    c.num_layers = 2;
    c.ffn_dim = 256;
    c.freq_dim = 32;
    c.text_dim = 64;
    c.text_len = 8;
  } else {
    check(Checkpoint::open(a.get("dit"), &ck));
    prefix = wan_checkpoint_prefix(ck, a.has("ema"));
    check(wan_config_from_checkpoint(ck, prefix, a.get_int("heads"), &c));
  }
  {  // the tiling, sink and window against every chunk of this model's token grid
    const Status s = check_wan_run(c, run, chunk);
    if (!s.ok()) {
      check(Status(s.code(), "--latent, --tiling, --sink-frames or --window-frames do not fit --frames " +
                                 std::to_string(frames) + " in chunks of " + std::to_string(chunk) + ": " + s.message()));
    }
  }
  const int64_t B = run.batch, frame = c.in_dim * run.latent_h * run.latent_w;
  std::vector<float> text, noise, renoise;  // empty: drawn from the seed below
  if (a.has("text")) {  // the text length comes from the features (512 for umT5)
    NpyArray text_file;
    check(read_npy(a.get("text"), &text_file));
    const size_t rank = text_file.shape.size();
    if (rank != 2 && rank != 3) {
      throw Failure{Status::invalid("--text: expected [text_len, text_dim] or [batch, text_len, text_dim]")};
    }
    c.text_len = text_file.shape[rank - 2];
    const std::vector<int64_t> want2 = {c.text_len, c.text_dim}, want3 = {B, c.text_len, c.text_dim};
    text = load_floats(a.get("text"), "--text", rank == 2 ? want2 : want3);
    if (rank == 2) {  // the same prompt for every video of the batch
      std::vector<float> rep;
      for (int64_t b = 0; b < B; ++b) rep.insert(rep.end(), text.begin(), text.end());
      text = rep;
    }
  }
  if (a.has("noise")) noise = load_floats(a.get("noise"), "--noise", {B, frames, c.in_dim, run.latent_h, run.latent_w});
  if (a.has("renoise")) {
    renoise = load_floats(a.get("renoise"), "--renoise",
                          {frames / chunk, 3, B, chunk, c.in_dim, run.latent_h, run.latent_w});
  }
  WanWeights weights;
  if (builtin) {
    weights = wan_random_weights(c, uint64_t(a.get_int("seed")) + 1000);
  } else {
    std::fprintf(stderr, "loading %s (%s%s, %lld layers, dim %lld)...\n", a.get("dit").c_str(),
                 prefix.empty() ? "safetensors" : "prefix ", prefix.c_str(), (long long)c.num_layers, (long long)c.dim);
    check(load_wan_weights(ck, c, prefix, &weights));
    ck = Checkpoint();  // the file is no longer needed
  }
#ifdef MONARCHRT_WITH_CUDA
  if (device == "auto") device = cuda::device_count() > 0 ? "cuda" : "cpu";
#else
  if (device == "cuda") throw Failure{Status::unsupported("--device cuda: this build has no CUDA (see README)")};
  device = "cpu";
#endif
  std::unique_ptr<WanModel> model;
  WanDiT* cpu_dit = nullptr;
#ifdef MONARCHRT_WITH_CUDA
  WanDiTCuda* gpu_dit = nullptr;
  if (device == "cuda") {
    WanCudaOptions opt;
    opt.max_chunk_frames = chunk;
    opt.cuda_graphs = !a.has("no-cuda-graph");
    opt.profile = a.has("profile");
    auto g = std::make_unique<WanDiTCuda>();
    const Status s = g->init(weights, run, opt);
    if (s.ok()) {
      std::fprintf(stderr, "GPU memory: %s\n", g->memory_report().c_str());
      gpu_dit = g.get();
      model = std::move(g);
      weights = WanWeights();  // the GPU holds its own bf16 copy
    } else if (auto_device && s.code() == StatusCode::kUnsupported) {  // e.g. a head dim the kernels lack
      std::fprintf(stderr, "the GPU path cannot run this model (%s); running on the CPU\n", s.message().c_str());
      device = "cpu";
    } else {
      check(s);
    }
  }
#endif
  if (!model) {
    auto d = std::make_unique<WanDiT>();
    check(d->init(weights, run));
    cpu_dit = d.get();
    model = std::move(d);
  }
  Rng rng(uint64_t(a.get_int("seed")));  // text, then noise, then the re-noising draws
  if (text.empty()) {
    text.resize(size_t(B * c.text_len * c.text_dim));
    for (float& x : text) x = float(rng.normal());
  }
#ifdef MONARCHRT_WITH_CUDA
  if (gpu_dit) check(gpu_dit->set_text(text.data()));
#endif
  if (cpu_dit) check(cpu_dit->set_text(text.data()));
  if (noise.empty()) {
    noise.resize(size_t(B * frames * frame));
    for (float& x : noise) x = float(rng.normal());
  }
  SelfForcingCallbacks cb;
  cb.renoise = [&](int64_t k, int step, float* dst, size_t n) {
    if (renoise.empty()) {
      for (size_t i = 0; i < n; ++i) dst[i] = float(rng.normal());
    } else {
      std::copy_n(renoise.begin() + (k * 3 + step - 1) * int64_t(n), n, dst);
    }
  };
  const int64_t chunks = frames / chunk;
  double total = 0;
  cb.on_chunk = [&](int64_t k, const float* x0, double secs) {
    total += secs;
    if (!stream_dir.empty()) {  // the chunk as soon as it exists (x0: [batch, chunk, C, H, W])
      char name[32];
      std::snprintf(name, sizeof name, "/chunk_%03lld.npy", (long long)k);
      check(write_npy(stream_dir + name, DType::kF32, {B, chunk, c.in_dim, run.latent_h, run.latent_w}, x0));
    }
    std::fprintf(stderr, "chunk %lld/%lld  frames [%lld, %lld)  %d passes  %.3f s\n", (long long)k + 1,
                 (long long)chunks, (long long)(k * chunk), (long long)((k + 1) * chunk), k + 1 < chunks ? 5 : 4, secs);
  };
  std::fprintf(stderr, "%s model, %lld layers, dim %lld, %lld frames of %lldx%lld latents, batch %lld, %s attention, %s\n",
               builtin ? "built-in random" : "checkpoint", (long long)c.num_layers, (long long)c.dim, (long long)frames,
               (long long)run.latent_h, (long long)run.latent_w, (long long)B, kind.c_str(),
               device == "cuda" ? "cuda (bf16)" : "cpu (fp32)");
  std::vector<float> latents(size_t(B * frames * frame));
  for (int64_t r = 0; r < repeat; ++r) {
    if (repeat > 1) std::fprintf(stderr, "video %lld/%lld\n", (long long)r + 1, (long long)repeat);
    total = 0;
    check(self_forcing_generate(*model, noise.data(), frames, chunk, cb, latents.data()));
    std::fprintf(stderr, "%lld chunks (%lld frames) in %.3f s\n", (long long)chunks, (long long)frames, total);
  }
#ifdef MONARCHRT_WITH_CUDA
  if (gpu_dit && a.has("profile")) std::fprintf(stderr, "GPU time per step:\n%s", gpu_dit->profile_report().c_str());
#endif
  check(write_npy(a.get("out"), DType::kF32, {B, frames, c.in_dim, run.latent_h, run.latent_w}, latents.data()));
  std::fprintf(stderr, "wrote %s\n", a.get("out").c_str());
  return 0;
}

const char* kMainHelp =
    "usage: monarchrt <command> [options]\n\n"
    "Monarch-structured attention for video diffusion transformers.\n\n"
    "commands:\n"
    "  attention   run Monarch, dense or oracle top-k attention on q, k, v from .npy files\n"
    "  analyze     compare Monarch tilings/iterations and oracle top-k against dense attention\n"
    "  inspect     list and check the tensors of a .safetensors or torch .pt/.pth checkpoint\n"
    "  generate    run the Self-Forcing pipeline of the causal Wan DiT (GPU or CPU) and write latents\n\n"
    "Run 'monarchrt <command> --help' for the options of a command.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kMainHelp, stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "-h" || cmd == "--help" || cmd == "help") {
      std::fputs(kMainHelp, stdout);
      return 0;
    }
    if (cmd == "attention") return cmd_attention(argc, argv);
    if (cmd == "analyze") return cmd_analyze(argc, argv);
    if (cmd == "inspect") return cmd_inspect(argc, argv);
    if (cmd == "generate") return cmd_generate(argc, argv);
    std::fprintf(stderr, "monarchrt: unknown command '%s'\n\n%s", cmd.c_str(), kMainHelp);
    return 2;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "monarchrt %s: %s\n", cmd.c_str(), e.message.c_str());
    return 2;
  } catch (const Failure& f) {
    std::fprintf(stderr, "monarchrt %s: %s\n", cmd.c_str(), f.status.to_string().c_str());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "monarchrt %s: out of memory\n", cmd.c_str());
    return 1;
  }
}
