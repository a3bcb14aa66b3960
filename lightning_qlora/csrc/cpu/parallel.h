// Parallel loops for the CPU kernels that degrade gracefully on a busy machine.
//
// Work is cut into chunks that threads claim one at a time from an atomic counter (dynamic
// assignment): a thread that is not scheduled in time (another process holds its core) claims
// nothing and the running threads do its share -- with a static split (the old
// `omp for schedule(static)`) every call waited for the slowest thread, and a 2-thread GEMV
// beside one busy process ran 15x slower than 1 thread (issue 18).
//
// Whose threads: the extension installs a team runner (bindings.cpp) that runs the claim loop
// in torch's intra-op pool, so our kernels share threads with torch's own ops and MKL instead of
// a second pool competing with torch's OpenMP workers for the same cores (those workers spin
// after each op unless OMP_WAIT_POLICY=PASSIVE, which lightning_qlora/_openmp.py sets when it
// can). Without a runner (the standalone sanitizer build) a built-in pool of sleeping helpers
// runs the loop; its caller waits only for chunks a helper actually claimed.
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
// idle machine (2 threads ~1.2-2x faster) but on a busy one a parallel region can wait a whole
// scheduler timeslice for a descheduled thread (measured: 2-thread calls 2-4x slower than
// 1-thread ones beside two busy processes). Each call records its time per chunk for the thread
// count it ran with (a moving average per choice); the site runs the cheaper choice and re-probes
// the other now and then, backing off exponentially while the probe keeps losing. So a call
// costs at most about what one thread costs, plus rare probes.
class LoopSite {
 public:
  int pick(int threads);                      // thread count for the next call (1 or `threads`)
  void record(int threads, double seconds, int64_t chunks);

 private:
  double cost_[2] = {-1.0, -1.0};  // seconds per chunk: [one thread, a team]; < 0 = never measured
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

// Runs each_thread() on `threads` threads (the caller among them) and returns when all are done.
using TeamRunner = void (*)(int threads, const std::function<void()>& each_thread);
void set_team_runner(TeamRunner runner);

}  // namespace cpu
}  // namespace lightning_qlora
