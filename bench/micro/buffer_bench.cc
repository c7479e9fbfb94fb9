// Buffer pool and Slice costs, and a memcpy of 64 KiB: what one socket read or write of a bulk frame costs,
// the yardstick for the core's own per-frame cost.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

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

// One copy of a bulk frame's payload, as a socket read or write does it.
void BM_Memcpy(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<std::byte> src(n, std::byte{1}), dst(n);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), n);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_Memcpy)->Arg(64 << 10)->Arg(256 << 10);

}  // namespace
}  // namespace vbridge
