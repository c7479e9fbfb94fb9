#include "protocol/token_file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "protocol/frame.h"

namespace vbridge {

Result<std::string> read_token_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    return Error{ErrorCode::kConfig, errno, fmt::format("--token-file {}: {}", path, std::strerror(errno))};
  }
  struct stat st {};
  std::string text;
  Error failure{ErrorCode::kConfig, 0, {}};
  if (::fstat(fd, &st) != 0) {
    failure.errno_value = errno;
    failure.message = fmt::format("--token-file {}: fstat: {}", path, std::strerror(errno));
  } else if (!S_ISREG(st.st_mode)) {
    failure.message = fmt::format("--token-file {} is not a regular file", path);
  } else if ((st.st_mode & 077) != 0) {
    failure.message =
        fmt::format("--token-file {} may be read by group or others (mode {:04o}); run chmod 600 {}", path,
                    st.st_mode & 07777, path);
  } else {
    char buf[1024];
    ssize_t n = 0;
    while ((n = ::read(fd, buf, sizeof buf)) > 0 && text.size() < 4096)
      text.append(buf, static_cast<size_t>(n));
    if (n < 0) {
      failure.errno_value = errno;
      failure.message = fmt::format("--token-file {}: read: {}", path, std::strerror(errno));
    }
  }
  ::close(fd);
  if (!failure.message.empty()) return failure;
  const auto first = text.find_first_not_of(" \t\r\n");
  const auto last = text.find_last_not_of(" \t\r\n");
  text = first == std::string::npos ? std::string() : text.substr(first, last - first + 1);
  if (text.size() < kMinTokenSize || text.size() > kMaxTokenSize) {
    return Error{
        ErrorCode::kConfig, 0,
        fmt::format("--token-file {} holds {} bytes; a token is {} to {} bytes (e.g. 64 hex digits: head -c "
                    "32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {})",
                    path, text.size(), kMinTokenSize, kMaxTokenSize, path)};
  }
  return text;
}

}  // namespace vbridge
