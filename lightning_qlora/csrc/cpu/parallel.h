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

// How many threads a loop runs on, chosen by measurement: a team pays off on an idle machine (2
// threads ~1.8-2x faster on the 4096x4096 GEMV), but beside busy processes a helper shares its core
// and may be descheduled in the middle of its chunk -- the caller then waits for it, and one thread
// (which the scheduler often gives a core of its own) is faster. Contention comes and goes, so the
// choice must follow it within a few calls, both ways.
//
// One ThreadChoice per call shape: each call records its time per chunk for the thread count it ran
// with; a choice's cost is the mean of its recent records without the slowest (the tail of late
// wake-ups counts, one outlier such as the pool's first start does not), where recent means within
// the last kStale calls of this shape and since the machine last changed -- older records describe
// a machine that may be gone, so a fresh probe is compared with fresh records, never with what held
// a minute ago. After kWarmup calls of each, the cheaper choice runs (a team only if clearly
// cheaper, kTeamMargin) and the other is probed now and then: every kFirstInterval calls, backing
// off to kMaxInterval while the probe keeps losing. The machine changed -- the load level
// (machine_load_level) moved, or the running choice's own cost moved by kShift -- means: forget the
// records and measure both choices again at once.
class ThreadChoice {
 public:
  static constexpr int kSamples = 5;
  static constexpr int kWarmup = 2;  // records of each choice before the costs decide, at the start and
                                     // after a change (a first team call also starts the pool, and one
                                     // call is often preempted: one slow record must not decide)
  static constexpr int64_t kStale = 48;
  static constexpr int64_t kFirstInterval = 4;
  static constexpr int64_t kMaxInterval = 32;
  static constexpr double kTeamMargin = 0.95;  // a team is chosen only if at least 5% cheaper per chunk,
  static constexpr double kBusyTeamMargin = 0.8;  // 20% while other processes are running (load level > 0):
                                                  // then a team's few samples are luck more often than not
  static constexpr double kShift = 0.3;

  int pick(int threads, int load_level);  // thread count for the next call (1 or `threads`)
  void record(int threads, double seconds, int64_t chunks);

 private:
  double cost(int choice) const;  // seconds per chunk of the recent records (see above); < 0 = none yet
  bool fresh(int choice, int slot) const;
  int since_epoch(int choice) const;  // records of `choice` since the last forget()
  void forget();  // the machine changed: only records from now on count, both choices are measured again

  double seconds_[2][kSamples] = {};  // [one thread, a team]: ring buffers of seconds per chunk
  int64_t at_[2][kSamples] = {};      // the call each record was made at
  int recorded_[2] = {0, 0};          // records so far per choice
  int64_t calls_ = 0;
  int64_t next_probe_ = 0;
  int64_t interval_ = kFirstInterval;
  double settled_cost_ = -1.0;  // the running choice's cost when it was last decided
  int64_t epoch_ = 0;           // records made before this call are stale (forget)
  int load_level_ = -1;         // machine_load_level at the last pick
  int current_ = 1;
  bool probing_ = false;
  bool measuring_ = true;  // kWarmup records of each choice since epoch_ before the costs decide
};

// How busy the machine is beside this process, coarsely: the CPU time other processes used over the
// last ~100 ms (Linux /proc/stat less this process's own CPU time) in quarters of the cores, 0..4;
// always 0 where it cannot be read. A change of it makes ThreadChoice re-measure, a level above 0
// raises its bar for a team and stops the pool's polling; the choice itself is always made by
// timing, so a container that sees its host's load loses nothing but a few probes.
int machine_load_level();

// One kernel's thread choices, one per call shape (count, grain and a kernel-defined variant such as
// the batch rows of a GEMV): a batch-1 and a batch-8 GEMV, or a 576x576 and a 4096x4096 weight, cost
// differently per chunk and must not share records. Up to kShapes shapes; later ones share a slot.
class LoopSite {
 public:
  static constexpr int kShapes = 32;
  int pick(uint64_t shape, int threads, int load_level);
  void record(uint64_t shape, int threads, double seconds, int64_t chunks);

 private:
  ThreadChoice& choice_for(uint64_t shape);  // under lock_

  uint64_t keys_[kShapes] = {};
  ThreadChoice choices_[kShapes];
  int used_ = 0;
  std::atomic_flag lock_ = ATOMIC_FLAG_INIT;
};

// body(begin, end) over [0, count) in chunks of `grain` (the last may be shorter), each chunk
// exactly once, on the thread count `site` picks for this shape (`variant`: what else sets the cost
// of a chunk, e.g. a GEMV's batch rows). Runs in the caller alone when there is one chunk, one
// thread, or when the pool is already busy (a nested call, another thread's loop).
void parallel_for(LoopSite& site, int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body,
                  int64_t variant = 0);

// Chunks run by pool helpers (not the caller) since the process started: lets a test see that a
// team really ran on more than one thread.
int64_t helper_chunks();

}  // namespace cpu
}  // namespace lightning_qlora
