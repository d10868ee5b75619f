// Checkpoint directories: single-file and sharded save/read (index json as huggingface_hub
// writes it), and the errors for pickle-only, missing shards, inconsistent indexes.
#include <nlohmann/json.hpp>

#include "io/io.h"
#include "io_test_util.h"

using namespace llmtune;
using iotest::error_of;
using iotest::TempDir;
using iotest::write_bytes;
namespace fs = std::filesystem;

namespace {
std::vector<std::pair<std::string, torch::Tensor>> sample_tensors() {
  torch::manual_seed(1);
  return {{"model.embed_tokens.weight", torch::randn({16, 8}).to(torch::kBFloat16)},  // 256 bytes
          {"model.layers.0.self_attn.q_proj.weight", torch::randn({8, 8})},           // 256
          {"model.layers.0.mlp.up_proj.weight", torch::randn({32, 8})},               // 1024 (> limit: own shard)
          {"model.norm.weight", torch::randn({8})},                                   // 32
          {"step", torch::tensor(int64_t(7))}};                                       // 8
}
}  // namespace

TEST_CASE("checkpoint_save writes one file under the shard limit", "[checkpoint]") {
  TempDir dir;
  auto tensors = sample_tensors();
  io::checkpoint_save(dir.path, tensors);
  CHECK(fs::exists(dir / "model.safetensors"));
  CHECK_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  io::CheckpointReader r(dir.path);
  CHECK(r.names().size() == tensors.size());
  for (auto& [n, t] : tensors) CHECK(torch::equal(r.load(n), t));
  CHECK(r.file_of("model.norm.weight") == dir / "model.safetensors");
}

TEST_CASE("checkpoint_save shards like huggingface_hub and the reader follows the index", "[checkpoint]") {
  TempDir dir;
  auto tensors = sample_tensors();
  io::checkpoint_save(dir.path, tensors, /*max_shard_bytes=*/600);
  // huggingface_hub's rule, in order: up_proj (1024 > 600) goes alone into a shard at once;
  // embed, q_proj, norm, step (552 bytes) keep filling the current shard, appended last.
  CHECK(fs::exists(dir / "model-00001-of-00002.safetensors"));
  CHECK(fs::exists(dir / "model-00002-of-00002.safetensors"));
  auto index = nlohmann::json::parse(io::read_text_file(dir / "model.safetensors.index.json"));
  CHECK(index["metadata"]["total_size"].get<int64_t>() == 256 + 256 + 1024 + 32 + 8);
  CHECK(index["weight_map"]["model.layers.0.mlp.up_proj.weight"] == "model-00001-of-00002.safetensors");
  for (const char* n :
       {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "step"})
    CHECK(index["weight_map"][n] == "model-00002-of-00002.safetensors");
  io::CheckpointReader r(dir.path);
  for (auto& [n, t] : tensors) CHECK(torch::equal(r.load(n), t));
  CHECK(r.file_of("model.norm.weight").filename() == "model-00002-of-00002.safetensors");
  CHECK(r.info("model.layers.0.mlp.up_proj.weight").shape == std::vector<int64_t>{32, 8});

  // Saving again unsharded removes the old shards and index so nothing stale is read.
  io::checkpoint_save(dir.path, tensors);
  CHECK_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  CHECK_FALSE(fs::exists(dir / "model-00001-of-00002.safetensors"));
  CHECK(fs::exists(dir / "model.safetensors"));
}

TEST_CASE("checkpoint reader errors say what is wrong and what to do", "[checkpoint]") {
  TempDir dir;
  SECTION("pickle only") {
    write_bytes(dir / "pytorch_model.bin", "PK");
    write_bytes(dir / "config.json", "{}");
    CHECK_THAT(error_of([&] { io::CheckpointReader r(dir.path); }),
               Catch::Contains("pickle checkpoints are not loaded for safety; convert with transformers: "
                               "model.save_pretrained(dir, safe_serialization=True)"));
  }
  SECTION("missing shard is named") {
    io::checkpoint_save(dir.path, sample_tensors(), 600);
    fs::remove(dir / "model-00002-of-00002.safetensors");
    auto msg = error_of([&] { io::CheckpointReader r(dir.path); });
    CHECK_THAT(msg, Catch::Contains("model-00002-of-00002.safetensors") && Catch::Contains("does not exist") &&
                        Catch::Contains("model.safetensors.index.json"));
  }
  SECTION("index names a tensor its shard lacks") {
    io::checkpoint_save(dir.path, sample_tensors(), 600);
    auto index = nlohmann::json::parse(io::read_text_file(dir / "model.safetensors.index.json"));
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors";
    write_bytes(dir / "model.safetensors.index.json", index.dump());
    auto msg = error_of([&] { io::CheckpointReader r(dir.path); });
    CHECK_THAT(msg, Catch::Contains("`lm_head.weight`") && Catch::Contains("model-00001-of-00002.safetensors"));
  }
  SECTION("a single other .safetensors file is accepted, several are ambiguous") {
    io::safetensors_save(dir / "weights.safetensors", {{"a", torch::ones({2})}});
    CHECK(torch::equal(io::CheckpointReader(dir.path).load("a"), torch::ones({2})));
    io::safetensors_save(dir / "other.safetensors", {{"a", torch::ones({2})}});
    CHECK_THAT(error_of([&] { io::CheckpointReader r(dir.path); }),
               Catch::Contains("other.safetensors, weights.safetensors"));
  }
  SECTION("empty and missing directories") {
    CHECK_THAT(error_of([&] { io::CheckpointReader r(dir.path); }), Catch::Contains("no model weights in"));
    CHECK_THAT(error_of([&] { io::CheckpointReader r(dir / "nope"); }), Catch::Contains("does not exist"));
  }
  SECTION("unknown tensor suggests a name") {
    io::checkpoint_save(dir.path, sample_tensors());
    io::CheckpointReader r(dir.path);
    CHECK_THAT(error_of([&] { r.load("model.norm.weights"); }), Catch::Contains("did you mean `model.norm.weight`"));
  }
}

TEST_CASE("read_text_file names the missing file", "[checkpoint]") {
  TempDir dir;
  CHECK_THAT(error_of([&] { io::read_text_file(dir / "config.json"); }),
             Catch::Contains((dir / "config.json").string()) && Catch::Contains("No such file"));
}
