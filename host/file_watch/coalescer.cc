#include "host/file_watch/coalescer.h"

#include <algorithm>
#include <unordered_set>

namespace vbridge::file_watch {

std::string_view parent_of(std::string_view path) {
  const size_t slash = path.rfind('/');
  return slash == std::string_view::npos ? std::string_view() : path.substr(0, slash);
}

Coalescer::Coalescer(CoalescerOptions options) : options_(options), window_(options.window) {}

Coalescer::Entry* Coalescer::find(std::string_view path) {
  auto it = entries_.find(std::string(path));
  return it == entries_.end() ? nullptr : &it->second;
}

void Coalescer::open_window(Clock::time_point now) {
  if (window_end_) return;
  window_end_ = now + window_;
  window_floor_ = clock_floor_;
}

void Coalescer::add_rescan(std::string_view dir, int64_t since_ns) {
  if (entries_.size() == 1 && entries_.begin()->first.empty() && (entries_.begin()->second.flags & kRescan)) {
    // The root is rescanned: it covers everything, from the earliest time asked.
    Entry& root = entries_.begin()->second;
    root.since_ns = std::min(root.since_ns, since_ns);
    return;
  }
  auto it = entries_.find(std::string(dir));
  if (it != entries_.end()) {
    Entry& e = it->second;
    e.since_ns = (e.flags & kRescan) ? std::min(e.since_ns, since_ns) : since_ns;
    e.flags |= kRescan | kExistsNow | kExistedBefore;
    e.is_dir = true;
    e.renamed_from.clear();
    return;
  }
  if (entries_.size() >= options_.max_paths) {
    int64_t earliest = since_ns;
    for (const auto& [path, e] : entries_)
      earliest = std::min(earliest, (e.flags & kRescan) ? e.since_ns : window_floor_);
    entries_.clear();
    ++counters_.root_collapses;
    dir = {};
    since_ns = earliest;
  }
  entries_.emplace(std::string(dir),
                   Entry{kRescan | kExistsNow | kExistedBefore, true, next_order_++, {}, since_ns});
}

void Coalescer::collapse() {
  ++counters_.collapses;
  collapsed_ = true;
  std::vector<std::pair<uint64_t, std::string>> dirs;
  dirs.reserve(entries_.size() + 8);
  for (auto& [path, e] : entries_) {
    if (e.flags & kRescan) {
      dirs.emplace_back(e.order, path);
    } else {
      dirs.emplace_back(e.order, std::string(parent_of(path)));
      if (!e.renamed_from.empty()) dirs.emplace_back(e.order, std::string(parent_of(e.renamed_from)));
    }
  }
  std::sort(dirs.begin(), dirs.end());
  std::unordered_map<std::string, int64_t> rescans_since;  // explicit rescans keep their own floor
  for (auto& [path, e] : entries_) {
    if (e.flags & kRescan) rescans_since.emplace(path, e.since_ns);
  }
  entries_.clear();
  for (auto& [order, dir] : dirs) {
    auto r = rescans_since.find(dir);
    add_rescan(dir, r != rescans_since.end() ? std::min(r->second, window_floor_) : window_floor_);
  }
}

Coalescer::Entry* Coalescer::touch(std::string_view path, uint8_t fresh_flags, bool is_dir,
                                   Clock::time_point now) {
  open_window(now);
  if (collapsed_) {
    add_rescan(parent_of(path), window_floor_);
    return nullptr;
  }
  if (Entry* e = find(path)) {
    ++counters_.merged;
    return e;
  }
  if (entries_.size() >= options_.max_paths) {
    collapse();
    add_rescan(parent_of(path), window_floor_);
    return nullptr;
  }
  auto [it, inserted] = entries_.emplace(std::string(path), Entry{fresh_flags, is_dir, next_order_++, {}});
  return &it->second;
}

void Coalescer::on_created(std::string_view path, bool is_dir, Clock::time_point now) {
  const bool fresh = find(path) == nullptr;
  Entry* e = touch(path, kExistsNow, is_dir, now);
  if (e == nullptr || fresh) return;
  if (!(e->flags & kExistsNow)) {
    // Deleted earlier in this window and back now: a new inode under an old name.
    e->flags |= kExistsNow | kReplaced;
    e->renamed_from.clear();
  }
  e->is_dir = is_dir;
}

void Coalescer::on_deleted(std::string_view path, bool is_dir, Clock::time_point now) {
  const bool fresh = find(path) == nullptr;
  Entry* e = touch(path, kExistedBefore, is_dir, now);
  if (e == nullptr || fresh) return;
  if (!(e->flags & kExistedBefore)) {
    ++counters_.cancelled;
    entries_.erase(std::string(path));
    return;
  }
  e->flags &= static_cast<uint8_t>(~(kExistsNow | kModified | kAttrib | kReplaced));
  e->renamed_from.clear();
  e->is_dir = is_dir;
}

void Coalescer::created(std::string_view path, bool is_dir, Clock::time_point now) {
  ++counters_.events_in;
  on_created(path, is_dir, now);
}

void Coalescer::modified(std::string_view path, Clock::time_point now) {
  ++counters_.events_in;
  if (Entry* e = touch(path, kExistedBefore | kExistsNow, false, now)) e->flags |= kModified;
}

void Coalescer::attrib(std::string_view path, bool is_dir, Clock::time_point now) {
  ++counters_.events_in;
  if (Entry* e = touch(path, kExistedBefore | kExistsNow, is_dir, now)) e->flags |= kAttrib;
}

void Coalescer::deleted(std::string_view path, bool is_dir, Clock::time_point now) {
  ++counters_.events_in;
  on_deleted(path, is_dir, now);
}

void Coalescer::renamed(std::string_view from, std::string_view to, bool is_dir, Clock::time_point now) {
  ++counters_.events_in;
  Entry* src = collapsed_ ? nullptr : find(from);
  if (src != nullptr && !(src->flags & kExistedBefore)) {
    // Created in this window and renamed away (an editor's temp file): the target is simply new.
    ++counters_.cancelled;
    entries_.erase(std::string(from));
    on_created(to, is_dir, now);
    return;
  }
  std::string origin = (src != nullptr && !src->renamed_from.empty()) ? src->renamed_from : std::string(from);
  on_deleted(from, is_dir, now);
  const bool fresh = find(to) == nullptr;
  Entry* dst = touch(to, kExistedBefore | kExistsNow, is_dir, now);
  if (dst == nullptr) return;
  if (!fresh) dst->flags |= kExistsNow | kReplaced;
  dst->renamed_from = std::move(origin);
  dst->is_dir = is_dir;
}

void Coalescer::rescan(std::string_view dir, Clock::time_point now, int64_t since_ns) {
  ++counters_.events_in;
  open_window(now);
  if (!collapsed_ && find(dir) == nullptr && entries_.size() >= options_.max_paths) collapse();
  add_rescan(dir, since_ns);
}

std::optional<Clock::time_point> Coalescer::deadline() const {
  if (entries_.empty()) return std::nullopt;
  return window_end_;
}

std::vector<FileChange> Coalescer::take(Clock::time_point now, bool force) {
  std::vector<FileChange> out;
  if (entries_.empty()) {
    window_end_.reset();
    collapsed_ = false;
    return out;
  }
  if (!force && window_end_ && now < *window_end_) return out;

  std::vector<std::pair<uint64_t, const std::string*>> order;
  order.reserve(entries_.size());
  for (const auto& [path, e] : entries_) order.emplace_back(e.order, &path);
  std::sort(order.begin(), order.end());

  // Sources of renames that are reported as a Rename by their target do not get a Delete of their own.
  std::unordered_set<std::string_view> consumed;
  for (const auto& [path, e] : entries_) {
    if (!(e.flags & kExistsNow) || e.renamed_from.empty() || (e.flags & kRescan)) continue;
    auto src = entries_.find(e.renamed_from);
    if (src != entries_.end() && !(src->second.flags & kExistsNow)) consumed.insert(e.renamed_from);
  }

  out.reserve(entries_.size());
  for (const auto& [ord, path_ptr] : order) {
    const std::string& path = *path_ptr;
    const Entry& e = entries_.at(path);
    FileChange c{wire::FileEventKind::Modify, path, {}, e.is_dir, false};
    if (e.flags & kRescan) {
      c.is_dir = true;
      c.rescan = true;
      c.since_ns = e.since_ns;
    } else if (!(e.flags & kExistsNow)) {
      if (!(e.flags & kExistedBefore) || consumed.count(path) != 0) continue;
      c.kind = wire::FileEventKind::Delete;
    } else if (!e.renamed_from.empty() && consumed.count(e.renamed_from) != 0) {
      c.kind = wire::FileEventKind::Rename;
      c.old_path = e.renamed_from;
    } else if (!(e.flags & kExistedBefore) || !e.renamed_from.empty() || (e.flags & kReplaced)) {
      c.kind = wire::FileEventKind::Create;
    } else if (e.flags & kModified) {
      c.kind = wire::FileEventKind::Modify;
    } else if (e.flags & kAttrib) {
      c.kind = wire::FileEventKind::Attrib;
    }
    out.push_back(std::move(c));
  }

  if (out.size() >= options_.busy_changes) {
    window_ = std::min(window_ * 2, options_.max_window);
  } else if (out.size() < options_.busy_changes / 4) {
    window_ = std::max(window_ / 2, options_.window);
  }
  counters_.changes_out += out.size();
  entries_.clear();
  window_end_.reset();
  collapsed_ = false;
  return out;
}

std::vector<flatbuffers::FlatBufferBuilder> encode_batches(std::string_view share,
                                                           const std::vector<FileChange>& changes,
                                                           uint64_t* seq, const BatchLimits& limits) {
  std::vector<flatbuffers::FlatBufferBuilder> batches;
  size_t i = 0;
  while (i < changes.size()) {
    flatbuffers::FlatBufferBuilder b(std::min<size_t>(limits.max_bytes, 16 * 1024));
    const auto share_str = b.CreateString(share.data(), share.size());
    std::vector<flatbuffers::Offset<wire::FileEvent>> events;
    size_t bytes = 64 + share.size();
    while (i < changes.size() && events.size() < limits.max_events) {
      const FileChange& c = changes[i];
      // Strings, a table and a vector slot: a little over the path lengths.
      const size_t cost = c.path.size() + c.old_path.size() + 48;
      if (!events.empty() && bytes + cost > limits.max_bytes) break;
      bytes += cost;
      const auto path = b.CreateString(c.path);
      const auto old_path =
          c.old_path.empty() ? flatbuffers::Offset<flatbuffers::String>() : b.CreateString(c.old_path);
      events.push_back(wire::CreateFileEvent(b, c.kind, path, old_path, c.is_dir, c.rescan, c.since_ns));
      ++i;
    }
    const auto vec = b.CreateVector(events);
    const auto fe = wire::CreateFileEvents(b, share_str, vec, ++*seq);
    b.Finish(wire::CreateControl(b, wire::Message::FileEvents, fe.Union()));
    batches.push_back(std::move(b));
  }
  return batches;
}

}  // namespace vbridge::file_watch
