// The kernels' own thread pool: the calling thread and torch's thread count less one workers take the
// chunks of a loop one at a time, and the loop ends once every chunk is done, not once every thread
// has arrived. OpenMP's team (which at::parallel_for and `#pragma omp parallel` use) ends each region at
// a barrier: when a thread is descheduled (the serving processes share these cores) the others wait
// for it, even when it holds no work. Here:
// - a worker that took no chunk is not waited for, and a worker preempted in the middle of a matmul's
//   chunk is not either: its chunk is stealable (`run_stealable`): a worker computes it into a buffer
//   of its own and copies it in only if the calling thread has not redone it meanwhile, which the
//   calling thread does once the chunk has taken well over its own chunks' time;
// - workers spin only briefly between loops, then sleep (a futex), so the core is free for others
//   while the calling thread runs Python between kernel calls (OpenMP's workers spin for milliseconds).
// A loop started while another runs (a second calling thread, or from inside a chunk) runs on its
// caller alone. x86-64 Linux only, as the kernels are.
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace llm_kernels {

// A matmul whose output columns come in blocks of 16: `compute(b0, b1, y, ld, col0)` writes blocks
// [b0, b1) of every row r to y[r * ld + (16 * b - col0) + j]. Held by a shared_ptr so a late worker's
// reads stay valid after the caller returned (it then computes into its own buffer and drops it).
struct Stealable {
  virtual ~Stealable() = default;
  virtual void compute(int64_t b0, int64_t b1, float* y, int64_t ld, int64_t col0) const = 0;
  int64_t M = 0, N = 0;  // rows, columns of y
  float* Y = nullptr;    // the output: written only by the caller, or by a worker before it is done
};

class Pool {
 public:
  // Jobs run, chunks the calling thread redid (stolen), and workers started.
  std::vector<int64_t> stats() const { return {static_cast<int64_t>(jobs_), steals_.load(), num_workers_}; }

  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its workers sleep until the process ends
    return *pool;
  }

  // f(b, e) over [begin, end) in chunks of `chunk`.
  template <typename F>
  void run(int64_t begin, int64_t end, int64_t chunk, const F& f) {
    auto call = [](const void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); };
    dispatch(begin, end, chunk, call, &f, nullptr);
  }

  // job->compute over blocks [0, blocks) in chunks of `chunk` blocks, stealable (above).
  void run_stealable(const std::shared_ptr<const Stealable>& job, int64_t blocks, int64_t chunk) {
    auto call = [](const void* ctx, int64_t b, int64_t e) {
      const Stealable& s = *static_cast<const Stealable*>(ctx);
      s.compute(b, e, s.Y, s.N, 0);
    };
    dispatch(0, blocks, chunk, call, job.get(), &job);
  }

 private:
  using Call = void (*)(const void*, int64_t, int64_t);
  enum : uint8_t { FREE, RUNNING, COMMITTING, DONE, STOLEN };
  static constexpr int MAX_WORKERS = 63;
  static constexpr uint64_t WRITING = ~0ull;

  struct alignas(64) Slot {
    std::atomic<uint64_t> job{0};  // the job it holds, or WRITING while the caller fills it
    std::atomic<int> refs{0};      // workers inside it
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> pending{0};  // chunks not yet done
    int64_t begin = 0, end = 0, chunk = 1;
    int workers = 0;  // workers wanted
    Call call = nullptr;
    const void* ctx = nullptr;
    std::shared_ptr<const Stealable> stealable;
    std::atomic<bool> keeps_job{false};  // stealable is set (read this, not it, unless inside an unfinished job)
    std::unique_ptr<std::atomic<uint8_t>[]> state;  // per chunk, for stealable jobs
    int64_t state_size = 0;
  };

  std::mutex caller_;  // one calling thread at a time
  std::atomic<uint64_t> latest_{0};  // (job << 8) | slot, of the newest job
  std::atomic<uint32_t> wake_{0};
  std::atomic<int> sleepers_{0};
  Slot slots_[MAX_WORKERS + 1];
  int num_workers_ = 0;
  uint64_t jobs_ = 0;
  int64_t spin_ns_ = 50000;
  int64_t test_delay_us_ = 0;  // tests: a worker sleeps this long in each stealable chunk (a preempted worker)
  std::atomic<int64_t> steals_{0};

  Pool() {
    if (const char* v = std::getenv("LLM_SERVE_POOL_SPIN_US")) spin_ns_ = std::max<int64_t>(0, std::atoll(v)) * 1000;
    if (const char* v = std::getenv("LLM_SERVE_POOL_TEST_DELAY_US")) test_delay_us_ = std::max<int64_t>(0, std::atoll(v));
  }

  static inline thread_local bool inside_ = false;  // running a chunk, or the caller of a running job

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  void futex_wait(uint32_t seen) { syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0); }
  void futex_wake() { syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0); }

  void dispatch(int64_t begin, int64_t end, int64_t chunk, Call call, const void* ctx, const std::shared_ptr<const Stealable>* stealable) {
    chunk = std::max<int64_t>(1, chunk);
    const int threads = static_cast<int>(std::min<int64_t>({at::get_num_threads(), MAX_WORKERS + 1, (end - begin + chunk - 1) / chunk}));
    std::unique_lock<std::mutex> lock(caller_, std::try_to_lock);
    if (threads <= 1 || inside_ || !lock.owns_lock()) {
      if (begin < end) call(ctx, begin, end);
      return;
    }
    while (num_workers_ < threads - 1) {
      std::thread([this, w = num_workers_] { work(w); }).detach();
      ++num_workers_;
    }
    Slot& s = claim_slot();
    const int64_t chunks = (end - begin + chunk - 1) / chunk;
    s.begin = begin, s.end = end, s.chunk = chunk, s.workers = threads - 1, s.call = call, s.ctx = ctx;
    s.stealable = stealable ? *stealable : nullptr;
    s.keeps_job.store(stealable != nullptr, std::memory_order_relaxed);
    if (stealable) {
      if (s.state_size < chunks) s.state.reset(new std::atomic<uint8_t>[s.state_size = chunks]);
      for (int64_t i = 0; i < chunks; ++i) s.state[i].store(FREE, std::memory_order_relaxed);
    }
    s.next.store(begin, std::memory_order_relaxed);
    s.pending.store(chunks, std::memory_order_relaxed);
    const uint64_t job = ++jobs_;
    s.job.store(job);
    latest_.store(job << 8 | static_cast<uint64_t>(&s - slots_));
    if (sleepers_.load() > 0) {
      wake_.fetch_add(1);
      futex_wake();
    }
    inside_ = true;
    int64_t longest = 0;  // the caller's longest chunk, for when to steal
    for (int64_t b; (b = s.next.fetch_add(chunk, std::memory_order_relaxed)) < end;) {
      const int64_t t0 = stealable ? now_ns() : 0;
      call(ctx, b, std::min(end, b + chunk));
      if (stealable) {
        longest = std::max(longest, now_ns() - t0);
        s.state[(b - begin) / chunk].store(DONE, std::memory_order_relaxed);
      }
      s.pending.fetch_sub(1, std::memory_order_acq_rel);
    }
    finish(s, stealable != nullptr, longest, chunks);
    inside_ = false;
    if (stealable && s.refs.load() == 0) {  // drop the job now unless a late worker is still inside
      s.job.store(WRITING);
      if (s.refs.load() == 0) drop_job(s);
    }
  }

  // A slot no worker is inside (one always is: each worker is inside one slot at most). Any other slot
  // no worker is inside drops its stealable job (a late worker kept it; it holds weights).
  Slot& claim_slot() {
    Slot* found = nullptr;
    for (int tries = 0; found == nullptr; ++tries) {
      for (int i = 0; i <= num_workers_; ++i) {
        Slot& s = slots_[i];
        if (s.refs.load() != 0 || (found != nullptr && !s.keeps_job.load())) continue;
        s.job.store(WRITING);  // a worker joining from here on sees it is not its job ...
        if (s.refs.load() != 0) continue;  // ... and one that joined before is seen here
        drop_job(s);
        if (found == nullptr) found = &s;
      }
      if (found == nullptr && tries > 100) sched_yield();
    }
    return *found;
  }

  // Wait for the workers' chunks; steal the stealable ones that take well over the caller's own.
  void finish(Slot& s, bool stealable, int64_t longest, int64_t chunks) {
    const int64_t patience = longest > 0 ? 2 * longest + 5000 : 200000;
    int64_t since = 0;
    for (int spins = 0; s.pending.load(std::memory_order_acquire) != 0; ++spins) {
      if (stealable) {
        const int64_t t = now_ns();
        if (since == 0) since = t;
        if (t - since > patience) {
          for (int64_t i = 0; i < chunks; ++i) {
            uint8_t st = s.state[i].load();
            if ((st == FREE || st == RUNNING) && s.state[i].compare_exchange_strong(st, STOLEN)) {
              const int64_t b = s.begin + i * s.chunk;
              s.call(s.ctx, b, std::min(s.end, b + s.chunk));
              steals_.fetch_add(1, std::memory_order_relaxed);
              s.pending.fetch_sub(1, std::memory_order_acq_rel);
            }
          }
        }
      }
      if (spins < 4096) _mm_pause();
      else sched_yield();
    }
  }

  void work(int w) {
    uint64_t seen = 0;
    int64_t idle_since = now_ns();
    std::vector<float> scratch;
    for (int spins = 0;;) {
      const uint64_t latest = latest_.load();
      const uint64_t job = latest >> 8;
      if (job == seen) {
        if (++spins % 64 == 0 && now_ns() - idle_since > spin_ns_) {
          const uint32_t word = wake_.load();
          sleepers_.fetch_add(1);
          if (latest_.load() >> 8 == seen) futex_wait(word);
          sleepers_.fetch_sub(1);
          idle_since = now_ns();
        } else {
          _mm_pause();
        }
        continue;
      }
      seen = job;
      Slot& s = slots_[latest & 0xff];
      s.refs.fetch_add(1);
      if (s.job.load() == job && w < s.workers) {
        inside_ = true;
        for (int64_t b; (b = s.next.fetch_add(s.chunk, std::memory_order_relaxed)) < s.end;) {
          const int64_t e = std::min(s.end, b + s.chunk);
          if (s.keeps_job.load(std::memory_order_relaxed)) {
            if (!steal_safe_chunk(s, b, e, scratch, test_delay_us_)) continue;
          } else {
            s.call(s.ctx, b, e);
          }
          s.pending.fetch_sub(1, std::memory_order_acq_rel);
        }
        inside_ = false;
        // The last one out of a finished stealable job drops it (it holds weights: an unloaded model's
        // would stay otherwise). Only a worker with an unfinished chunk reads it, and the caller no longer does.
        if (s.keeps_job.load() && s.pending.load() == 0 && s.refs.load() == 1) drop_job(s);
      }
      s.refs.fetch_sub(1);
      idle_since = now_ns();
      spins = 0;
    }
  }

  static void drop_job(Slot& s) {
    if (s.keeps_job.exchange(false)) s.stealable.reset();
  }

  // A worker's stealable chunk: into its own buffer, copied in unless the caller took the chunk over.
  static bool steal_safe_chunk(Slot& s, int64_t b, int64_t e, std::vector<float>& scratch, int64_t delay_us) {
    std::atomic<uint8_t>& state = s.state[(b - s.begin) / s.chunk];
    uint8_t st = FREE;
    if (!state.compare_exchange_strong(st, RUNNING)) return false;
    const std::shared_ptr<const Stealable> job = s.stealable;
    const int64_t cols = 16 * (e - b);
    scratch.resize(job->M * cols);
    job->compute(b, e, scratch.data(), cols, 16 * b);
    if (delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    st = RUNNING;
    if (!state.compare_exchange_strong(st, COMMITTING)) return false;
    for (int64_t r = 0; r < job->M; ++r) std::memcpy(job->Y + r * job->N + 16 * b, scratch.data() + r * cols, cols * sizeof(float));
    state.store(DONE, std::memory_order_release);
    return true;
  }
};

// f(b, e) over [begin, end) in chunks of `chunk` on the pool (above).
template <typename F>
inline void dynamic_for(int64_t begin, int64_t end, int64_t chunk, const F& f) {
  Pool::get().run(begin, end, chunk, f);
}

// at::parallel_for's split (at most one range per thread, each at least `grain`) on the pool.
template <typename F>
inline void pool_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t threads = at::get_num_threads(), n = end - begin;
  dynamic_for(begin, end, std::max<int64_t>(std::max<int64_t>(1, grain), (n + threads - 1) / threads), f);
}

}  // namespace llm_kernels
