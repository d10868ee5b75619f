// `llmtune quantize --model DIR [--adapter DIR]... --format gguf --type TYPE --out FILE`: writes a
// GGUF v3 file llama.cpp runs (adapters merged first).
// `--format gptq|awq --bits 4|8 --group-size N [--act-order] [--sym] --calib FILE --out DIR`: a
// Hugging Face GPTQ / AutoAWQ (GEMM) checkpoint directory (lib/export/gptq_export.cpp).
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
  // gptq / awq
  int bits = 4;
  int64_t group_size = 128, calib_samples = 128, calib_seqlen = 512;
  bool act_order = false, sym = false, rtn = false;
  double damp = 0.01;
  std::string calib;
};

int run_group_quant(const QuantizeOpts& o) {
  if (!o.adapters.empty())
    fail("--adapter is not supported with --format {}; merge first (llmtune merge) and quantize the merged model",
         o.format);
  if (!o.type.empty()) fail("--type is a GGUF option; --format {} takes --bits and --group-size", o.format);
  if (o.format == "awq" && (o.act_order || o.sym))
    fail("--act-order and --sym are GPTQ options; AWQ always uses zero points in input order");
  exporter::GroupQuantExportOptions e;
  e.model_dir = io::resolve_model_path(o.model);
  e.method = o.format;
  e.params.bits = o.bits;
  e.params.group_size = o.group_size;
  e.params.act_order = o.act_order;
  e.params.sym = o.sym;
  e.params.damp_percent = o.damp;
  e.calib = o.calib;
  e.calib_samples = o.calib_samples;
  e.calib_seqlen = o.calib_seqlen;
  e.rtn = o.rtn;
  e.out = o.out;
  if (o.damp <= 0 || o.damp >= 1) fail("--damp {} must be in (0, 1)", o.damp);
  auto rep = exporter::export_group_quant(e);
  std::cout << fmt::format("wrote {} ({}{} {}-bit, group {}): {} linears, {} bytes of safetensors, {:.2f} s{}\n", o.out,
                           o.format, o.rtn ? " round-to-nearest" : "", o.bits, o.group_size, rep.n_linears,
                           rep.file_bytes, rep.seconds,
                           o.rtn ? "" : fmt::format(", relative output error {:.5f}", rep.relative_output_error));
  return 0;
}

int run_quantize(const QuantizeOpts& o) {
  set_threads(o.threads);
  if (o.format == "gptq" || o.format == "awq") return run_group_quant(o);
  if (o.format != "gguf") fail("unknown --format '{}'; choose gguf, gptq or awq", o.format);
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
  app.add_option("--format", o->format, "Output format: gguf (one file), gptq or awq (a checkpoint directory)")
      ->capture_default_str();
  app.add_option("--type", o->type, "GGUF tensor type: " + types);
  app.add_option("--out", o->out, "Output file (gguf, e.g. model.gguf) or directory (gptq, awq)")->required();
  app.add_option("--bits", o->bits, "gptq/awq: bits per weight (gptq 4 or 8, awq 4)")->capture_default_str();
  app.add_option("--group-size", o->group_size, "gptq/awq: inputs per (scale, zero) group; -1 = one group")
      ->capture_default_str();
  app.add_flag("--act-order", o->act_order, "gptq: quantize columns by decreasing activation (desc_act)");
  app.add_flag("--sym", o->sym, "gptq: symmetric quantization (zero point fixed at 2^(bits-1))");
  app.add_option("--calib", o->calib, "gptq/awq: calibration text (.txt, or .jsonl with a \"text\" field)");
  app.add_option("--calib-samples", o->calib_samples, "gptq/awq: calibration windows")->capture_default_str();
  app.add_option("--calib-seqlen", o->calib_seqlen, "gptq/awq: tokens per calibration window")->capture_default_str();
  app.add_option("--damp", o->damp, "gptq: Hessian dampening, fraction of mean(diag H)")->capture_default_str();
  app.add_flag("--rtn", o->rtn, "gptq/awq: plain round-to-nearest in the same layout (baseline; no --calib)");
  app.add_option("--name", o->name, "general.name written into the file (default: the model directory's name)");
  app.add_option("--threads", o->threads, "CPU threads (default: all cores)");
  return [o]() { return run_quantize(*o); };
}

static const CommandRegistration register_quantize{
    {70, "quantize", "Export a model for other runtimes: GGUF for llama.cpp, GPTQ/AWQ checkpoints for HF loaders", setup_quantize}};

}  // namespace llmtune::cli
