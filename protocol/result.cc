#include "protocol/result.h"

#include <cstring>

namespace vbridge {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kProtocol: return "protocol error";
    case ErrorCode::kVersion: return "version mismatch";
    case ErrorCode::kFlowControl: return "flow-control violation";
    case ErrorCode::kLimit: return "limit reached";
    case ErrorCode::kRefused: return "refused";
    case ErrorCode::kReset: return "reset";
    case ErrorCode::kIo: return "I/O error";
    case ErrorCode::kGoingAway: return "going away";
    case ErrorCode::kConfig: return "configuration error";
    case ErrorCode::kAuth: return "authentication failed";
  }
  return "unknown error";
}

std::string Error::to_string() const {
  std::string out = error_code_name(code);
  if (!message.empty()) {
    out += ": ";
    out += message;
  }
  if (errno_value != 0) {
    out += " (";
    out += std::strerror(errno_value);
    out += ")";
  }
  return out;
}

}  // namespace vbridge
