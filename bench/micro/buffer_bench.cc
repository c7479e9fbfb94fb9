// Buffer pool and Slice costs, and a memcpy of 64 KiB: what one socket read or write of a bulk frame costs,
// the yardstick for the core's own per-frame cost.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>

#include "protocol/buffer.h"

namespace vbridge {
namespace {

void BM_BufferPoolAcquireRelease(benchmark::State& state) {
  BufferPool pool(256 * 1024, 64);
  { Slice warm = pool.acquire(); }
  for (auto _ : state) {
    Slice s = pool.acquire();
    benchmark::DoNotOptimize(s.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_BufferPoolAcquireRelease);

void BM_SliceCopy(benchmark::State& state) {
  BufferPool pool(4096, 1);
  const Slice s = pool.acquire();
  for (auto _ : state) {
    Slice copy = s;
    benchmark::DoNotOptimize(copy.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SliceCopy);

void BM_SliceSub(benchmark::State& state) {
  BufferPool pool(4096, 1);
  const Slice s = pool.acquire();
  size_t off = 0;
  for (auto _ : state) {
    Slice sub = s.sub(off, 64);
    benchmark::DoNotOptimize(sub.data());
    off = (off + 64) & 2047;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SliceSub);

// Page-aligned blocks, freed on scope exit.
struct Pages {
  explicit Pages(size_t n) : p(static_cast<std::byte*>(std::aligned_alloc(4096, n))) { std::memset(p, 1, n); }
  ~Pages() { std::free(p); }
  std::byte* p;
};

// One copy of a bulk frame's payload, as a socket read or write does it. Args: bytes, and how far the
// destination sits past the source's offset within a page. Some CPUs (the AMD EPYC these figures come from)
// copy an order of magnitude slower when that distance is a few bytes, e.g. the 12 of a frame header.
void BM_Memcpy(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const size_t distance = static_cast<size_t>(state.range(1));
  Pages src(n), dst(n + 4096);
  for (auto _ : state) {
    std::memcpy(dst.p + distance, src.p, n);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_Memcpy)->Args({64 << 10, 0})->Args({256 << 10, 0})->Args({64 << 10, 12});

}  // namespace
}  // namespace vbridge
