// safetensors reader/writer: byte-exact round trips of every dtype and odd shapes, the
// reference writer's layout rule, zero-copy views that outlive the file object, and one test
// per validation failure (hand-written corrupt files) checking the message names file and tensor.
#include <signal.h>
#include <sys/resource.h>

#include "io/io.h"
#include "io_test_util.h"

using namespace llmtune;
using iotest::error_of;
using iotest::raw_safetensors;
using iotest::TempDir;
using iotest::write_bytes;
namespace fs = std::filesystem;

namespace {

// Random content whose raw bytes are compared exactly (floats may hold any bit pattern, NaNs too).
torch::Tensor random_tensor(torch::ScalarType dt, std::vector<int64_t> shape) {
  if (dt == torch::kBool) return torch::randint(0, 2, shape).to(torch::kBool);
  if (c10::multiply_integers(shape) == 0) return torch::empty(shape, dt);
  int64_t esize = c10::elementSize(dt);
  std::vector<int64_t> bshape = shape;
  if (bshape.empty()) bshape = {1};
  bshape.back() *= esize;
  torch::Tensor bytes = torch::randint(0, 256, bshape, torch::kInt32).to(torch::kUInt8);
  torch::Tensor t = bytes.view(dt);
  return shape.empty() ? t.reshape({}) : t;
}

bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;
  auto ab = a.contiguous().reshape({-1}).view(torch::kUInt8);
  auto bb = b.contiguous().reshape({-1}).view(torch::kUInt8);
  return torch::equal(ab, bb);
}

const std::string kTiny = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

}  // namespace

TEST_CASE("safetensors round trip keeps every dtype and shape byte for byte", "[safetensors]") {
  torch::manual_seed(0);
  TempDir dir;
  std::vector<std::pair<torch::ScalarType, std::string>> dtypes = {{torch::kFloat32, "F32"},
                                                                   {torch::kFloat16, "F16"},
                                                                   {torch::kBFloat16, "BF16"},
                                                                   {torch::kFloat64, "F64"},
                                                                   {torch::kInt8, "I8"},
                                                                   {torch::kUInt8, "U8"},
                                                                   {torch::kInt16, "I16"},
                                                                   {torch::kInt32, "I32"},
                                                                   {torch::kInt64, "I64"},
                                                                   {torch::kBool, "BOOL"},
                                                                   {torch::kUInt16, "U16"},
                                                                   {torch::kUInt32, "U32"},
                                                                   {torch::kUInt64, "U64"},
                                                                   {torch::kComplexFloat, "C64"},
                                                                   {at::ScalarType::Float8_e4m3fn, "F8_E4M3"},
                                                                   {at::ScalarType::Float8_e5m2, "F8_E5M2"},
                                                                   {at::ScalarType::Float8_e8m0fnu, "F8_E8M0"}};
  std::vector<std::vector<int64_t>> shapes = {{}, {0}, {3, 0}, {1}, {5}, {2, 3, 4}};
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (auto& [dt, name] : dtypes) {
    CHECK(io::dtype_to_safetensors(dt) == name);
    CHECK(io::dtype_from_safetensors(name) == dt);
    for (size_t s = 0; s < shapes.size(); ++s)
      tensors.emplace_back(fmt::format("{}.s{}", name, s), random_tensor(dt, shapes[s]));
  }
  auto path = dir / "all.safetensors";
  io::safetensors_save(path, tensors);
  auto f = io::SafetensorsFile::open(path);
  CHECK(f->metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  CHECK(f->names().size() == tensors.size());
  for (auto& [name, t] : tensors) {
    INFO(name);
    REQUIRE(f->contains(name));
    auto loaded = f->load(name);
    CHECK(same_bytes(loaded, t));
    CHECK(f->info(name).dtype == io::dtype_to_safetensors(t.scalar_type()));
  }
}

TEST_CASE("writer follows the reference layout: widest dtype first, then name; header padded to 8", "[safetensors]") {
  TempDir dir;
  auto path = dir / "layout.safetensors";
  io::safetensors_save(path, {{"z8", torch::zeros({3}, torch::kUInt8)},
                              {"b16", torch::zeros({1}, torch::kBFloat16)},
                              {"a32", torch::zeros({1}, torch::kFloat32)},
                              {"c64", torch::zeros({1}, torch::kInt64)},
                              {"a16", torch::zeros({1}, torch::kFloat16)},
                              {"flag", torch::zeros({1}, torch::kBool)},
                              {"b32", torch::zeros({2}, torch::kFloat32)}});
  std::string bytes = iotest::read_bytes(path);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);
  std::string header = bytes.substr(8, n);
  CHECK(header.rfind("{\"__metadata__\":{\"format\":\"pt\"},", 0) == 0);
  CHECK(header.find_first_of(' ') == header.find_last_not_of(' ') + 1);  // only trailing spaces pad
  auto f = io::SafetensorsFile::open(path);
  CHECK(f->names() == std::vector<std::string>{"c64", "a32", "b32", "b16", "a16", "z8", "flag"});
  for (const auto& name : f->names()) {
    auto& ti = f->info(name);
    CHECK((8 + n + ti.begin) % c10::elementSize(io::dtype_from_safetensors(ti.dtype)) == 0);
  }
}

