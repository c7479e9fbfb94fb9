#include "protocol/log.h"

#include <cstdio>
#include <ctime>
#include <string>

namespace vbridge::log {
namespace {
Level g_level = Level::kInfo;
std::string g_component = "vbridge";

const char* level_name(Level l) {
  switch (l) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarn: return "warn";
    case Level::kError: return "error";
  }
  return "?";
}
}  // namespace

void set_level(Level l) { g_level = l; }
Level level() { return g_level; }
void set_component(std::string_view name) { g_component = name; }

bool parse_level(std::string_view text, Level* out) {
  for (Level l : {Level::kDebug, Level::kInfo, Level::kWarn, Level::kError}) {
    if (text == level_name(l)) {
      *out = l;
      return true;
    }
  }
  return false;
}

void write(Level l, uint32_t stream, std::string_view message) {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  tm parts{};
  gmtime_r(&ts.tv_sec, &parts);
  std::string line = fmt::format("{:02}:{:02}:{:02}.{:03} {:<5} {}", parts.tm_hour, parts.tm_min,
                                 parts.tm_sec, ts.tv_nsec / 1000000, level_name(l), g_component);
  if (stream != 0) line += fmt::format(" [stream {}]", stream);
  line += ' ';
  line += message;
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace vbridge::log
