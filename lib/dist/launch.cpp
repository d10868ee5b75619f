// `llmtune launch`: starts this node's workers with torchrun's environment, relays their output
// line by line with a "[rank R]" prefix (and to per-rank log files on request), forwards SIGINT /
// SIGTERM / SIGHUP / SIGUSR1 / SIGUSR2, and when a worker fails stops the rest (SIGTERM, then
// SIGKILL after a grace period) and reports the failed rank's last lines. Linux/POSIX only.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>

#include "core/core.h"
#include "dist/dist.h"

namespace llmtune::dist {
namespace {

std::atomic<int> g_pending_signal{0};
int g_wake_pipe[2] = {-1, -1};

extern "C" void on_launcher_signal(int sig) {
  g_pending_signal.store(sig);
  if (g_wake_pipe[1] >= 0) {
    const char c = 1;
    [[maybe_unused]] auto n = ::write(g_wake_pipe[1], &c, 1);
  }
}

struct Worker {
  int rank = 0, local_rank = 0;
  pid_t pid = -1;
  int fd[2] = {-1, -1};          // stdout, stderr read ends
  std::string partial[2];        // unterminated line per stream
  std::deque<std::string> tail;  // last lines (both streams)
  std::unique_ptr<std::ofstream> log;
  bool exited = false;
  int status = 0;
};

void emit(Worker& w, int stream, const std::string& line, size_t tail_lines) {
  std::string text = fmt::format("[rank {}] {}\n", w.rank, line);
  std::FILE* f = stream == 0 ? stdout : stderr;
  std::fwrite(text.data(), 1, text.size(), f);
  std::fflush(f);
  if (w.log) {
    *w.log << line << '\n';
    w.log->flush();
  }
  w.tail.push_back(line);
  while (w.tail.size() > tail_lines) w.tail.pop_front();
}

// Reads what is available on stream `s` of `w`; returns false at EOF.
bool pump(Worker& w, int s, size_t tail_lines) {
  char buf[8192];
  ssize_t n = ::read(w.fd[s], buf, sizeof buf);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
  if (n <= 0) {
    if (!w.partial[s].empty()) emit(w, s, w.partial[s], tail_lines);
    w.partial[s].clear();
    ::close(w.fd[s]);
    w.fd[s] = -1;
    return false;
  }
  w.partial[s].append(buf, static_cast<size_t>(n));
  size_t start = 0, nl;
  while ((nl = w.partial[s].find('\n', start)) != std::string::npos) {
    std::string line = w.partial[s].substr(start, nl - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    emit(w, s, line, tail_lines);
    start = nl + 1;
  }
  w.partial[s].erase(0, start);
  return true;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const char* name = strsignal(WTERMSIG(status));
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status), name ? name : "?");
  }
  return "stopped";
}

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

void signal_all(std::vector<Worker>& ws, int sig) {
  for (auto& w : ws)
    if (!w.exited && w.pid > 0) ::kill(-w.pid, sig);  // the worker's own process group
}

}  // namespace

