// A minimal parallel-for over independent tasks for the CPU paths: std::thread workers pulling
// task indices from an atomic counter (tasks here are large and uneven, so dynamic scheduling).
#pragma once

#include <cstdint>
#include <functional>

namespace monarchrt {

// Runs fn(task) for task in [0, n) on up to cpu::num_threads() threads and returns when all are
// done. An exception thrown by a task is rethrown here after the others have finished.
void parallel_for(int64_t n, const std::function<void(int64_t task)>& fn);

}  // namespace monarchrt
