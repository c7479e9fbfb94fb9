// Structured one-line logs: `<time> <level> <component> [stream N] message key=value…`. Formatting only;
// the sink is stderr unless a program sets another.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <string_view>

namespace vbridge::log {

enum class Level : uint8_t { kDebug, kInfo, kWarn, kError };

void set_level(Level level);
Level level();
// Parses "debug", "info", "warn", "error"; false if unknown.
bool parse_level(std::string_view text, Level* out);
void set_component(std::string_view name);
void write(Level level, uint32_t stream, std::string_view message);

template <typename... Args>
void at(Level lvl, uint32_t stream, fmt::format_string<Args...> format, Args&&... args) {
  if (lvl < level()) return;
  write(lvl, stream, fmt::format(format, std::forward<Args>(args)...));
}

template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... a) {
  at(Level::kDebug, 0, f, std::forward<Args>(a)...);
}
template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... a) {
  at(Level::kInfo, 0, f, std::forward<Args>(a)...);
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... a) {
  at(Level::kWarn, 0, f, std::forward<Args>(a)...);
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... a) {
  at(Level::kError, 0, f, std::forward<Args>(a)...);
}

}  // namespace vbridge::log
