// See parallel.h. One process-wide pool of sleeping helper threads, started on first use.
#include "parallel.h"

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace lightning_qlora {
namespace cpu {
namespace {

struct Job {
  const std::function<void(int64_t, int64_t)>* body;
  int64_t count;
  int64_t grain;
  int64_t chunks;
  int helpers_wanted;
  std::atomic<int64_t> next{0};
  int helpers_joined = 0;  // guarded by Pool::mutex
  int helpers_active = 0;  // guarded by Pool::mutex
  bool open = true;        // guarded by Pool::mutex: helpers may still join
};

void run_chunks(Job& job) {
  for (;;) {
    const int64_t chunk = job.next.fetch_add(1, std::memory_order_relaxed);
    if (chunk >= job.chunks) return;
    const int64_t begin = chunk * job.grain;
    (*job.body)(begin, std::min(begin + job.grain, job.count));
  }
}

// Never destroyed: helpers block on its condition variable until the process exits.
struct Pool {
  std::mutex mutex;
  std::condition_variable wake;  // helpers: a new job was posted
  std::condition_variable done;  // caller: the last active helper left
  uint64_t generation = 0;
  Job* job = nullptr;
  int started = 0;
  std::atomic<bool> busy{false};  // one loop at a time uses the helpers

  void start_helpers(int wanted) {  // under mutex
    for (; started < wanted; ++started) std::thread([this] { helper(); }).detach();
  }

  void helper() {
    std::unique_lock<std::mutex> lock(mutex);
    uint64_t seen = generation;
    for (;;) {
      wake.wait(lock, [&] { return generation != seen; });
      seen = generation;
      Job* current = job;
      // Late or surplus helpers do not join: the caller never waits for them.
      if (current == nullptr || !current->open || current->helpers_joined >= current->helpers_wanted) continue;
      ++current->helpers_joined;
      ++current->helpers_active;
      lock.unlock();
      run_chunks(*current);
      lock.lock();
      if (--current->helpers_active == 0) done.notify_one();
    }
  }
};

std::atomic<Pool*> g_pool{nullptr};
std::atomic<int> g_max_threads{0};
std::atomic<TeamRunner> g_runner{nullptr};

Pool* pool() {
  Pool* current = g_pool.load(std::memory_order_acquire);
  if (current != nullptr) return current;
  static std::once_flag once;
  std::call_once(once, [] {
    // A forked child (DataLoader workers) has none of the parent's helpers and possibly a
    // mutex some parent thread held: it starts over with a fresh pool (the old one is leaked).
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(new Pool, std::memory_order_release); });
    Pool* fresh = new Pool;
    Pool* expected = nullptr;
    if (!g_pool.compare_exchange_strong(expected, fresh)) delete fresh;
  });
  return g_pool.load(std::memory_order_acquire);
}

}  // namespace

void run_loop(int threads, int64_t count, int64_t grain, int64_t chunks,
              const std::function<void(int64_t, int64_t)>& body);

void set_team_runner(TeamRunner runner) { g_runner.store(runner, std::memory_order_release); }

void set_max_threads(int threads) { g_max_threads.store(threads, std::memory_order_relaxed); }

int max_threads() {
  const int threads = g_max_threads.load(std::memory_order_relaxed);
  if (threads > 0) return threads;
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

namespace {
struct SpinGuard {
  std::atomic_flag& flag;
  explicit SpinGuard(std::atomic_flag& f) : flag(f) {
    while (flag.test_and_set(std::memory_order_acquire)) std::this_thread::yield();
  }
  ~SpinGuard() { flag.clear(std::memory_order_release); }
};
}  // namespace

int LoopSite::pick(int threads) {
  if (threads <= 1) return 1;
  SpinGuard guard(lock_);
  ++calls_;
  const int other = 1 - current_;
  if (cost_[other] < 0.0 || calls_ >= next_probe_) {
    probing_ = true;
    next_probe_ = calls_ + interval_;
    return other == 0 ? 1 : threads;
  }
  probing_ = false;
  return current_ == 0 ? 1 : threads;
}

void LoopSite::record(int threads, double seconds, int64_t chunks) {
  const int choice = threads <= 1 ? 0 : 1;
  const double per_chunk = seconds / static_cast<double>(std::max<int64_t>(1, chunks));
  SpinGuard guard(lock_);
  cost_[choice] = cost_[choice] < 0.0 ? per_chunk : 0.75 * cost_[choice] + 0.25 * per_chunk;
  if (cost_[0] < 0.0 || cost_[1] < 0.0) return;
  const int best = cost_[0] <= cost_[1] ? 0 : 1;
  if (probing_ && choice != current_) interval_ = best == choice ? 8 : std::min<int64_t>(interval_ * 2, 1024);
  current_ = best;
}

void parallel_for(LoopSite& site, int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (count + grain - 1) / grain;
  const int team = static_cast<int>(std::min<int64_t>(max_threads(), chunks));
  if (team <= 1) {
    body(0, count);
    return;
  }
  const int threads = site.pick(team);
  const auto start = std::chrono::steady_clock::now();
  run_loop(threads, count, grain, chunks, body);
  site.record(threads, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), chunks);
}

void run_loop(int threads, int64_t count, int64_t grain, int64_t chunks,
              const std::function<void(int64_t, int64_t)>& body) {
  const TeamRunner runner = g_runner.load(std::memory_order_acquire);
  if (runner != nullptr && threads > 1) {
    Job job;
    job.body = &body;
    job.count = count;
    job.grain = grain;
    job.chunks = chunks;
    job.helpers_wanted = 0;
    runner(threads, [&job] { run_chunks(job); });
    return;
  }
  Pool* helpers = threads > 1 ? pool() : nullptr;
  bool idle = false;
  if (helpers == nullptr || !helpers->busy.compare_exchange_strong(idle, true, std::memory_order_acquire)) {
    body(0, count);
    return;
  }
  Job job;
  job.body = &body;
  job.count = count;
  job.grain = grain;
  job.chunks = chunks;
  job.helpers_wanted = threads - 1;
  {
    std::lock_guard<std::mutex> lock(helpers->mutex);
    helpers->start_helpers(threads - 1);
    helpers->job = &job;
    ++helpers->generation;
  }
  helpers->wake.notify_all();
  run_chunks(job);
  {
    std::unique_lock<std::mutex> lock(helpers->mutex);
    job.open = false;
    helpers->job = nullptr;
    helpers->done.wait(lock, [&] { return job.helpers_active == 0; });
  }
  helpers->busy.store(false, std::memory_order_release);
}

}  // namespace cpu
}  // namespace lightning_qlora
