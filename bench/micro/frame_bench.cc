// Frame header codec: the fixed 12-byte header every frame carries.
#include <benchmark/benchmark.h>

#include <array>

#include "protocol/frame.h"

namespace vbridge {
namespace {

void BM_FrameHeaderEncode(benchmark::State& state) {
  HeaderBytes out{};
  FrameHeader h{65536, 1, FrameType::kData, 0};
  for (auto _ : state) {
    encode_header(h, out.data());
    benchmark::DoNotOptimize(out);
    h.stream_id += 2;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_FrameHeaderEncode);

void BM_FrameHeaderDecode(benchmark::State& state) {
  std::array<HeaderBytes, 16> in{};
  for (size_t i = 0; i < in.size(); ++i) {
    encode_header(
        FrameHeader{static_cast<uint32_t>(64 * i), static_cast<StreamId>(2 * i + 1), FrameType::kData, 0},
        in[i].data());
  }
  size_t i = 0;
  for (auto _ : state) {
    auto h = decode_header(in[i++ & 15].data());
    benchmark::DoNotOptimize(h);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_FrameHeaderDecode);

}  // namespace
}  // namespace vbridge
