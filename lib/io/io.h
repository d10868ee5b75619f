// llmtune::io — reading and writing the files the Hugging Face ecosystem uses:
// safetensors (memory-mapped, validated like the reference reader), checkpoint directories
// (single file or sharded with model.safetensors.index.json), and hub ids resolved through
// the standard Hugging Face cache or downloaded over HTTPS. Never loads pickles.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace llmtune::io {

namespace fs = std::filesystem;

struct TensorInfo {
  std::string name;
  std::string dtype;            // safetensors dtype string: "F32", "BF16", "F16", "I64", "U8", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data buffer
};

// One .safetensors file, memory-mapped and validated on open (header size, JSON, offsets
// tiling the buffer, sizes matching dtype x shape, file length). Errors name the file and
// the tensor. Tensors returned by load() stay valid after the file object is destroyed.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const fs::path& path);
  ~SafetensorsFile();
  const fs::path& path() const { return path_; }
  std::vector<std::string> names() const;  // in file order of data offsets
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The tensor as stored (dtype preserved). Zero-copy view of the mapping when aligned.
  torch::Tensor load(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  fs::path path_;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  std::shared_ptr<void> mapping_;  // keeps the mmap alive for views handed out
  const uint8_t* data_ = nullptr;  // start of the byte buffer inside the mapping
  size_t file_size_ = 0;
};

// Writes tensors (any order given) as the reference writer does: sorted by dtype width then
// name, header padded with spaces to 8 bytes. Writes to PATH.tmp and renames.
void safetensors_save(const fs::path& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

std::string dtype_to_safetensors(torch::ScalarType t);
torch::ScalarType dtype_from_safetensors(const std::string& s);  // throws Error for unsupported

// A Hugging Face checkpoint directory: model.safetensors, or model.safetensors.index.json with
// shards. Refuses pytorch_model.bin (pickle) with a message saying how to convert.
class CheckpointReader {
 public:
  explicit CheckpointReader(const fs::path& dir);
  const fs::path& dir() const { return dir_; }
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;
  fs::path file_of(const std::string& name) const;
  torch::Tensor load(const std::string& name) const;

 private:
  fs::path dir_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> by_tensor_;
};

// Writes tensors as model.safetensors, or as shards + index when larger than max_shard_bytes.
void checkpoint_save(const fs::path& dir, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                     int64_t max_shard_bytes = 5'000'000'000LL);

// Resolves a `base_model` value to a local directory holding `files`:
//  - an existing local directory is returned as is;
//  - an id "org/name" is looked up in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub,
//    else ~/.cache/huggingface/hub; layout models--org--name/{refs/REV,snapshots/SHA/...});
//  - otherwise the files are downloaded from HF_ENDPOINT (default https://huggingface.co)
//    /{id}/resolve/{revision}/{file} with HF_TOKEN as a bearer token, resumably, into that
//    same cache layout; HF_HUB_OFFLINE=1 forbids the download and says so.
// `files` entries may be optional (prefix "?"), e.g. "?tokenizer.model". If
// "model.safetensors.index.json" is fetched, its shards are fetched too.
struct HubOptions {
  std::string revision = "main";
  std::vector<std::string> files = {"config.json", "?generation_config.json", "?model.safetensors",
                                    "?model.safetensors.index.json", "?tokenizer.json", "?tokenizer.model",
                                    "?tokenizer_config.json", "?special_tokens_map.json", "?chat_template.jinja"};
  bool show_progress = true;
};
fs::path resolve_model_path(const std::string& model, const HubOptions& options = {});

// Reads a whole file as bytes; errors (missing, unreadable, a directory) name the file.
std::string read_text_file(const fs::path& path);

}  // namespace llmtune::io
