// The stream multiplexer's own cost per frame: send, schedule, gather, decode, deliver, return credit.
#include <benchmark/benchmark.h>
#include <sys/uio.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "bench/micro/bench_link.h"

namespace vbridge::bench {
namespace {

// Hands everything `mux` has to send to a transport that takes it all, without touching the bytes.
void discard_output(Mux& mux) {
  iovec iov[256];
  while (size_t n = mux.prepare_output(iov)) {
    size_t total = 0;
    for (size_t i = 0; i < n; ++i) total += iov[i].iov_len;
    mux.consume_output(total);
  }
}

// A per-frame time next to the per-iteration one, for benchmarks that move several frames per iteration.
void per_frame(benchmark::State& state, double frames_per_iteration) {
  state.counters["per_frame"] = benchmark::Counter(
      frames_per_iteration, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// One small frame all the way: send -> prepare_output -> copy into the receiver's buffer -> feed -> on_data
// -> consume -> consume_output, one transport write per frame. Credit flows back every 1024 frames.
void BM_MuxRoundTripSmall(benchmark::State& state) {
  const size_t size = static_cast<size_t>(state.range(0));
  Link link;
  const Slice payload = link.pool.acquire().sub(0, size);
  uint64_t n = 0;
  for (auto _ : state) {
    if (!link.sender.send(link.stream, payload)) std::abort();
    link.move_once(link.sender, link.receiver);
    if ((++n & 1023) == 0) link.move(link.receiver, link.sender);
  }
  if (link.receiver_handler.bytes != n * size) std::abort();
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * size));
}
BENCHMARK(BM_MuxRoundTripSmall)->Arg(64);

MuxConfig bulk_config(size_t frame) {
  MuxConfig config;
  config.quantum = static_cast<uint32_t>(frame);  // one frame per send, not split in 64 KiB quanta
  return config;
}

// Bulk frames the same way, including the one memcpy a socket would do on the way.
void BM_MuxRoundTripCopy(benchmark::State& state) {
  const size_t size = static_cast<size_t>(state.range(0));
  Link link(bulk_config(size), size + kFrameHeaderSize);
  const Slice payload = link.pool.acquire().sub(0, size);
  for (auto _ : state) {
    if (!link.sender.send(link.stream, payload)) std::abort();
    link.move(link.sender, link.receiver);
    link.move(link.receiver, link.sender);
  }
  if (link.receiver_handler.bytes != state.iterations() * size) std::abort();
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * size));
  per_frame(state, 1);
}
BENCHMARK(BM_MuxRoundTripCopy)->Arg(64 << 10)->Arg(256 << 10);

// Bulk frames without the copy: the sender's gather list goes unread, and the receiver is fed a buffer
// holding the same frames, encoded once. What is left is the core's own cost.
void BM_MuxBulk(benchmark::State& state) {
  const size_t size = static_cast<size_t>(state.range(0));
  const size_t frames = std::max<size_t>(1, (1 << 20) / size);  // about 1 MiB per iteration
  Link link(bulk_config(size), frames * (kFrameHeaderSize + size));
  const Slice payload = link.pool.acquire().sub(0, size);
  for (size_t k = 0; k < frames; ++k) {
    std::byte* frame = link.rx.data() + k * (kFrameHeaderSize + size);
    encode_header(FrameHeader{static_cast<uint32_t>(size), link.stream, FrameType::kData, 0}, frame);
    std::memset(frame + kFrameHeaderSize, 'x', size);
  }
  for (auto _ : state) {
    for (size_t k = 0; k < frames; ++k) {
      if (!link.sender.send(link.stream, payload)) std::abort();
    }
    discard_output(link.sender);
    if (!link.receiver.feed(link.rx)) std::abort();
    link.move(link.receiver, link.sender);  // WINDOW_UPDATE
  }
  if (link.receiver_handler.bytes != state.iterations() * frames * size) std::abort();
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * frames * size));
  per_frame(state, static_cast<double>(frames));
}
BENCHMARK(BM_MuxBulk)->Arg(64 << 10)->Arg(256 << 10);

// The scheduler with N streams ready at once: each sends one small frame per iteration, and one
// prepare_output/consume_output round serves them all. Credit is topped up by WINDOW_UPDATE frames fed
// directly to the sender.
void BM_MuxSchedule(benchmark::State& state) {
  const size_t streams = static_cast<size_t>(state.range(0));
  constexpr size_t kSize = 64;
  constexpr uint32_t kRefillEvery = 4096;  // iterations
  Link link;
  std::vector<StreamId> ids{link.stream};
  while (ids.size() < streams) ids.push_back(link.open());
  // WINDOW_UPDATE for every stream, returning what kRefillEvery iterations use.
  BufferPool wu_pool(streams * 16, 1);
  Slice wu = wu_pool.acquire();
  for (size_t k = 0; k < streams; ++k) {
    std::byte* f = wu.data() + k * 16;
    encode_header(FrameHeader{4, ids[k], FrameType::kWindowUpdate, 0}, f);
    store_u32(f + kFrameHeaderSize, kRefillEvery * kSize);
  }
  const Slice payload = link.pool.acquire().sub(0, kSize);
  uint64_t n = 0;
  for (auto _ : state) {
    for (const StreamId id : ids) {
      if (!link.sender.send(id, payload)) std::abort();
    }
    discard_output(link.sender);
    if (++n % kRefillEvery == 0 && !link.sender.feed(wu.sub(0, streams * 16))) std::abort();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * streams));
  per_frame(state, static_cast<double>(streams));
}
BENCHMARK(BM_MuxSchedule)->Arg(1)->Arg(16)->Arg(1000);

// Decoding and delivery alone: a buffer of small DATA frames, encoded once, fed again and again.
void BM_MuxFeedSmall(benchmark::State& state) {
  constexpr size_t kSize = 64, kFrames = 1024;
  Link link(MuxConfig{}, kFrames * (kFrameHeaderSize + kSize));
  for (size_t k = 0; k < kFrames; ++k) {
    std::byte* frame = link.rx.data() + k * (kFrameHeaderSize + kSize);
    encode_header(FrameHeader{kSize, link.stream, FrameType::kData, 0}, frame);
    std::memset(frame + kFrameHeaderSize, 'x', kSize);
  }
  for (auto _ : state) {
    if (!link.receiver.feed(link.rx)) std::abort();
    discard_output(link.receiver);  // WINDOW_UPDATE; the sender's credit is not needed here
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kFrames));
  per_frame(state, kFrames);
}
BENCHMARK(BM_MuxFeedSmall);

}  // namespace
}  // namespace vbridge::bench
