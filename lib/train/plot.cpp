// loss.svg: training loss and eval loss (left axis) and learning rate (right axis) against the
// step, drawn from metrics.jsonl as a self-contained SVG (no fonts or scripts needed to view); eval
// task metrics (eval_<task>/<metric>, from eval_tasks) get a second panel below on the same steps.
// Non-finite points are dropped; an empty series is simply not drawn.
#include <algorithm>
#include <cmath>
#include <fstream>

#include "core/core.h"
#include "train/train.h"

namespace llmtune::train {

namespace {

struct Series {
  std::string name, color;
  bool dashed = false;
  std::vector<std::pair<double, double>> points;
};

// Tick values at 1/2/5 x 10^k spacing covering [lo, hi].
std::vector<double> nice_ticks(double lo, double hi, int target = 5) {
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * mag) { step = m * mag; break; }
  std::vector<double> out;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push_back(std::abs(v) < step * 1e-9 ? 0 : v);
  return out;
}

std::string fmt_num(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  if (a >= 1e5 || a < 1e-3) return fmt::format("{:.1e}", v);
  return fmt::format("{:.4g}", v);
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else out += c;
  }
  return out;
}

}  // namespace

void write_loss_plot(const fs::path& metrics_jsonl, const fs::path& svg_out) {
  std::ifstream in(metrics_jsonl);
  if (!in) fail("cannot read {}", metrics_jsonl.string());
  Series train{"train loss", "#1f77b4", false, {}}, eval{"eval loss", "#d62728", false, {}}, lr{"learning rate", "#2ca02c", true, {}};
  std::vector<Series> tasks;  // eval task metrics, in first-appearance order
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("step")) continue;
    const double step = j["step"].get<double>();
    auto add = [&](Series& s, const char* key) {
      if (j.contains(key) && j[key].is_number() && std::isfinite(j[key].get<double>()))
        s.points.emplace_back(step, j[key].get<double>());
    };
    add(train, "loss");
    add(eval, "eval_loss");
    add(lr, "lr");
    for (const auto& [k, v] : j.items()) {
      if (k.rfind("eval_", 0) != 0 || k.find('/') == std::string::npos || !v.is_number()) continue;
      auto it = std::find_if(tasks.begin(), tasks.end(), [&](const Series& s) { return s.name == k.substr(5); });
      if (it == tasks.end()) {
        static const char* palette[] = {"#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"};
        tasks.push_back({k.substr(5), palette[tasks.size() % 7], false, {}});
        it = tasks.end() - 1;
      }
      add(*it, k.c_str());
    }
  }

  const double W = 900, H0 = 520, L = 80, R = 90, T = 50, B = 60;
  const double H2 = tasks.empty() ? 0 : 280;  // second panel: eval task metrics
  const double H = H0 + H2;
  const double pw = W - L - R, ph = H0 - T - B;
  double x0 = 0, x1 = 1, y0 = INFINITY, y1 = -INFINITY, l1 = 0;
  for (const Series* s : {&train, &eval, &lr})
    for (auto [x, y] : s->points) x1 = std::max(x1, x);
  for (const auto& s : tasks)
    for (auto [x, y] : s.points) x1 = std::max(x1, x);
  for (const Series* s : {&train, &eval})
    for (auto [x, y] : s->points) y0 = std::min(y0, y), y1 = std::max(y1, y);
  if (!std::isfinite(y0)) y0 = 0, y1 = 1;
  if (y1 - y0 < 1e-12) y0 -= 0.5, y1 += 0.5;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad, y1 += pad;
  for (auto [x, y] : lr.points) l1 = std::max(l1, y);
  if (l1 <= 0) l1 = 1;
  l1 *= 1.05;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return T + ph - (y - y0) / (y1 - y0) * ph; };
  auto pl = [&](double y) { return T + ph - y / l1 * ph; };

  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"Helvetica, Arial, sans-serif\" font-size=\"13\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">{3}</text>\n",
      W, H, W / 2, escape("Training loss and learning rate"));
  // Grid and axes.
  for (double v : nice_ticks(x0, x1, 8)) {
    svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#eee\"/>\n", px(v), T, T + ph);
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", px(v), T + ph + 18, fmt_num(v));
  }
  for (double v : nice_ticks(y0, y1, 6)) {
    svg += fmt::format("<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#eee\"/>\n", L, py(v), L + pw, py(v));
    svg += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", L - 6, py(v) + 4, fmt_num(v));
  }
  if (!lr.points.empty())
    for (double v : nice_ticks(0, l1, 5))
      svg += fmt::format("<text x=\"{}\" y=\"{:.1f}\" fill=\"{}\">{}</text>\n", L + pw + 6, pl(v) + 4, lr.color, fmt_num(v));
  svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", L, T, pw, ph);
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", L + pw / 2, H0 - 15);
  svg += fmt::format("<text x=\"20\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {0})\">loss</text>\n",
                     T + ph / 2);
  if (!lr.points.empty())
    svg += fmt::format("<text x=\"{0}\" y=\"{1}\" text-anchor=\"middle\" fill=\"{2}\" transform=\"rotate(90 {0} {1})\">"
                       "learning rate</text>\n", W - 18, T + ph / 2, lr.color);
  // Series.
  for (const Series* s : {&lr, &train, &eval}) {
    if (s->points.empty()) continue;
    std::string pts;
    for (auto [x, y] : s->points) pts += fmt::format("{:.2f},{:.2f} ", px(x), s == &lr ? pl(y) : py(y));
    svg += fmt::format("<polyline id=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{} points=\"{}\"/>\n",
                       s == &lr ? "lr" : (s == &train ? "train_loss" : "eval_loss"), s->color,
                       s->dashed ? " stroke-dasharray=\"6 4\"" : "", pts);
    if (s == &eval)
      for (auto [x, y] : s->points)
        svg += fmt::format("<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"3\" fill=\"{}\"/>\n", px(x), py(y), s->color);
  }
  // Legend.
  double ly = T + 12;
  for (const Series* s : {&train, &eval, &lr}) {
    if (s->points.empty()) continue;
    svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"2\"{4}/>\n",
                       L + pw - 150, ly, L + pw - 122, s->color, s->dashed ? " stroke-dasharray=\"6 4\"" : "");
    svg += fmt::format("<text x=\"{}\" y=\"{}\">{}</text>\n", L + pw - 116, ly + 4, s->name);
    ly += 18;
  }
  if (!tasks.empty()) {
    // Eval task metrics: accuracies are in [0, 1]; other metrics widen the axis.
    const double t0 = H0 + 20, th = H2 - 70;
    double m0 = 0, m1 = 1;
    for (const auto& s : tasks)
      for (auto [x, y] : s.points) m0 = std::min(m0, y), m1 = std::max(m1, y);
    auto pm = [&](double y) { return t0 + th - (y - m0) / (m1 - m0) * th; };
    for (double v : nice_ticks(x0, x1, 8)) {
      svg += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#eee\"/>\n", px(v), t0, t0 + th);
      svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", px(v), t0 + th + 18, fmt_num(v));
    }
    for (double v : nice_ticks(m0, m1, 5)) {
      svg += fmt::format("<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#eee\"/>\n", L, pm(v), L + pw, pm(v));
      svg += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", L - 6, pm(v) + 4, fmt_num(v));
    }
    svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", L, t0, pw, th);
    svg += fmt::format("<text x=\"20\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {0})\">eval tasks</text>\n",
                       t0 + th / 2);
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", L + pw / 2, H - 15);
    double ty = t0 + 12;
    for (const auto& s : tasks) {
      std::string pts;
      for (auto [x, y] : s.points) pts += fmt::format("{:.2f},{:.2f} ", px(x), pm(y));
      svg += fmt::format("<polyline id=\"eval_metric_{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
                         escape(s.name), s.color, pts);
      for (auto [x, y] : s.points)
        svg += fmt::format("<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"3\" fill=\"{}\"/>\n", px(x), pm(y), s.color);
      svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"2\"/>\n",
                         L + 10, ty, L + 38, s.color);
      svg += fmt::format("<text x=\"{}\" y=\"{}\">{}</text>\n", L + 44, ty + 4, escape(s.name));
      ty += 18;
    }
  }
  svg += "</svg>\n";
  std::ofstream out(svg_out, std::ios::trunc);
  out << svg;
  if (!out) fail("cannot write {}", svg_out.string());
}

}  // namespace llmtune::train
