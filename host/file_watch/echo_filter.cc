#include "host/file_watch/echo_filter.h"

namespace vbridge::file_watch {

Signature Signature::of(const struct stat& st) {
  Signature s;
  s.mode = st.st_mode;
  s.uid = st.st_uid;
  s.gid = st.st_gid;
  s.nlink = st.st_nlink;
  s.size = static_cast<uint64_t>(st.st_size);
#if defined(__APPLE__)
  s.mtime_ns = int64_t{st.st_mtimespec.tv_sec} * 1'000'000'000 + st.st_mtimespec.tv_nsec;
  s.ctime_ns = int64_t{st.st_ctimespec.tv_sec} * 1'000'000'000 + st.st_ctimespec.tv_nsec;
#else
  s.mtime_ns = int64_t{st.st_mtim.tv_sec} * 1'000'000'000 + st.st_mtim.tv_nsec;
  s.ctime_ns = int64_t{st.st_ctim.tv_sec} * 1'000'000'000 + st.st_ctim.tv_nsec;
#endif
  return s;
}

EchoFilter::EchoFilter(EchoFilterOptions options) : options_(options) {}

void EchoFilter::sweep(Clock::time_point now) {
  if (now < next_sweep_) return;
  next_sweep_ = now + options_.ttl / 2;
  std::erase_if(paths_, [now](const auto& kv) { return kv.second.until <= now; });
  std::erase_if(trees_, [now](const auto& kv) { return kv.second <= now; });
}

void EchoFilter::expect(std::string_view path, const Signature& sig, Clock::time_point now) {
  sweep(now);
  ++counters_.expected;
  const Clock::time_point until = now + options_.ttl;
  auto it = paths_.find(std::string(path));
  if (it != paths_.end()) {
    it->second = {sig, until};
    return;
  }
  if (paths_.size() >= options_.max_paths) {
    ++counters_.widened;
    expect_tree(parent_of(path), now);
    return;
  }
  paths_.emplace(std::string(path), PathEntry{sig, until});
}

void EchoFilter::expect_tree(std::string_view dir, Clock::time_point now) {
  sweep(now);
  const Clock::time_point until = now + options_.ttl;
  auto it = trees_.find(std::string(dir));
  if (it != trees_.end()) {
    it->second = until;
    return;
  }
  if (trees_.size() >= options_.max_trees) {
    ++counters_.root_widened;
    root_until_ = until;
    return;
  }
  trees_.emplace(std::string(dir), until);
}

bool EchoFilter::is_echo(std::string_view path, const Signature& sig, Clock::time_point now) {
  sweep(now);
  auto it = paths_.find(std::string(path));
  if (it != paths_.end() && it->second.until > now && it->second.sig.same_content_and_metadata(sig)) {
    ++counters_.suppressed;
    return true;
  }
  // Directory and share-wide expectations know no signature: they take metadata-only changes (and a
  // directory's own attributes, whose times move with its entries).
  if (sig.mtime_ns == sig.ctime_ns && !S_ISDIR(sig.mode)) return false;
  auto alive = [&](std::string_view dir) {
    auto t = trees_.find(std::string(dir));
    return t != trees_.end() && t->second > now;
  };
  // A tree covers the directory itself and its direct entries.
  const bool covered = root_until_ > now || alive(path) || (!path.empty() && alive(parent_of(path)));
  if (covered) ++counters_.suppressed;
  return covered;
}

}  // namespace vbridge::file_watch
