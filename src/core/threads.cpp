// Worker-count setting and parallel_for for the CPU paths.
#include "threads.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "monarchrt/attention.h"

namespace monarchrt {

namespace {
std::atomic<int> g_threads{0};

int default_threads() {
  if (const char* env = std::getenv("MONARCHRT_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}
}  // namespace

namespace cpu {
void set_num_threads(int n) { g_threads = n > 0 ? n : 0; }
int num_threads() {
  const int n = g_threads.load();
  return n > 0 ? n : default_threads();
}
}  // namespace cpu

void parallel_for(int64_t n, const std::function<void(int64_t task)>& fn) {
  const int workers = static_cast<int>(std::min<int64_t>(cpu::num_threads(), n));
  if (workers <= 1) {
    for (int64_t t = 0; t < n; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    for (int64_t t = next++; t < n; t = next++) {
      try {
        fn(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next = n;  // stop handing out tasks
      }
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < workers; ++i) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace monarchrt
