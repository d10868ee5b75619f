// Hugging Face checkpoint directories (formats.md §1.4): model.safetensors, or
// model.safetensors.index.json + model-0000i-of-0000N.safetensors shards. Reading never touches
// pickles; writing shards the way huggingface_hub does (greedy in the given order, a tensor
// bigger than the limit alone in its shard). Caveat: tensors sharing storage are not grouped.
#include <algorithm>
#include <regex>
#include <set>

#include "core/core.h"
#include "io/io.h"
#include "io/io_impl.h"

namespace llmtune::io {
namespace {

const char* kSingle = "model.safetensors";
const char* kIndex = "model.safetensors.index.json";

bool is_shard_name(const std::string& f) {
  static const std::regex re(R"(model-\d{5}-of-\d{5}\.safetensors)");
  return std::regex_match(f, re);
}

std::vector<std::string> list_dir(const fs::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

CheckpointReader::CheckpointReader(const fs::path& path) {
  std::error_code ec;
  fs::path single;
  if (fs::is_regular_file(path, ec) && path.extension() == ".safetensors") {
    dir_ = path.parent_path().empty() ? fs::path(".") : path.parent_path();
    single = path;
  } else {
    dir_ = path;
    if (!fs::exists(path, ec)) fail("checkpoint directory {} does not exist", path.string());
    if (!fs::is_directory(path, ec))
      fail("{} is not a directory; expected a Hugging Face checkpoint directory", path.string());
    if (fs::exists(dir_ / kSingle, ec)) single = dir_ / kSingle;
  }

  if (!single.empty()) {
    auto f = SafetensorsFile::open(single);
    for (const auto& n : f->names()) by_tensor_[n] = f;
    return;
  }

  if (fs::exists(dir_ / kIndex, ec)) {
    const fs::path index_path = dir_ / kIndex;
    const std::string index_file = index_path.string();
    nlohmann::json j = detail::parse_json_strict(read_text_file(index_path), index_file);
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail("{}: expected an object with a \"weight_map\" object (tensor name -> shard file)", index_file);
    std::map<std::string, std::vector<std::string>> shard_tensors;  // shard file -> tensors it should hold
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        fail("{}: weight_map entry for `{}` must be a shard file name (string)", index_file, it.key());
      shard_tensors[it.value().get<std::string>()].push_back(it.key());
    }
    std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
    for (const auto& [shard, names] : shard_tensors) {
      fs::path sp = dir_ / shard;
      if (shard.find("..") != std::string::npos || fs::path(shard).is_absolute())
        fail("{}: shard name \"{}\" points outside the checkpoint directory", index_file, shard);
      if (!fs::exists(sp, ec))
        fail(
            "{} names shard {} (holding {} tensors, e.g. `{}`) but {} does not exist; the download is incomplete: "
            "re-download the checkpoint",
            index_file, shard, names.size(), names.front(), sp.string());
      auto f = SafetensorsFile::open(sp);
      shards[shard] = f;
      for (const auto& n : names) {
        if (!f->contains(n))
          fail(
              "{} says tensor `{}` is in {}, but that shard has no such tensor; the checkpoint is inconsistent "
              "(re-download it or re-save it)",
              index_file, n, sp.string());
        by_tensor_[n] = f;
      }
    }
    // Tensors present in a shard but missing from the weight map: still readable, say so once.
    size_t extra = 0;
    for (const auto& [shard, f] : shards)
      for (const auto& n : f->names())
        if (!by_tensor_.count(n)) {
          by_tensor_[n] = f;
          ++extra;
        }
    if (extra)
      log::debug(fmt::format("{}: {} tensors found in shards but not listed in the weight map", index_file, extra));
    return;
  }

  std::vector<std::string> files = list_dir(dir_);
  std::vector<std::string> st;
  for (const auto& f : files)
    if (fs::path(f).extension() == ".safetensors") st.push_back(f);
  if (st.size() == 1) {
    auto f = SafetensorsFile::open(dir_ / st[0]);
    for (const auto& n : f->names()) by_tensor_[n] = f;
    return;
  }
  if (st.size() > 1)
    fail("{} holds several .safetensors files ({}) but neither {} nor {}; cannot tell which is the model",
         dir_.string(), fmt::join(st, ", "), kSingle, kIndex);
  for (const auto& f : files)
    if (f == "pytorch_model.bin" || f == "pytorch_model.bin.index.json" || (f.rfind("pytorch_model-", 0) == 0) ||
        fs::path(f).extension() == ".bin" || fs::path(f).extension() == ".pt" || fs::path(f).extension() == ".pth")
      fail(
          "{} holds only pickle weights ({}); pickle checkpoints are not loaded for safety; convert with "
          "transformers: model.save_pretrained(dir, safe_serialization=True)",
          dir_.string(), f);
  fail("no model weights in {}: expected {} or {} (the directory holds: {})", dir_.string(), kSingle, kIndex,
       files.empty() ? std::string("nothing") : fmt::format("{}", fmt::join(files, ", ")));
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  out.reserve(by_tensor_.size());
  for (const auto& [n, f] : by_tensor_) out.push_back(n);
  return out;
}

bool CheckpointReader::contains(const std::string& name) const { return by_tensor_.count(name) != 0; }

namespace {
[[noreturn]] void not_found(const fs::path& dir, const std::string& name,
                            const std::map<std::string, std::shared_ptr<SafetensorsFile>>& m) {
  std::vector<std::string> names;
  for (const auto& [n, f] : m) names.push_back(n);
  auto c = closest_match(name, names);
  fail("tensor `{}` not found in checkpoint {}{}", name, dir.string(),
       c ? fmt::format(" (did you mean `{}`?)", *c) : "");
}
}  // namespace

const TensorInfo& CheckpointReader::info(const std::string& name) const {
  auto it = by_tensor_.find(name);
  if (it == by_tensor_.end()) not_found(dir_, name, by_tensor_);
  return it->second->info(name);
}

fs::path CheckpointReader::file_of(const std::string& name) const {
  auto it = by_tensor_.find(name);
  if (it == by_tensor_.end()) not_found(dir_, name, by_tensor_);
  return it->second->path();
}

torch::Tensor CheckpointReader::load(const std::string& name) const {
  auto it = by_tensor_.find(name);
  if (it == by_tensor_.end()) not_found(dir_, name, by_tensor_);
  return it->second->load(name);
}

void checkpoint_save(const fs::path& dir, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                     int64_t max_shard_bytes) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("cannot create checkpoint directory {}: {}", dir.string(), ec.message());
  if (max_shard_bytes <= 0) fail("checkpoint_save: max_shard_bytes must be positive (got {})", max_shard_bytes);

