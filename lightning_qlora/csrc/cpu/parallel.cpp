// See parallel.h. One process-wide pool of sleeping helper threads, started on first use.
#include "parallel.h"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <time.h>

#include <cstdio>

#include <algorithm>
#include <chrono>
#include <cmath>
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
  std::atomic<int> helpers_active{0};  // joined and not yet done (the caller waits for 0)
  int helpers_joined = 0;              // guarded by Pool::mutex
  bool open = true;                    // guarded by Pool::mutex: helpers may still join
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

// How long a helper that finished a loop (or a caller waiting for its helpers) keeps polling
// before it sleeps on a condition variable. Waking a sleeping thread costs ~20-40 us on the
// 2-core VM this was measured on -- as long as a whole SmolLM2-sized GEMV -- while the loops of
// one forward pass follow each other within microseconds; a short poll bridges those gaps and
// gives the core back soon after (as lightning_qlora/_openmp.py does for torch's OpenMP threads).
constexpr int64_t kPollNs = 50'000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls `done()` for up to kPollNs; true once it holds. Not while other processes keep the machine
// busy (machine_load_level): a polling thread would take the core one of them needs, and a helper
// that is descheduled mid-chunk makes the caller poll in vain.
template <typename Done>
bool poll_for(const Done& done) {
  if (machine_load_level() > 0) return done();
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kPollNs);
  for (int spin = 0;; ++spin) {
    if (done()) return true;
    cpu_relax();
    if ((spin & 63) == 63 && std::chrono::steady_clock::now() > until) return done();
  }
}

// Never destroyed: helpers block on its condition variable until the process exits.
struct Pool {
  std::mutex mutex;
  std::condition_variable wake;  // helpers: a new job was posted
  std::condition_variable done;  // caller: the last active helper left
  std::atomic<uint64_t> generation{0};
  Job* job = nullptr;            // guarded by mutex
  int started = 0;
  std::atomic<bool> busy{false};  // one loop at a time uses the helpers

  void start_helpers(int wanted) {  // under mutex
    for (; started < wanted; ++started) std::thread([this] { helper(); }).detach();
  }

