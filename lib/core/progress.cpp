// ProgressBar: one redrawn line on a terminal, throttled plain lines in logs and CI.
#include <unistd.h>

#include <cstdio>

#include "core/core.h"

namespace llmtune {

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), start_(now_seconds()),
      tty_(isatty(fileno(stderr)) != 0) {}

ProgressBar::~ProgressBar() { finish(); }

double ProgressBar::rate() const {
  double dt = now_seconds() - start_;
  return dt > 0 ? done_ / dt : 0.0;
}

void ProgressBar::update(int64_t n, const std::string& extra) {
  done_ += n;
  if (!extra.empty()) extra_ = extra;
  draw(false);
}

void ProgressBar::set_extra(const std::string& extra) { extra_ = extra; }

void ProgressBar::draw(bool force) {
  double t = now_seconds();
  double min_gap = tty_ ? 0.1 : plain_interval_s_;
  if (!force && t - last_draw_ < min_gap) return;
  last_draw_ = t;
  double r = rate();
  double eta = (r > 0 && total_ > 0) ? (total_ - done_) / r : -1;
  std::string counters = total_ > 0 ? fmt::format("{}/{}", done_, total_) : fmt::format("{}", done_);
  std::string text = fmt::format("{} {} {} | {:.1f} {}/s | elapsed {} | ETA {}", label_, counters, unit_, r, unit_,
                                 human_duration(t - start_), human_duration(eta));
  if (!extra_.empty()) text += " | " + extra_;
  if (tty_) {
    int width = 24;
    int filled = total_ > 0 ? static_cast<int>(width * std::min<double>(1.0, double(done_) / total_)) : 0;
    std::string bar = "[" + std::string(filled, '#') + std::string(width - filled, '.') + "] ";
    std::fprintf(stderr, "\r\033[K%s%s", bar.c_str(), text.c_str());
  } else {
    std::fprintf(stderr, "%s\n", text.c_str());
  }
  std::fflush(stderr);
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  draw(true);
  if (tty_) std::fprintf(stderr, "\n");
}

}  // namespace llmtune
