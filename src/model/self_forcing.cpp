// The Self-Forcing autoregressive loop (../shared/docs/self-forcing-spec.md section 2.3).
#include <chrono>

#include "monarchrt/wan.h"

namespace monarchrt {

Status self_forcing_generate(WanModel& dit, const float* noise, int64_t frames, int64_t chunk,
                             const SelfForcingCallbacks& cb, float* latents) {
  const WanRunConfig& run = dit.run();
  const WanConfig& c = dit.config();
  if (chunk < 1 || frames < 1 || frames % chunk != 0) {
    return Status::invalid("frames = " + std::to_string(frames) + " must be a positive multiple of chunk = " +
                           std::to_string(chunk));
  }
  if (frames > run.max_frames) {
    return Status::invalid("frames = " + std::to_string(frames) + " exceed the cache of " +
                           std::to_string(run.max_frames) + " frames");
  }
  if (!cb.renoise) return Status::invalid("callbacks.renoise is required");
  if (c.out_dim != c.in_dim) {
    return Status::invalid("config.out_dim = " + std::to_string(c.out_dim) + " differs from config.in_dim = " +
                           std::to_string(c.in_dim) + ": the sampler needs a flow of the latents' shape");
  }
  const int64_t B = run.batch, frame = c.in_dim * run.latent_h * run.latent_w, per = chunk * frame;
  const std::vector<SelfForcingStep> steps = self_forcing_steps();
  const bool whole_chunks = dit.runs_chunks();
  std::vector<float> xt(size_t(B * per)), x0(xt.size());
  std::vector<float> v(whole_chunks ? 0 : xt.size()), fresh(v.size());  // the pass-by-pass loop's
  for (int64_t k = 0; k * chunk < frames; ++k) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t s = k * chunk;
    for (int64_t b = 0; b < B; ++b)
      std::copy(noise + (b * frames + s) * frame, noise + (b * frames + s + chunk) * frame, xt.begin() + b * per);
    if (whole_chunks) {  // the whole chunk, refresh pass included, on the model's device
      const auto draw = [&](int step, float* dst) { cb.renoise(k, step, dst, xt.size()); };
      MONARCHRT_RETURN_IF_ERROR(dit.denoise_chunk(xt.data(), draw, chunk, s, s + chunk < frames, x0.data()));
    } else {
      for (size_t j = 0; j < steps.size(); ++j) {
        MONARCHRT_RETURN_IF_ERROR(dit.forward(xt.data(), chunk, s, steps[j].t, v.data()));
        for (size_t i = 0; i < xt.size(); ++i) x0[i] = sampler_x0(xt[i], v[i], steps[j].sigma);
        if (j + 1 < steps.size()) {
          cb.renoise(k, int(j + 1), fresh.data(), fresh.size());
          const double sn = steps[j + 1].sigma;
          for (size_t i = 0; i < xt.size(); ++i) xt[i] = sampler_renoise(x0[i], fresh[i], sn);
        }
      }
      // the refresh pass: the clean chunk's K/V into the cache (its output is not needed)
      if (s + chunk < frames) MONARCHRT_RETURN_IF_ERROR(dit.forward(x0.data(), chunk, s, 0.0, nullptr));
    }
    for (int64_t b = 0; b < B; ++b)
      std::copy(x0.begin() + b * per, x0.begin() + (b + 1) * per, latents + (b * frames + s) * frame);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (cb.on_chunk) cb.on_chunk(k, x0.data(), secs);
  }
  return Status();
}

Status WanModel::denoise_chunk(const float*, const std::function<void(int, float*)>&, int64_t, int64_t, bool, float*) {
  return Status::unsupported("this model does not run whole chunks (runs_chunks() is false)");
}

}  // namespace monarchrt
