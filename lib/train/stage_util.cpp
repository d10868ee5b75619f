// Stage plumbing shared by sft/reward/dpo/...: see stage_impl.h.
#include <atomic>
#include <csignal>

#include "config/config.h"
#include "core/core.h"
#include "train/stage_impl.h"

namespace llmtune::train {

namespace {
std::atomic<bool> g_stage_stop{false};
extern "C" void stage_on_sigint(int) {
  g_stage_stop.store(true);
  std::signal(SIGINT, SIG_DFL);
}
}  // namespace

torch::Device stage_device() {
  return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
}

Precision stage_precision(const config::Recipe& recipe, const torch::Device& device) {
  if (recipe.fp16) return Precision::fp16;
  if (recipe.bf16 == config::Tristate::on) return Precision::bf16;
  if (recipe.bf16 == config::Tristate::automatic && device.is_cuda()) return Precision::bf16;
  return Precision::fp32;
}

torch::ScalarType precision_dtype(Precision p) {
  return p == Precision::bf16 ? torch::kBFloat16 : (p == Precision::fp16 ? torch::kHalf : torch::kFloat);
}

void stage_copy_tokenizer_files(const std::filesystem::path& from, const std::filesystem::path& to) {
  for (const char* f : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                        "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt"}) {
    std::error_code ec;
    if (std::filesystem::is_regular_file(from / f))
      std::filesystem::copy_file(from / f, to / f, std::filesystem::copy_options::overwrite_existing, ec);
    if (ec) fail("cannot copy {} to {}: {}", (from / f).string(), to.string(), ec.message());
  }
}

SigintStop::SigintStop() {
  g_stage_stop.store(false);
  previous_ = std::signal(SIGINT, stage_on_sigint);
}

SigintStop::~SigintStop() { std::signal(SIGINT, previous_); }

bool SigintStop::requested() { return g_stage_stop.load(); }

}  // namespace llmtune::train
