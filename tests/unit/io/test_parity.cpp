// Parity with the Python reference writers: files from safetensors.torch.save_file and
// huggingface_hub.save_torch_state_dict (scripts/fixtures/io_safetensors.py) must load to the
// exact values recorded by Python. The hidden [write-fixture] case writes llmtune's own files
// for tests/parity/test_io_safetensors.py to read back with the safetensors package.
#include <nlohmann/json.hpp>

#include "io/io.h"
#include "io_test_util.h"

using namespace llmtune;
namespace fs = std::filesystem;

namespace {

fs::path fixtures_dir() {
  const char* f = std::getenv("LLMTUNE_FIXTURES");
  if (!f || !*f)
    FAIL("LLMTUNE_FIXTURES is not set; run scripts/fixtures/io_safetensors.py --out DIR and set it to DIR");
  fs::path d = fs::path(f) / "io" / "py";
  if (!fs::exists(d / "expected.json"))
    FAIL("missing fixtures " << (d / "expected.json").string() << "; run scripts/fixtures/io_safetensors.py --out " << f
                             << " (or scripts/fixtures/make_all.sh)");
  return d;
}

nlohmann::ordered_json expected(const fs::path& d) {
  return nlohmann::ordered_json::parse(io::read_text_file(d / "expected.json"));
}

void check_values(const std::string& name, const torch::Tensor& t, const nlohmann::ordered_json& e) {
  INFO("tensor " << name);
  CHECK(io::dtype_to_safetensors(t.scalar_type()) == e["dtype"].get<std::string>());
  CHECK(t.sizes().vec() == e["shape"].get<std::vector<int64_t>>());
  const auto& vals = e["values"];
  REQUIRE(t.numel() == static_cast<int64_t>(vals.size()));
  auto flat = t.reshape({-1});
  if (t.is_floating_point()) {
    auto d = flat.to(torch::kFloat64);
    for (int64_t i = 0; i < t.numel(); ++i) CHECK(d[i].item<double>() == vals[i].get<double>());  // exact
  } else {
    auto d = flat.to(torch::kInt64);
    for (int64_t i = 0; i < t.numel(); ++i) CHECK(d[i].item<int64_t>() == vals[i].get<int64_t>());
  }
}

}  // namespace

TEST_CASE("files written by the safetensors package and huggingface_hub load identically", "[parity]") {
  fs::path d = fixtures_dir();
  auto e = expected(d);
  auto f = io::SafetensorsFile::open(d / "all.safetensors");
  CHECK(f->metadata().at("format") == "pt");
  CHECK(f->names().size() == e["tensors"].size());
  for (const auto& [name, spec] : e["tensors"].items()) check_values(name, f->load(name), spec);

  io::CheckpointReader r(d / "sharded");
  CHECK(r.names().size() == e["tensors"].size());
  for (const auto& [name, spec] : e["tensors"].items()) {
    check_values(name, r.load(name), spec);
    CHECK(r.file_of(name).filename() == e["weight_map"][name].get<std::string>());
  }
}

// Run by tests/parity/test_io_safetensors.py with LLMTUNE_IO_OUT set: re-saves what was read so
// Python can compare llmtune's bytes with the reference writer's and read them back.
TEST_CASE("write llmtune files for the Python parity check", "[.][write-fixture]") {
  const char* out_env = std::getenv("LLMTUNE_IO_OUT");
  if (!out_env || !*out_env)
    FAIL("LLMTUNE_IO_OUT is not set (this case is driven by tests/parity/test_io_safetensors.py)");
  fs::path out = out_env;
  fs::create_directories(out);
  fs::path d = fixtures_dir();
  auto e = expected(d);
  auto f = io::SafetensorsFile::open(d / "all.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, spec] : e["tensors"].items()) tensors.emplace_back(name, f->load(name));  // Python's order
  io::safetensors_save(out / "all.safetensors", tensors);
  io::checkpoint_save(out / "sharded", tensors, e["shard_bytes"].get<int64_t>());
  // A non-contiguous input must be written as its contiguous values.
  torch::Tensor m = f->load("f32.matrix");
  io::safetensors_save(out / "transposed.safetensors", {{"t", m.t()}});
  CHECK(fs::exists(out / "sharded" / "model.safetensors.index.json"));
}
