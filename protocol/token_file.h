// The shared secret of unix and TCP transports (--token-file on both agents and vbridge-hostile).
//
// The file holds at least 16 bytes (random bytes, or their hex), surrounding whitespace ignored; it must be
// a regular file that neither its group nor others may read, since anyone who has the token can take over
// the bridge. Generate one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > F && chmod 600 F`.
#pragma once

#include <string>

#include "protocol/result.h"

namespace vbridge {

Result<std::string> read_token_file(const std::string& path);

}  // namespace vbridge
