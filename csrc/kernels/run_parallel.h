// run_parallel.h — split a kernel's work items over a few threads for one call.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace ekv {

// Runs work(worker, item) for every item in [0, items) on up to `threads` workers, the caller
// being worker 0; items are handed out in order, one at a time, so uneven items balance. A
// thread that cannot be started leaves its share to the others: the call never fails.
template <typename Work>
void run_parallel(std::int64_t items, int threads, Work&& work) {
  const int workers = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(threads, items)));
  std::atomic<std::int64_t> next{0};
  auto loop = [&](int w) {
    for (std::int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) work(w, i);
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(static_cast<std::size_t>(workers - 1));  // so emplace_back never reallocates
  } catch (const std::bad_alloc&) {
    loop(0);  // no room even for the list: the caller does it all
    return;
  }
  for (int w = 1; w < workers; ++w) {
    try {
      pool.emplace_back(loop, w);
    } catch (const std::system_error&) {
      break;
    }
  }
  loop(0);
  for (auto& t : pool) t.join();
}

// The number of workers run_parallel uses for `items` items and `threads` threads.
inline int parallel_workers(std::int64_t items, int threads) {
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(threads, items)));
}

}  // namespace ekv
