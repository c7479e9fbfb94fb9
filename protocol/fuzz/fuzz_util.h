// Shared pieces of the protocol fuzz targets: a front-to-back reader over the fuzz input, a small
// deterministic PRNG, guarded Slices, and a walk over every field of a CONTROL message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "protocol/buffer.h"
#include "protocol/control_generated.h"

// A failed invariant: prints where and aborts, which libFuzzer reports as a crash.
#define FUZZ_CHECK(...)                                                                        \
  do {                                                                                         \
    if (!(__VA_ARGS__)) {                                                                      \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #__VA_ARGS__); \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)

namespace vbridge::fuzz {

// Reads the input front to back. Past the end every read yields zeros, so any input is a complete script.
class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  size_t remaining() const { return size_ - pos_; }
  uint8_t u8() { return pos_ < size_ ? data_[pos_++] : 0; }
  uint16_t u16() {
    const uint16_t lo = u8();
    return static_cast<uint16_t>(lo | (u8() << 8));
  }
  uint32_t u32() {
    const uint32_t lo = u16();
    return lo | (uint32_t(u16()) << 16);
  }
  // Up to n bytes, fewer at the end of the input.
  std::span<const std::byte> bytes(size_t n);
  std::span<const std::byte> rest() { return bytes(remaining()); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// xorshift64*: the harness's own decisions, reproducible from a seed taken from the input.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return state_ * 0x2545F4914F6CDD1Dull;
  }
  // Uniform-ish in [0, n); n > 0.
  uint64_t below(uint64_t n) { return next() % n; }
  bool percent(unsigned p) { return below(100) < p; }

 private:
  uint64_t state_;
};

// Slices for Mux::feed: the bytes sit at the end of a pool buffer and the bytes before them are poisoned, so
// a read outside the Slice lands in poisoned memory or in the heap redzone. Buffers come from the smallest
// of three pools that fits, which keeps the cost of poisoning proportional to the bytes fed.
class GuardedFeed {
 public:
  static constexpr size_t kMax = 256 * 1024;
  // bytes.size() <= kMax.
  Slice slice(std::span<const std::byte> bytes);

 private:
  BufferPool small_{4 * 1024, 64};
  BufferPool medium_{64 * 1024, 16};
  BufferPool large_{kMax, 8};
};

// Reads every field of a CONTROL message the way an agent would; returns a digest so nothing is optimised
// away. The message must have passed the FlatBuffers verifier.
uint64_t walk_control(const wire::Control& control);

}  // namespace vbridge::fuzz