TEST_CASE("loaded tensors are zero-copy views that outlive the file object", "[safetensors]") {
  TempDir dir;
  auto path = dir / "v.safetensors";
  torch::Tensor w = torch::arange(12, torch::kFloat32).reshape({3, 4});
  io::safetensors_save(path, {{"w", w}, {"wt", w.t()}});  // non-contiguous input is written contiguous
  torch::Tensor a, b, wt;
  {
    auto f = io::SafetensorsFile::open(path);
    a = f->load("w");
    b = f->load("w");
    wt = f->load("wt");
  }                                     // file object gone: the tensors keep the mapping alive
  CHECK(a.data_ptr() == b.data_ptr());  // both view the same mapped bytes: no copy was made
  CHECK(torch::equal(a, w));
  CHECK(torch::equal(wt, w.t().contiguous()));
  a.add_(1);  // copy-on-write mapping: in-place ops are allowed and never reach the file
  CHECK(torch::equal(a, w + 1));
  CHECK(torch::equal(io::SafetensorsFile::open(path)->load("w"), w));
}

TEST_CASE("unaligned tensors are copied and still correct", "[safetensors]") {
  TempDir dir;
  // A 3-space-padded header puts the buffer at file offset 8+N with N % 4 == 3.
  std::string header = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  while (header.size() % 4 != 3) header += ' ';
  std::string bytes = raw_safetensors(header, 0);
  float vals[2] = {1.5f, -2.25f};
  bytes.append(reinterpret_cast<const char*>(vals), 8);
  write_bytes(dir / "u.safetensors", bytes);
  auto t = io::SafetensorsFile::open(dir / "u.safetensors")->load("x");
  CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0);
  CHECK(t[0].item<float>() == 1.5f);
  CHECK(t[1].item<float>() == -2.25f);
}

