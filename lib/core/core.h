// llmtune::core — the few things every module needs: user-facing errors, logging,
// a progress bar that degrades to plain lines off a terminal, wall-clock timing, peak RSS.
// No LibTorch here on purpose: modules that do not touch tensors stay light to compile.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>
#include <fmt/format.h>

namespace llmtune {

// An error meant for a person: says what went wrong, where, and what to do.
// The CLI prints `error: <what()>` and exits with status 1; never a stack dump.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

namespace log {
enum class Level { debug = 0, info = 1, warn = 2, error = 3 };
void set_level(Level level);
Level level();
void debug(std::string_view message);
void info(std::string_view message);
void warn(std::string_view message);  // prints "warning: ..."
void notice(std::string_view message);  // one-line notice, always shown unless quiet
}  // namespace log

// Levenshtein distance; used for "did you mean" suggestions on keys and names.
size_t edit_distance(std::string_view a, std::string_view b);
// The candidate closest to `word`, if reasonably close (distance <= max(2, len/3)).
std::optional<std::string> closest_match(std::string_view word, const std::vector<std::string>& candidates);

// Seconds since an arbitrary start, monotonic.
double now_seconds();
// Peak resident set size of this process in bytes (from /proc/self/status VmHWM).
int64_t peak_rss_bytes();
std::string human_bytes(double bytes);
std::string human_duration(double seconds);

// Progress over a known number of units (steps, tokens...). On a terminal it redraws one
// line with rate and ETA; otherwise it prints a plain line at most every `plain_interval_s`.
class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, std::string unit = "it");
  ~ProgressBar();
  // Advance by `n` units; `extra` is shown after the counters (for example "loss 2.31").
  void update(int64_t n, const std::string& extra = "");
  void set_extra(const std::string& extra);
  void finish();
  double rate() const;  // units per second so far

 private:
  void draw(bool force);
  std::string label_, unit_, extra_;
  int64_t total_, done_ = 0;
  double start_, last_draw_ = -1e9;
  bool tty_, finished_ = false;
  double plain_interval_s_ = 10.0;
};

}  // namespace llmtune
