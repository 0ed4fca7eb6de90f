// A small fork-join thread pool for the decode kernels: spin briefly, then sleep.
//
// Why not at::parallel_for (OpenMP): a decode step runs hundreds of short parallel regions (one per
// projection, ~10-100 us each). GOMP's default policy spins idle threads for a long time, so on a quiet
// machine its fork/join is cheap, but when another process holds one of the two cores the spinning master
// burns its timeslice waiting for a descheduled worker and every region stalls for a scheduler tick
// (docs/results/ffn.md measured 31 ms for a 1.6 ms op). OMP_WAIT_POLICY=passive fixes that stall but makes
// every region pay a futex wake-up. This pool spins for SPARSEDGE_SPIN_US microseconds (default 100),
// long enough to catch the next region of the same decode step, then sleeps on a futex (C++20
// atomic wait) and yields the core - what llama.cpp's thread pool does.
//
// Use: sparsedge::cpu::parallel_for(n, grain, [&](int64_t begin, int64_t end) { ... });
// The thread count follows at::get_num_threads() (torch.set_num_threads). The calling thread does the first
// chunk itself. Not re-entrant: calls from inside a job run inline.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEDGE_PAUSE() _mm_pause()
#else
#define SPARSEDGE_PAUSE() std::this_thread::yield()
#endif

namespace sparsedge::cpu {

class __attribute__((visibility("hidden"))) ThreadPool {
 public:
  using Fn = void (*)(void* ctx, int64_t begin, int64_t end);

  static ThreadPool& get() {
    static ThreadPool pool;
    return pool;
  }

  // Split [0, n) into one contiguous chunk per thread (multiples of `grain`) and run fn on each. Chunks are
  // claimed, not assigned: whichever thread is running takes the next unclaimed chunk, so when another process
  // holds a core and a worker has not been scheduled yet, the caller runs that worker's chunk itself instead of
  // waiting a scheduler tick for it. The chunk boundaries do not depend on who runs them, so results are the same.
  void run(int64_t n, int64_t grain, Fn fn, void* ctx) {
    const int want = std::max(1, at::get_num_threads());
    grain = std::max<int64_t>(grain, 1);
    const int64_t chunks = (n + grain - 1) / grain;
    const int nt = static_cast<int>(std::min<int64_t>(want, chunks));
    if (nt <= 1 || in_job_) {
      if (n > 0) fn(ctx, 0, n);
      return;
    }
    std::lock_guard<std::mutex> lock(run_mutex_);  // one job at a time (callers from several threads queue)
    ensure_workers(nt - 1);
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    grain_ = grain;
    active_ = nt;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = generation_.load(std::memory_order_relaxed) + 1;
    claim_.store(gen << kClaimBits, std::memory_order_release);  // chunk 0 of job `gen` is next
    generation_.store(gen, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) generation_.notify_all();
    in_job_ = true;
    std::exception_ptr err;
    try {
      run_claimed(gen);
    } catch (...) {
      err = std::current_exception();
    }
    in_job_ = false;
    // always wait for every claimed chunk before returning or rethrowing: the next job must not start while one
    // runs (a worker that claims nothing never touches this job's fn_ / ctx_)
    wait_until([&] { return done_.load(std::memory_order_acquire) == nt; }, done_, master_sleeping_);
    if (!err) err = worker_error_;
    worker_error_ = nullptr;
    if (err) std::rethrow_exception(err);
  }

 private:
  ThreadPool() {
    const char* s = std::getenv("SPARSEDGE_SPIN_US");
    spin_ns_ = (s ? std::atoll(s) : 100) * 1000;
  }

  ~ThreadPool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run_chunk(int tid) {
    const int64_t chunks = (n_ + grain_ - 1) / grain_;
    const int64_t per = (chunks + active_ - 1) / active_;
    const int64_t b = std::min<int64_t>(n_, tid * per * grain_), e = std::min<int64_t>(n_, (tid + 1) * per * grain_);
    if (b < e) fn_(ctx_, b, e);
  }

  // Claim and run chunks of job `gen` until none is left. claim_ holds (job << kClaimBits) | next chunk; a thread
  // that woke for an older job fails the job check and claims nothing. A caller that threw still counts its chunk
  // as done (the error is rethrown after the join).
  void run_claimed(uint64_t gen) {
    uint64_t w = claim_.load(std::memory_order_acquire);
    while ((w >> kClaimBits) == gen && static_cast<int>(w & kClaimMask) < active_) {
      if (!claim_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int chunk = static_cast<int>(w & kClaimMask);
      struct Done {  // counted even when fn throws, so the caller's join never hangs
        ThreadPool* p;
        ~Done() {
          if (p->done_.fetch_add(1, std::memory_order_seq_cst) + 1 == p->active_ &&
              p->master_sleeping_.load(std::memory_order_seq_cst))
            p->done_.notify_one();
        }
      } done{this};
      run_chunk(chunk);
      w = claim_.load(std::memory_order_acquire);
    }
  }

  template <class Ready, class Atomic>
  void wait_until(Ready ready, Atomic& word, std::atomic<int>& sleeping) {
    auto t0 = std::chrono::steady_clock::now();
    while (!ready()) {
      for (int i = 0; i < 64; ++i) SPARSEDGE_PAUSE();
      if (std::chrono::steady_clock::now() - t0 > std::chrono::nanoseconds(spin_ns_)) {
        sleeping.store(1, std::memory_order_seq_cst);
        auto v = word.load(std::memory_order_acquire);
        if (!ready()) word.wait(v, std::memory_order_acquire);
        sleeping.store(0, std::memory_order_relaxed);
      }
    }
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      const int tid = static_cast<int>(workers_.size()) + 1;
      // the generation a new worker has "seen" is the one before the job about to be posted: read here, by
      // the master, not when the thread happens to start (it could start after the post and miss the job)
      const uint64_t seen = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, tid, seen] { worker(tid, seen); });
    }
  }

  void worker(int /*tid*/, uint64_t seen) {
    while (true) {
      auto t0 = std::chrono::steady_clock::now();
      uint64_t g;
      while ((g = generation_.load(std::memory_order_acquire)) == seen) {
        for (int i = 0; i < 64; ++i) SPARSEDGE_PAUSE();
        if (std::chrono::steady_clock::now() - t0 > std::chrono::nanoseconds(spin_ns_)) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          if (generation_.load(std::memory_order_acquire) == seen) generation_.wait(seen, std::memory_order_acquire);
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      seen = g;
      if (stop_.load()) return;
      in_job_ = true;
      try {
        run_claimed(g);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!worker_error_) worker_error_ = std::current_exception();
      }
      in_job_ = false;
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::mutex error_mutex_;
  std::exception_ptr worker_error_;
  std::atomic<uint64_t> generation_{0};
  static constexpr int kClaimBits = 16;
  static constexpr uint64_t kClaimMask = (uint64_t{1} << kClaimBits) - 1;
  std::atomic<uint64_t> claim_{0};
  std::atomic<int> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> master_sleeping_{0};
  std::atomic<bool> stop_{false};
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  int active_ = 1;
  int64_t spin_ns_;
  static inline thread_local bool in_job_ = false;
};

// parallel_for over [0, n) with chunks of at least `grain` items, on the pool.
template <class F>
inline void parallel_for(int64_t n, int64_t grain, const F& f) {
  ThreadPool::get().run(
      n, grain, [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace sparsedge::cpu
