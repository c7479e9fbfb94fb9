// Registers the bridged socket as a docker CLI context, so `docker --context NAME …` works without env.
#pragma once

#include <string>

#include "protocol/result.h"

namespace vbridge {

// Creates or updates context `name` pointing at unix://socket_path with the docker CLI on PATH.
Status ensure_docker_context(const std::string& name, const std::string& socket_path);

}  // namespace vbridge
