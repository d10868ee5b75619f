// `llmtune quantize --model DIR [--adapter DIR]... --format gguf --type TYPE --out FILE`: writes a
// GGUF v3 file llama.cpp runs (adapters merged first). --format gptq|awq are reserved for the
// GPTQ/AWQ writers and answer "not implemented yet" for now.
#include <fmt/ranges.h>

#include <iostream>

#include "cli/commands.h"
#include "cli/model_loading.h"
#include "core/core.h"
#include "export/export.h"
#include "io/io.h"

namespace llmtune::cli {
namespace {

struct QuantizeOpts {
  std::string model, format = "gguf", type, out, name;
  std::vector<std::string> adapters;
  int threads = 0;
};

int run_quantize(const QuantizeOpts& o) {
  set_threads(o.threads);
  if (o.format == "gptq" || o.format == "awq")
    fail("--format {} is not implemented yet; use --format gguf (GPTQ/AWQ writers are planned)", o.format);
  if (o.format != "gguf") fail("unknown --format '{}'; choose gguf (gptq and awq are planned)", o.format);
  if (o.type.empty()) {
    std::vector<std::string> names;
    for (const auto& t : exporter::gguf_file_types()) names.push_back(t.name);
    fail("--format gguf needs --type, one of: {}", fmt::format("{}", fmt::join(names, ", ")));
  }
  exporter::gguf_file_type(o.type);  // validate before loading anything
  exporter::GgufExportOptions opts;
  opts.model_dir = io::resolve_model_path(o.model);
  for (const auto& a : o.adapters) opts.adapters.emplace_back(a);
  opts.type = o.type;
  opts.out = o.out;
  opts.name = o.name;
  auto rep = exporter::export_gguf(opts);
  for (const auto& w : rep.warnings) log::warn(w);
  std::string mix;
  for (const auto& [k, n] : rep.type_counts) mix += fmt::format("{}{} {}", mix.empty() ? "" : ", ", n, k);
  std::cout << fmt::format("wrote {} ({}): {} tensors ({}), {} parameters, {} bytes, {:.3f} bits/weight, {:.2f} s\n",
                           o.out, o.type, rep.n_tensors, mix, rep.n_params, rep.file_bytes, rep.bits_per_weight,
                           rep.seconds);
  return 0;
}

}  // namespace

RunFn setup_quantize(CLI::App& app) {
  auto o = std::make_shared<QuantizeOpts>();
  std::string types;
  for (const auto& t : exporter::gguf_file_types()) types += (types.empty() ? "" : "|") + t.name;
  app.add_option("--model", o->model, "Model directory (Hugging Face checkpoint) or hub id")->required();
  app.add_option("--adapter", o->adapters, "PEFT adapter directory merged before export (repeatable, in order)");
  app.add_option("--format", o->format, "Output format: gguf (gptq, awq: not implemented yet)")->capture_default_str();
  app.add_option("--type", o->type, "GGUF tensor type: " + types);
  app.add_option("--out", o->out, "Output file (e.g. model.gguf)")->required();
  app.add_option("--name", o->name, "general.name written into the file (default: the model directory's name)");
  app.add_option("--threads", o->threads, "CPU threads (default: all cores)");
  return [o]() { return run_quantize(*o); };
}

static const CommandRegistration register_quantize{
    {70, "quantize", "Export a model for other runtimes: GGUF (f32/f16/bf16, q8_0 ... q2_k) for llama.cpp", setup_quantize}};

}  // namespace llmtune::cli
