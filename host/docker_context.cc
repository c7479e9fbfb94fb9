#include "host/docker_context.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

extern char** environ;

namespace vbridge {
namespace {

// Runs a command with its output discarded; returns its exit status, or -1 if it could not start.
int run_quiet(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return -1;
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

Status ensure_docker_context(const std::string& name, const std::string& socket_path) {
  const std::string endpoint = "host=unix://" + socket_path;
  const int created = run_quiet({"docker", "context", "create", name, "--docker", endpoint});
  if (created == 0) return {};
  if (created < 0) {
    return Error{ErrorCode::kConfig, 0,
                 "docker CLI not found on PATH; use DOCKER_HOST=unix://" + socket_path};
  }
  if (run_quiet({"docker", "context", "update", name, "--docker", endpoint}) == 0) return {};
  return Error{ErrorCode::kConfig, 0,
               fmt::format("docker context {} could not be created or updated; use DOCKER_HOST=unix://{}",
                           name, socket_path)};
}

}  // namespace vbridge
