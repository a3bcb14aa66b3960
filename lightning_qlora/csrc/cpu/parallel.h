// Parallel loops for the CPU kernels that degrade gracefully on a busy machine.
//
// Work is cut into chunks that threads claim one at a time from an atomic counter (dynamic
// assignment): a thread that is not scheduled in time (another process holds its core) claims
// nothing and the running threads do its share -- with a static split (the old
// `omp for schedule(static)`) every call waited for the slowest thread, and a 2-thread GEMV
// beside one busy process ran 15x slower than 1 thread (issue 18).
//
// Whose threads: a process-wide pool of helpers that sleep on a condition variable between
// loops (no spinning), started on first use. Not torch's intra-op pool: its team runs through an
// inline `#pragma omp parallel` in ATen's headers, which this extension (built without -fopenmp,
// to keep one OpenMP runtime in the process: torch's) compiles as a serial loop -- the earlier
// runner ran every "team" in the caller alone. torch's own OpenMP workers sleep too between ops
// (OMP_WAIT_POLICY=PASSIVE, set by lightning_qlora/_openmp.py when it can), so the two pools take
// turns rather than compete for the cores.
#pragma once

#include <stdint.h>

#include <atomic>
#include <functional>

namespace lightning_qlora {
namespace cpu {

// Threads (caller included) a loop may use; the bindings set torch.get_num_threads() per call.
void set_max_threads(int threads);
int max_threads();

// How many threads a loop site (one kernel) runs on, chosen by measurement: a team pays off on an
// idle machine (2 threads ~1.8x faster on the 4096x4096 GEMV) but on a busy one a helper may be
// descheduled in the middle of its chunk and the caller waits for it. Each call records its time
// per chunk for the thread count it ran with; a choice's cost is the mean of its last kSamples
// records without the slowest (the tail of late wake-ups counts, the pool's first start does not).
// After kWarmup calls of each, the site runs the cheaper choice (a team only if clearly cheaper,
// kTeamMargin) and re-probes the other now and then, backing off (up to kMaxInterval calls)
// while the probe keeps losing. So a call costs about what the better
// choice costs, plus rare probes.
class LoopSite {
 public:
  static constexpr int kSamples = 5;
  static constexpr int kWarmup = 2;  // records of each choice before the costs decide (a first team
                                     // call also starts the pool: one slow record must not decide)
  static constexpr int64_t kMaxInterval = 64;
  static constexpr double kTeamMargin = 0.95;  // a team is chosen only if at least 5% cheaper per chunk

  int pick(int threads);  // thread count for the next call (1 or `threads`)
  void record(int threads, double seconds, int64_t chunks);

 private:
  double cost(int choice) const;  // seconds per chunk of the recent records (see above); < 0 = none yet

  double samples_[2][kSamples] = {};  // [one thread, a team]: ring buffers of seconds per chunk
  int recorded_[2] = {0, 0};          // records so far per choice
  int64_t calls_ = 0;
  int64_t next_probe_ = 0;
  int64_t interval_ = 8;
  int current_ = 1;
  bool probing_ = false;
  std::atomic_flag lock_ = ATOMIC_FLAG_INIT;
};

// body(begin, end) over [0, count) in chunks of `grain` (the last may be shorter), each chunk
// exactly once, on the thread count `site` picks. Runs in the caller alone when there is one
// chunk, one thread, or when the pool is already busy (a nested call, another thread's loop).
void parallel_for(LoopSite& site, int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

// Chunks run by pool helpers (not the caller) since the process started: lets a test see that a
// team really ran on more than one thread.
int64_t helper_chunks();

}  // namespace cpu
}  // namespace lightning_qlora
