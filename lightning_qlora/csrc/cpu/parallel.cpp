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

std::atomic<int64_t> g_helper_chunks{0};

// Returns how many chunks this thread ran.
int64_t run_chunks(Job& job) {
  for (int64_t ran = 0;; ++ran) {
    const int64_t chunk = job.next.fetch_add(1, std::memory_order_relaxed);
    if (chunk >= job.chunks) return ran;
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
      g_helper_chunks.fetch_add(run_chunks(*current), std::memory_order_relaxed);
      lock.lock();
      if (--current->helpers_active == 0) done.notify_one();
    }
  }
};

std::atomic<Pool*> g_pool{nullptr};
std::atomic<int> g_max_threads{0};

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

int64_t helper_chunks() { return g_helper_chunks.load(std::memory_order_relaxed); }

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

double LoopSite::cost(int choice) const {
  const int n = std::min(recorded_[choice], kSamples);
  if (n == 0) return -1.0;
  // The mean without the slowest record: a helper descheduled now and then (a busy machine)
  // costs the caller a whole wait each time, so the tail must count -- a median would hide a team
  // that is slow one call in three -- but one outlier (the pool's first start) must not decide.
  double sum = 0.0, slowest = 0.0;
  for (int i = 0; i < n; ++i) {
    sum += samples_[choice][i];
    slowest = std::max(slowest, samples_[choice][i]);
  }
  return n == 1 ? sum : (sum - slowest) / (n - 1);
}

int LoopSite::pick(int threads) {
  if (threads <= 1) return 1;
  SpinGuard guard(lock_);
  ++calls_;
  if (recorded_[0] < kWarmup || recorded_[1] < kWarmup) {  // warm-up: alternate, team first
    probing_ = false;
    return recorded_[1] <= recorded_[0] ? threads : 1;
  }
  const int other = 1 - current_;
  if (calls_ >= next_probe_) {  // after the warm-up both choices have records
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
  samples_[choice][recorded_[choice] % kSamples] = per_chunk;
  ++recorded_[choice];
  if (recorded_[0] == 0 || recorded_[1] == 0) return;
  // A team must be clearly cheaper (kTeamMargin): on a tie -- a memory-bound loop such as
  // dequantize, where a second thread adds no bandwidth -- one thread wastes no core and never
  // waits for a descheduled helper.
  const int best = cost(1) < LoopSite::kTeamMargin * cost(0) ? 1 : 0;
  if (probing_ && choice != current_) interval_ = best == choice ? 8 : std::min(interval_ * 2, kMaxInterval);
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