  void helper() {
    uint64_t seen = generation.load(std::memory_order_acquire);
    for (;;) {
      poll_for([&] { return generation.load(std::memory_order_acquire) != seen; });
      std::unique_lock<std::mutex> lock(mutex);
      wake.wait(lock, [&] { return generation.load(std::memory_order_acquire) != seen; });
      seen = generation.load(std::memory_order_acquire);
      Job* current = job;
      // Late or surplus helpers do not join: the caller never waits for them.
      if (current == nullptr || !current->open || current->helpers_joined >= current->helpers_wanted) continue;
      ++current->helpers_joined;
      current->helpers_active.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      g_helper_chunks.fetch_add(run_chunks(*current), std::memory_order_relaxed);
      // the last touch of the job (it lives on the caller's stack, which may return right after)
      if (current->helpers_active.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> notify(mutex);  // under the mutex: the caller cannot miss it
        done.notify_one();
      }
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

// Runs the loop on `threads` threads (caller included); returns how many it could use.
int run_loop(int threads, int64_t count, int64_t grain, int64_t chunks,
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

bool ThreadChoice::fresh(int choice, int slot) const {
  return at_[choice][slot] >= epoch_ && calls_ - at_[choice][slot] <= kStale;
}

int ThreadChoice::since_epoch(int choice) const {
  int n = 0;
  for (int i = 0; i < std::min(recorded_[choice], kSamples); ++i) n += at_[choice][i] >= epoch_ ? 1 : 0;
  return n;
}

double ThreadChoice::cost(int choice) const {
  const int held = std::min(recorded_[choice], kSamples);
  if (held == 0) return -1.0;
  // Fresh records only; with none fresh, the newest one stands in.
  double sum = 0.0, slowest = 0.0;
  int n = 0;
  int newest = 0;
  for (int i = 0; i < held; ++i) {
    if (at_[choice][i] > at_[choice][newest]) newest = i;
    if (!fresh(choice, i)) continue;
    sum += seconds_[choice][i];
    slowest = std::max(slowest, seconds_[choice][i]);
    ++n;
  }
  if (n == 0) return seconds_[choice][newest];
  // The mean without the slowest record: a helper descheduled now and then (a busy machine)
  // costs the caller a whole wait each time, so the tail must count -- a median would hide a team
  // that is slow one call in three -- but one outlier (the pool's first start) must not decide.
  return n == 1 ? sum : (sum - slowest) / (n - 1);
}

void ThreadChoice::forget() {
  epoch_ = calls_;
  interval_ = kFirstInterval;
  measuring_ = true;
}

int ThreadChoice::pick(int threads, int load_level) {
  if (threads <= 1) return 1;
  ++calls_;
  if (load_level != load_level_) {
    if (load_level_ >= 0) forget();
    load_level_ = load_level;
  }
  probing_ = false;
  if (measuring_) {  // kWarmup calls of each since the start or the last change: alternate, fewer first
    const int team = since_epoch(1), one = since_epoch(0);
    const int choice = team == one ? current_ : (team < one ? 1 : 0);
    return choice == 1 ? threads : 1;
  }
  if (calls_ >= next_probe_) {
    probing_ = true;
    next_probe_ = calls_ + interval_;
    return current_ == 1 ? 1 : threads;  // the other choice
  }
  return current_ == 0 ? 1 : threads;
}

void ThreadChoice::record(int threads, double seconds, int64_t chunks) {
  const int choice = threads <= 1 ? 0 : 1;
  const int slot = recorded_[choice] % kSamples;
  seconds_[choice][slot] = seconds / static_cast<double>(std::max<int64_t>(1, chunks));
  at_[choice][slot] = calls_;
  ++recorded_[choice];
  // A team must be clearly cheaper (kTeamMargin): on a tie -- a memory-bound loop such as
  // dequantize, where a second thread adds no bandwidth -- one thread wastes no core and never
  // waits for a descheduled helper.
  const double margin = load_level_ > 0 ? kBusyTeamMargin : kTeamMargin;
  auto best = [&] { return cost(1) < margin * cost(0) ? 1 : 0; };
  if (measuring_) {
    if (since_epoch(0) < kWarmup || since_epoch(1) < kWarmup) return;
    measuring_ = false;
    current_ = best();
    settled_cost_ = cost(current_);
    next_probe_ = calls_ + interval_;
    return;
  }
  if (probing_) {
    const int winner = best();
    interval_ = winner == choice ? kFirstInterval : std::min(interval_ * 2, kMaxInterval);
    current_ = winner;
    settled_cost_ = cost(current_);
    return;
  }
  current_ = best();
  // The running choice's two newest records far from where it settled (one preempted call is
  // not a new machine): conditions changed, measure both again.
  const int previous_slot = (slot + kSamples - 1) % kSamples;
  auto moved = [&](int at) { return std::fabs(seconds_[choice][at] - settled_cost_) > kShift * settled_cost_; };
  if (current_ == choice && fresh(choice, previous_slot) && moved(slot) && moved(previous_slot)) forget();
}

ThreadChoice& LoopSite::choice_for(uint64_t shape) {
  const uint64_t key = shape | 1;  // 0 marks an empty slot
  for (int i = 0; i < used_; ++i)
    if (keys_[i] == key) return choices_[i];
  if (used_ < kShapes) {
    keys_[used_] = key;
    return choices_[used_++];
  }
  return choices_[kShapes - 1];  // more shapes than slots: the rest share the last one
}

int LoopSite::pick(uint64_t shape, int threads, int load_level) {
  SpinGuard guard(lock_);
  return choice_for(shape).pick(threads, load_level);
}

namespace {
// The load level covers the last ~100 ms: the machine's non-idle CPU time (/proc/stat, in clock
// ticks of 10 ms) minus this process's own (CLOCK_PROCESS_CPUTIME_ID) -- other processes' work
// only. Counting runnable threads instead (/proc/loadavg) counted this process's own OpenMP and pool
// threads, which spin or poll between ops: a training step looked like a busy machine to itself.
constexpr int64_t kLoadWindowNs = 100'000'000;
std::mutex g_load_mutex;
int64_t g_window_start_ns = -1;  // guarded by g_load_mutex, as the two below
double g_window_machine_s = 0.0;
double g_window_self_s = 0.0;
std::atomic<int> g_load_level{0};

// Non-idle CPU seconds of the whole machine since boot (the first line of /proc/stat), or -1.
double machine_busy_seconds() {
  const int fd = open("/proc/stat", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1.0;
  char text[512];
  const ssize_t size = read(fd, text, sizeof(text) - 1);
  close(fd);
  if (size <= 0) return -1.0;
  text[size] = '\0';
  unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  if (sscanf(text, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &user, &nice, &system, &idle, &iowait, &irq,
             &softirq, &steal) < 4)
    return -1.0;
  const long ticks = sysconf(_SC_CLK_TCK);
  return static_cast<double>(user + nice + system + irq + softirq + steal) / static_cast<double>(ticks > 0 ? ticks : 100);
}

double self_cpu_seconds() {
  timespec now{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}
}  // namespace

int machine_load_level() {
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  std::unique_lock<std::mutex> lock(g_load_mutex, std::try_to_lock);
  if (!lock.owns_lock() || (g_window_start_ns >= 0 && now - g_window_start_ns < kLoadWindowNs))
    return g_load_level.load(std::memory_order_relaxed);
  const double machine = machine_busy_seconds(), self = self_cpu_seconds();
  if (machine < 0.0) return 0;  // no /proc/stat: the level never changes, the choice is by timing alone
  if (g_window_start_ns >= 0) {
    const double wall = 1e-9 * static_cast<double>(now - g_window_start_ns);
    const double others = std::max(0.0, (machine - g_window_machine_s) - (self - g_window_self_s)) / wall;
    const unsigned hardware = std::thread::hardware_concurrency();
    const double quarters = others * 4.0 / (hardware > 0 ? hardware : 1);  // 0..4: quarters of the cores
    const int level = g_load_level.load(std::memory_order_relaxed);
    // a quarter-level of hysteresis: ticks of 10 ms make a 100 ms window's figure jitter
    if (quarters > level + 1.25 || quarters < level - 0.25)
      g_load_level.store(std::min(4, static_cast<int>(quarters)), std::memory_order_relaxed);
  }
  g_window_start_ns = now;
  g_window_machine_s = machine;
  g_window_self_s = self;
  return g_load_level.load(std::memory_order_relaxed);
}

void LoopSite::record(uint64_t shape, int threads, double seconds, int64_t chunks) {
  SpinGuard guard(lock_);
  choice_for(shape).record(threads, seconds, chunks);
}

namespace {
// A call's shape for its site: count, grain and the kernel's variant, mixed into one key.
uint64_t shape_key(int64_t count, int64_t grain, int64_t variant) {
  uint64_t key = 0x9E3779B97F4A7C15ull;
  for (const int64_t part : {count, grain, variant}) {
    key ^= static_cast<uint64_t>(part) + 0x9E3779B97F4A7C15ull + (key << 6) + (key >> 2);
  }
  return key;
}
}  // namespace

void parallel_for(LoopSite& site, int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body,
                  int64_t variant) {
  if (count <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (count + grain - 1) / grain;
  const int team = static_cast<int>(std::min<int64_t>(max_threads(), chunks));
  if (team <= 1) {
    body(0, count);
    return;
  }
  const uint64_t shape = shape_key(count, grain, variant);
  const int threads = site.pick(shape, team, machine_load_level());
  const auto start = std::chrono::steady_clock::now();
  const int ran = run_loop(threads, count, grain, chunks, body);
  site.record(shape, ran, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), chunks);
}

int run_loop(int threads, int64_t count, int64_t grain, int64_t chunks,
             const std::function<void(int64_t, int64_t)>& body) {
  Pool* helpers = threads > 1 ? pool() : nullptr;
  bool idle = false;
  if (helpers == nullptr || !helpers->busy.compare_exchange_strong(idle, true, std::memory_order_acquire)) {
    body(0, count);
    return 1;  // a nested call, or another thread's loop holds the helpers: this one ran alone
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
    helpers->generation.fetch_add(1, std::memory_order_acq_rel);
  }
  helpers->wake.notify_all();  // no system call when every helper is still polling
  run_chunks(job);
  {
    std::lock_guard<std::mutex> lock(helpers->mutex);
    job.open = false;
    helpers->job = nullptr;
  }
  auto finished = [&] { return job.helpers_active.load(std::memory_order_acquire) == 0; };
  if (!poll_for(finished)) {
    std::unique_lock<std::mutex> lock(helpers->mutex);
    helpers->done.wait(lock, finished);
  }
  helpers->busy.store(false, std::memory_order_release);
  return threads;
}

}  // namespace cpu
}  // namespace lightning_qlora
