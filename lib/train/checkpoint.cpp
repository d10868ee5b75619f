// Training checkpoints: written into a temp dir, fsynced, then renamed to checkpoint-N, so a
// crash or a full disk never leaves a half-written "latest"; rotation keeps the newest N.
// Tensors go through io's safetensors writer (exact bytes, no pickles); scalars through JSON.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <regex>

#include "core/core.h"
#include "io/io.h"
#include "train/train_impl.h"

namespace llmtune::train {

namespace {
const std::regex kCheckpointName(R"(checkpoint-(\d+))");
const std::regex kTempName(R"(checkpoint-\d+\.(tmp|old)-.*)");

void fsync_path(const fs::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) return;  // best effort: durability, not correctness, depends on it
  ::fsync(fd);
  ::close(fd);
}

NamedTensors contiguous_cpu(const NamedTensors& in) {
  NamedTensors out;
  out.reserve(in.size());
  for (const auto& [n, t] : in) out.emplace_back(n, t.detach().cpu().contiguous());
  return out;
}
}  // namespace

std::vector<fs::path> list_checkpoints(const fs::path& output_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return {};
  for (const auto& e : fs::directory_iterator(output_dir, ec)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || !std::regex_match(name, m, kCheckpointName)) continue;
    if (!fs::exists(e.path() / detail::kStateFile)) continue;
    found.emplace_back(std::stoll(m[1].str()), e.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> out;
  for (auto& [n, p] : found) out.push_back(p);
  return out;
}

std::optional<fs::path> resolve_resume(const fs::path& output_dir, const std::string& resume) {
  if (resume.empty() || resume == "false" || resume == "no") return std::nullopt;
  if (resume == "auto" || resume == "true") {
    auto all = list_checkpoints(output_dir);
    if (all.empty()) return std::nullopt;
    return all.back();
  }
  fs::path p(resume);
  if (!fs::is_directory(p)) fail("resume: '{}' is not a directory; give a checkpoint-N dir, or \"auto\" for the newest in output_dir", resume);
  if (!fs::exists(p / detail::kStateFile))
    fail("resume: '{}' has no {} (an incomplete or foreign checkpoint); pick a complete checkpoint-N dir", resume,
         detail::kStateFile);
  return p;
}

namespace detail {

void remove_stale_temp_dirs(const fs::path& output_dir) {
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(output_dir, ec))
    if (std::regex_match(e.path().filename().string(), kTempName)) stale.push_back(e.path());
  for (const auto& p : stale) {
    log::info(fmt::format("removing unfinished checkpoint {}", p.string()));
    fs::remove_all(p, ec);
  }
}

static void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail("cannot create {}: {}", path.string(), std::strerror(errno));
  f << text;
  f.flush();
  if (!f) fail("cannot write {}: {}", path.string(), std::strerror(errno));
  f.close();
  fsync_path(path);
}

fs::path write_checkpoint(const fs::path& output_dir, int64_t step, const CheckpointData& data,
                          const std::function<void(const fs::path&)>& save_extra) {
  const fs::path final_dir = output_dir / fmt::format("checkpoint-{}", step);
  std::string tmpl = (output_dir / fmt::format("checkpoint-{}.tmp-XXXXXX", step)).string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr)
    fail("cannot write checkpoint {}: creating a temp dir in {} failed ({}); earlier checkpoints are intact. "
         "Check that output_dir is writable and has free space.", final_dir.string(), output_dir.string(),
         std::strerror(errno));
  const fs::path tmp(buf.data());
  try {
    io::safetensors_save(tmp / "trainable.safetensors", contiguous_cpu(data.trainable));
    io::safetensors_save(tmp / "optimizer.safetensors", contiguous_cpu(data.optimizer));
    io::safetensors_save(tmp / "rng.safetensors", {{"torch_cpu", data.rng_state.contiguous()}});
    if (save_extra) save_extra(tmp);
    write_text(tmp / kStateFile, data.state.dump(1));
    fsync_path(tmp);
    // Replace an existing checkpoint-N (a re-run of a step) without a moment where neither exists.
    fs::path old;
    if (fs::exists(final_dir)) {
      old = output_dir / fmt::format("checkpoint-{}.old-{}", step, fs::path(buf.data()).extension().string().substr(1));
      fs::rename(final_dir, old);
    }
    fs::rename(tmp, final_dir);
    fsync_path(output_dir);
    if (!old.empty()) fs::remove_all(old);
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    fail("cannot write checkpoint {}: {}. The partial copy was removed and earlier checkpoints are intact; free "
         "disk space or choose another output_dir, then resume with resume: auto.", final_dir.string(), e.what());
  }
  return final_dir;
}

void rotate_checkpoints(const fs::path& output_dir, int64_t keep) {
  if (keep <= 0) return;
  auto all = list_checkpoints(output_dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) {
    std::error_code ec;
    fs::remove_all(all[i], ec);
    if (ec) log::warn(fmt::format("could not delete old checkpoint {}: {}", all[i].string(), ec.message()));
  }
}

CheckpointData read_checkpoint(const fs::path& dir) {
  CheckpointData d;
  const fs::path state_path = dir / kStateFile;
  std::ifstream f(state_path);
  if (!f) fail("cannot read {}: {}", state_path.string(), std::strerror(errno));
  try {
    d.state = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail("{} is not valid JSON ({}); the checkpoint is damaged, resume from an earlier one", state_path.string(),
         e.what());
  }
  auto load_all = [&](const char* file) {
    const fs::path p = dir / file;
    if (!fs::exists(p)) fail("checkpoint {} is missing {}; resume from another checkpoint", dir.string(), file);
    auto st = io::SafetensorsFile::open(p);
    NamedTensors out;
    for (const auto& n : st->names()) out.emplace_back(n, st->load(n).clone());  // own the memory
    return out;
  };
  d.trainable = load_all("trainable.safetensors");
  d.optimizer = load_all("optimizer.safetensors");
  for (auto& [n, t] : load_all("rng.safetensors"))
    if (n == "torch_cpu") d.rng_state = t;
  if (!d.rng_state.defined()) fail("checkpoint {}: rng.safetensors has no 'torch_cpu' tensor", dir.string());
  return d;
}

}  // namespace detail
}  // namespace llmtune::train
