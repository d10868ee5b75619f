// Internal to lib/train: the pieces trainer.cpp and checkpoint.cpp share (checkpoint contents,
// atomic directory writes, rotation). Not part of the public API.
#pragma once
#include <functional>

#include "train/train.h"

namespace llmtune::train::detail {

// Everything a checkpoint-N/ holds. File layout:
//   trainable.safetensors  trainable params in the model's dtype (what a stage would export)
//   optimizer.safetensors  optimizer slots "<param>.exp_avg"... and fp32 masters "master.<param>"
//   rng.safetensors        "torch_cpu": the default CPU generator state (uint8)
//   trainer_state.json     step, epoch, scheduler/scaler/optimizer scalars, data position, log window
// trainer_state.json is written last; a dir without it is never treated as a checkpoint.
struct CheckpointData {
  NamedTensors trainable;
  NamedTensors optimizer;
  torch::Tensor rng_state;
  nlohmann::json state;
};

// "[2, 3]" for error messages (c10 shapes have no fmt formatter).
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

inline constexpr const char* kStateFile = "trainer_state.json";

// Writes checkpoint-<step> through checkpoint-<step>.tmp-XXXXXX and a rename. On any failure the
// temp dir is removed, existing checkpoints are untouched, and an Error says what happened.
fs::path write_checkpoint(const fs::path& output_dir, int64_t step, const CheckpointData& data,
                          const std::function<void(const fs::path&)>& save_extra);
// Deletes the oldest complete checkpoints so that `keep` remain (keep <= 0: keep all).
void rotate_checkpoints(const fs::path& output_dir, int64_t keep);
// Removes checkpoint-*.tmp-* left behind by a crashed run.
void remove_stale_temp_dirs(const fs::path& output_dir);
CheckpointData read_checkpoint(const fs::path& dir);

}  // namespace llmtune::train::detail