int launch(const LaunchOptions& o) {
  if (o.nproc_per_node < 1) fail("--nproc-per-node must be >= 1 (got {})", o.nproc_per_node);
  if (o.nnodes < 1) fail("--nnodes must be >= 1 (got {})", o.nnodes);
  if (o.node_rank < 0 || o.node_rank >= o.nnodes)
    fail("--node-rank {} is outside 0..{} (--nnodes {})", o.node_rank, o.nnodes - 1, o.nnodes);
  if (o.master_port < 1 || o.master_port > 65535) fail("--master-port {} is not a TCP port", o.master_port);
  if (o.command.empty())
    fail("no command to run; usage: llmtune launch --nproc-per-node N -- sft recipe.yaml");
  const std::string exe = o.executable.empty() ? fs::read_symlink("/proc/self/exe").string() : o.executable;
  const int world = o.nproc_per_node * o.nnodes;
  if (!o.log_dir.empty()) fs::create_directories(o.log_dir);

  if (::pipe(g_wake_pipe) != 0) fail("launch: cannot create a pipe: {}", std::strerror(errno));
  ::fcntl(g_wake_pipe[0], F_SETFL, O_NONBLOCK);
  ::fcntl(g_wake_pipe[1], F_SETFL, O_NONBLOCK);
  const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2};
  struct sigaction sa {}, old[5];
  sa.sa_handler = on_launcher_signal;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 5; ++i) ::sigaction(forwarded[i], &sa, &old[i]);

  std::vector<Worker> ws(static_cast<size_t>(o.nproc_per_node));
  std::fflush(stdout);
  std::fflush(stderr);
  for (int lr = 0; lr < o.nproc_per_node; ++lr) {
    Worker& w = ws[static_cast<size_t>(lr)];
    w.local_rank = lr;
    w.rank = o.node_rank * o.nproc_per_node + lr;
    if (!o.log_dir.empty()) {
      w.log = std::make_unique<std::ofstream>(o.log_dir / fmt::format("rank-{}.log", w.rank), std::ios::trunc);
      if (!*w.log) fail("launch: cannot write {}", (o.log_dir / fmt::format("rank-{}.log", w.rank)).string());
    }
    int out[2], err[2];
    if (::pipe(out) != 0 || ::pipe(err) != 0) fail("launch: cannot create pipes: {}", std::strerror(errno));
    pid_t pid = ::fork();
    if (pid < 0) fail("launch: fork failed: {}", std::strerror(errno));
    if (pid == 0) {
      ::setpgid(0, 0);  // signals reach workers only through the launcher (no double Ctrl-C)
      for (int i = 0; i < 5; ++i) ::sigaction(forwarded[i], &old[i], nullptr);
      ::dup2(out[1], 1);
      ::dup2(err[1], 2);
      ::close(out[0]), ::close(out[1]), ::close(err[0]), ::close(err[1]);
      ::close(g_wake_pipe[0]), ::close(g_wake_pipe[1]);
      auto set = [](const char* k, const std::string& v) { ::setenv(k, v.c_str(), 1); };
      set("RANK", std::to_string(w.rank));
      set("LOCAL_RANK", std::to_string(lr));
      set("WORLD_SIZE", std::to_string(world));
      set("LOCAL_WORLD_SIZE", std::to_string(o.nproc_per_node));
      set("GROUP_RANK", std::to_string(o.node_rank));
      set("ROLE_RANK", std::to_string(w.rank));
      set("ROLE_WORLD_SIZE", std::to_string(world));
      set("MASTER_ADDR", o.master_addr);
      set("MASTER_PORT", std::to_string(o.master_port));
      set("TORCHELASTIC_RUN_ID", "llmtune");
      set("LLMTUNE_RDZV_TIMEOUT", fmt::format("{}", o.rdzv_timeout_s));
      if (!std::getenv("OMP_NUM_THREADS")) set("OMP_NUM_THREADS", "1");  // torchrun's default with >1 worker
      std::vector<std::string> args = {exe};
      args.insert(args.end(), o.command.begin(), o.command.end());
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(exe.c_str(), argv.data());
      std::fprintf(stderr, "llmtune launch: cannot run %s: %s\n", exe.c_str(), std::strerror(errno));
      ::_exit(127);
    }
    ::setpgid(pid, pid);
    ::close(out[1]);
    ::close(err[1]);
    w.pid = pid;
    w.fd[0] = out[0];
    w.fd[1] = err[0];
  }
  log::info(fmt::format("launch: {} worker(s) on node {} of {} (world size {}), rendezvous at {}:{}",
                        o.nproc_per_node, o.node_rank, o.nnodes, world, o.master_addr, o.master_port));

  const size_t tail_lines = static_cast<size_t>(std::max(o.tail_lines, 1));
  int failed = -1;          // index of the first worker that failed
  double stop_deadline = -1;
  bool killed = false;
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<std::pair<size_t, int>> who;
    for (size_t i = 0; i < ws.size(); ++i)
      for (int s = 0; s < 2; ++s)
        if (ws[i].fd[s] >= 0) {
          fds.push_back({ws[i].fd[s], POLLIN, 0});
          who.emplace_back(i, s);
        }
    fds.push_back({g_wake_pipe[0], POLLIN, 0});
    ::poll(fds.data(), fds.size(), 200);
    for (size_t k = 0; k + 1 < fds.size(); ++k)
      if (fds[k].revents & (POLLIN | POLLHUP | POLLERR)) pump(ws[who[k].first], who[k].second, tail_lines);
    if (fds.back().revents & POLLIN) {
      char drain[64];
      while (::read(g_wake_pipe[0], drain, sizeof drain) > 0) {
      }
    }
    if (int sig = g_pending_signal.exchange(0)) {
      log::notice(fmt::format("launch: forwarding {} to the workers", strsignal(sig)));
      signal_all(ws, sig);
    }
    // Reap.
    bool all_done = true;
    for (size_t i = 0; i < ws.size(); ++i) {
      Worker& w = ws[i];
      if (!w.exited) {
        int st = 0;
        pid_t r = ::waitpid(w.pid, &st, WNOHANG);
        if (r == w.pid) {
          w.exited = true;
          w.status = st;
          if (exit_code(st) != 0 && failed < 0) {
            failed = static_cast<int>(i);
            if (std::any_of(ws.begin(), ws.end(), [](const Worker& x) { return !x.exited; })) {
              log::warn(fmt::format("launch: rank {} {}; stopping the other workers", w.rank, describe_status(st)));
              signal_all(ws, SIGTERM);
              stop_deadline = now_seconds() + o.grace_s;
            }
          }
        }
      }
      if (!w.exited || w.fd[0] >= 0 || w.fd[1] >= 0) all_done = false;
    }
    if (all_done) break;
    if (stop_deadline > 0 && !killed && now_seconds() > stop_deadline) {
      signal_all(ws, SIGKILL);
      killed = true;
    }
    // A worker's grandchildren may hold its pipes open after it exits: once drained, stop reading.
    for (auto& w : ws)
      for (int s = 0; s < 2 && w.exited; ++s)
        if (w.fd[s] >= 0) {
          pollfd p{w.fd[s], POLLIN, 0};
          if (::poll(&p, 1, 0) == 0) {
            ::close(w.fd[s]);
            w.fd[s] = -1;
          }
        }
  }
  for (int i = 0; i < 5; ++i) ::sigaction(forwarded[i], &old[i], nullptr);
  ::close(g_wake_pipe[0]);
  ::close(g_wake_pipe[1]);
  g_wake_pipe[0] = g_wake_pipe[1] = -1;

  if (failed < 0) {
    log::info(fmt::format("launch: all {} worker(s) finished", ws.size()));
    return 0;
  }
  const Worker& w = ws[static_cast<size_t>(failed)];
  std::string report = fmt::format("launch: worker rank {} (local rank {}, pid {}) {}; the other workers were stopped.",
                                   w.rank, w.local_rank, w.pid, describe_status(w.status));
  if (!w.tail.empty()) {
    report += fmt::format(" Its last {} line(s):", w.tail.size());
    for (const auto& l : w.tail) report += "\n  | " + l;
  } else {
    report += " It printed nothing.";
  }
  if (!o.log_dir.empty()) report += fmt::format("\nFull logs: {}/rank-*.log", o.log_dir.string());
  std::fflush(stdout);
  std::fprintf(stderr, "error: %s\n", report.c_str());
  std::fflush(stderr);
  return exit_code(w.status);
}

}  // namespace llmtune::dist