  int64_t total = 0;
  for (const auto& [n, t] : tensors) total += static_cast<int64_t>(t.nbytes());

  // Greedy split in the given order (huggingface_hub's rule): a tensor that alone exceeds the
  // limit gets its own shard; otherwise a new shard starts when the next tensor would overflow.
  std::vector<std::vector<size_t>> shards;
  std::vector<size_t> cur;
  int64_t cur_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    int64_t b = static_cast<int64_t>(tensors[i].second.nbytes());
    if (b > max_shard_bytes) {
      shards.push_back({i});
      continue;
    }
    if (!cur.empty() && cur_bytes + b > max_shard_bytes) {
      shards.push_back(std::move(cur));
      cur.clear();
      cur_bytes = 0;
    }
    cur.push_back(i);
    cur_bytes += b;
  }
  if (!cur.empty()) shards.push_back(std::move(cur));

  std::set<std::string> written;
  if (shards.size() <= 1) {  // one shard is written as model.safetensors, without an index
    safetensors_save(dir / kSingle, tensors);
    written.insert(kSingle);
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    const size_t n = shards.size();
    for (size_t s = 0; s < n; ++s) {
      std::string fname = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, n);
      std::vector<std::pair<std::string, torch::Tensor>> part;
      for (size_t i : shards[s]) {
        part.push_back(tensors[i]);
        weight_map[tensors[i].first] = fname;
      }
      safetensors_save(dir / fname, part);
      written.insert(fname);
    }
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    detail::write_file_atomic(dir / kIndex, index.dump(2) + "\n");
    written.insert(kIndex);
  }
  // Remove leftovers of an earlier save with a different layout, so a reader never mixes them.
  for (const auto& f : list_dir(dir))
    if ((f == kSingle || f == kIndex || is_shard_name(f)) && !written.count(f)) fs::remove(dir / f, ec);
}

}  // namespace llmtune::io