TEST_CASE("corrupt safetensors files are rejected with messages naming file and tensor", "[safetensors]") {
  TempDir dir;
  auto path = dir / "model.safetensors";
  auto open = [&] { io::SafetensorsFile::open(path); };
  const std::string file = path.string();

  SECTION("truncated data") {
    io::safetensors_save(path, {{"model.layers.0.mlp.up_proj.weight", torch::ones({4, 4})},
                                {"model.layers.1.mlp.up_proj.weight", torch::ones({4, 4})}});
    fs::resize_file(path, fs::file_size(path) - 10);
    auto msg = error_of(open);
    CHECK_THAT(msg, Catch::Contains(file + " is truncated: tensor `model.layers.1.mlp.up_proj.weight` needs bytes "
                                           "[64, 128) of the data buffer but the file has only 118"));
    CHECK_THAT(msg, Catch::Contains("re-download or re-save the checkpoint"));
  }
  SECTION("overlapping offsets") {
    write_bytes(path, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                      12));
    auto msg = error_of(open);
    CHECK_THAT(msg,
               Catch::Contains(file) && Catch::Contains("`a`") && Catch::Contains("`b`") && Catch::Contains("overlap"));
  }
  SECTION("gap between tensors") {
    write_bytes(path, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                                      20));
    auto msg = error_of(open);
    CHECK_THAT(msg, Catch::Contains(file) && Catch::Contains("`b`") && Catch::Contains("[8, 12)"));
  }
  SECTION("bad JSON") {
    write_bytes(path, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 8));
    auto msg = error_of(open);
    CHECK_THAT(msg, Catch::Contains(file) && Catch::Contains("invalid JSON") && Catch::Contains("line 1"));
  }
  SECTION("header not starting with a brace") {
    write_bytes(path, raw_safetensors(" " + kTiny, 8));
    CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("must start with '{'"));
  }
  SECTION("header too large") {
    write_bytes(path, raw_safetensors(kTiny, 8, 200'000'000));
    CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("header too large"));
  }
  SECTION("header longer than the file") {
    write_bytes(path, raw_safetensors(kTiny, 0, 4096));
    CHECK_THAT(error_of(open), Catch::Contains(file + " is truncated"));
  }
  SECTION("file shorter than the length field") {
    write_bytes(path, "abc");
    CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("too small"));
  }
  SECTION("trailing bytes") {
    write_bytes(path, raw_safetensors(kTiny, 11));
    CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("3 trailing bytes") && Catch::Contains("`a`"));
  }
  SECTION("duplicate key") {
    write_bytes(path, raw_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                      16));
    CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("duplicate JSON key \"a\""));
  }
  SECTION("size does not match dtype x shape") {
    write_bytes(path, raw_safetensors(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8));
    CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("`w`") && Catch::Contains("needs 12 bytes"));
  }
  SECTION("unknown dtype") {
    write_bytes(path, raw_safetensors(R"({"w":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8));
    CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("`w`") && Catch::Contains("F33"));
  }
  SECTION("non-string metadata") {
    write_bytes(path, raw_safetensors(
                          R"({"__metadata__":{"step":3},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8));
    CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("__metadata__") && Catch::Contains("step"));
  }
  SECTION("missing file") { CHECK_THAT(error_of(open), Catch::Contains(file) && Catch::Contains("No such file")); }
}

TEST_CASE("unknown tensor names suggest the closest one", "[safetensors]") {
  TempDir dir;
  io::safetensors_save(dir / "m.safetensors", {{"model.norm.weight", torch::ones({2})}});
  auto f = io::SafetensorsFile::open(dir / "m.safetensors");
  CHECK_THAT(error_of([&] { f->load("model.norm.weigth"); }), Catch::Contains("did you mean `model.norm.weight`"));
}

TEST_CASE("a failed save (file size limit, like a full disk) leaves the old file intact and no tmp", "[safetensors]") {
  TempDir dir;
  auto path = dir / "model.safetensors";
  io::safetensors_save(path, {{"old", torch::ones({4})}});
  std::string before = iotest::read_bytes(path);

  // RLIMIT_FSIZE makes write() fail with EFBIG past 64 KiB, exercising the short-write path.
  struct rlimit old {};
  REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto old_handler = signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 64 * 1024;
  REQUIRE(setrlimit(RLIMIT_FSIZE, &lim) == 0);
  std::string msg = error_of([&] { io::safetensors_save(path, {{"big", torch::ones({1 << 20})}}); });
  setrlimit(RLIMIT_FSIZE, &old);
  signal(SIGXFSZ, old_handler);

  CHECK_THAT(msg, Catch::Contains("cannot write " + path.string()) && Catch::Contains("File too large"));
  CHECK(iotest::read_bytes(path) == before);
  CHECK_FALSE(fs::exists(dir / "model.safetensors.tmp"));
}

TEST_CASE("save rejects duplicate and reserved names", "[safetensors]") {
  TempDir dir;
  CHECK_THAT(error_of([&] {
               io::safetensors_save(dir / "d.safetensors", {{"a", torch::ones({1})}, {"a", torch::ones({1})}});
             }),
             Catch::Contains("`a` is given twice"));
  CHECK_THAT(error_of([&] {
               io::safetensors_save(dir / "d.safetensors", {{"__metadata__", torch::ones({1})}});
             }),
             Catch::Contains("reserved"));
  CHECK_FALSE(fs::exists(dir / "d.safetensors"));
}
