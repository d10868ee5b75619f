// Hub id resolution: a hand-built Hugging Face cache (refs -> snapshots, .no_exist markers),
// offline errors, and real downloads from tests/unit/io/fake_hub.py on 127.0.0.1 (fresh
// download, cache reuse with the server gone, resume with Range, tokens, 404 handling).
// Python for the fake server: $LLMTUNE_PYTHON, else python3 (standard library only).
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "io/io.h"
#include "io_test_util.h"

extern char** environ;

using namespace llmtune;
using iotest::EnvVar;
using iotest::error_of;
using iotest::read_bytes;
using iotest::TempDir;
using iotest::write_bytes;
namespace fs = std::filesystem;

namespace {

const std::string kSha = "0123456789abcdef0123456789abcdef01234567";

// Isolates the hub environment: the cache under `cache`, no user token, online unless told.
struct HubEnv {
  EnvVar cache, home, legacy, token, token2, token_path, offline, endpoint;
  HubEnv(const fs::path& c, const std::string& ep = "http://127.0.0.1:9")
      : cache("HF_HUB_CACHE", c.string()),
        home("HF_HOME", (c / "hf-home").string()),
        legacy("HUGGINGFACE_HUB_CACHE", std::nullopt),
        token("HF_TOKEN", std::nullopt),
        token2("HUGGING_FACE_HUB_TOKEN", std::nullopt),
        token_path("HF_TOKEN_PATH", std::nullopt),
        offline("HF_HUB_OFFLINE", std::nullopt),
        endpoint("HF_ENDPOINT", ep) {}
};

// models--org--tiny with refs/main -> kSha; config.json as blob + relative symlink like the hub.
fs::path build_cache(const fs::path& cache) {
  fs::path repo = cache / "models--org--tiny";
  write_bytes(repo / "refs" / "main", kSha);  // the hub writes no trailing newline; tolerate both
  write_bytes(repo / "blobs" / "abc123", R"({"model_type":"llama"})");
  fs::create_directories(repo / "snapshots" / kSha);
  fs::create_symlink("../../blobs/abc123", repo / "snapshots" / kSha / "config.json");
  io::safetensors_save(repo / "snapshots" / kSha / "model.safetensors", {{"w", torch::ones({2})}});
  return repo;
}

io::HubOptions quiet(std::vector<std::string> files) {
  io::HubOptions o;
  o.files = std::move(files);
  o.show_progress = false;
  return o;
}

fs::path source_dir() {
  if (const char* s = std::getenv("LLMTUNE_SOURCE_DIR")) return s;
  return fs::path(__FILE__).parent_path().parent_path().parent_path().parent_path();
}

// Runs fake_hub.py; waits (bounded) for it to publish its port; kills it on destruction.
struct FakeHub {
  pid_t pid = -1;
  int port = 0;
  fs::path log, manifest;
  FakeHub(const fs::path& work, const fs::path& root, std::vector<std::string> extra = {}) {
    const char* py_env = std::getenv("LLMTUNE_PYTHON");
    std::string py = py_env && *py_env ? py_env : "python3";
    fs::path script = source_dir() / "tests" / "unit" / "io" / "fake_hub.py";
    REQUIRE(fs::exists(script));
    static int counter = 0;
    std::string tag = std::to_string(++counter);
    fs::path port_file = work / ("port" + tag);
    log = work / ("log" + tag + ".jsonl");
    manifest = work / ("manifest" + tag + ".json");
    std::vector<std::string> args = {
        py,           script.string(), "--root",          root.string(), "--port-file", port_file.string(), "--log",
        log.string(), "--manifest",    manifest.string(), "--commit",    kSha,          "--lfs-min-size",   "200"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    REQUIRE(posix_spawnp(&pid, py.c_str(), nullptr, nullptr, argv.data(), environ) == 0);
    for (int i = 0; i < 300 && !fs::exists(port_file); ++i) {
      int status;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        FAIL("fake_hub.py exited before it was ready (python: " << py << ")");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    REQUIRE(fs::exists(port_file));  // 15 s bound
    port = std::stoi(read_bytes(port_file));
  }
  ~FakeHub() { stop(); }
  void stop() {
    if (pid > 0) {
      kill(pid, SIGTERM);
      int status;
      waitpid(pid, &status, 0);
      pid = -1;
    }
  }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port); }
  std::vector<nlohmann::json> requests() const {
    std::vector<nlohmann::json> out;
    std::ifstream f(log);
    for (std::string line; std::getline(f, line);)
      if (!line.empty()) out.push_back(nlohmann::json::parse(line));
    return out;
  }
  nlohmann::json files() const { return nlohmann::json::parse(read_bytes(manifest)); }
};

// A served repo org/tiny: config, tokenizer, a 2-shard checkpoint whose shards take the
// LFS-like redirect path (>= 200 bytes), no tokenizer.model.
std::vector<std::pair<std::string, torch::Tensor>> build_remote(const fs::path& root) {
  fs::path repo = root / "org" / "tiny";
  fs::create_directories(repo);
  write_bytes(repo / "config.json", R"({"model_type":"llama","hidden_size":8})");
  write_bytes(repo / "tokenizer.json", R"({"version":"1.0"})");
  torch::manual_seed(3);
  std::vector<std::pair<std::string, torch::Tensor>> t = {{"model.embed_tokens.weight", torch::randn({64, 8})},
                                                          {"model.norm.weight", torch::randn({8})},
                                                          {"lm_head.weight", torch::randn({64, 8})}};
  io::checkpoint_save(repo, t, /*max_shard_bytes=*/3000);
  REQUIRE(fs::exists(repo / "model-00002-of-00002.safetensors"));
  return t;
}

}  // namespace

TEST_CASE("hub ids resolve to a complete cached snapshot without the network", "[hub]") {
  TempDir tmp;
  HubEnv env(tmp / "hub");  // HF_ENDPOINT points at a closed port: any request would fail
  fs::path repo = build_cache(tmp / "hub");
  fs::path snap = repo / "snapshots" / kSha;
  write_bytes(repo / ".no_exist" / kSha / "tokenizer.model", "");

  auto opts = quiet({"config.json", "?model.safetensors", "?tokenizer.model"});
  CHECK(io::resolve_model_path("org/tiny", opts) == snap);
  CHECK(read_bytes(io::resolve_model_path("org/tiny", opts) / "config.json") == R"({"model_type":"llama"})");

  SECTION("a commit sha as revision selects that snapshot") {
    fs::remove(repo / "refs" / "main");
    opts.revision = kSha;
    CHECK(io::resolve_model_path("org/tiny", opts) == snap);
  }
  SECTION("an unreachable server falls back to a snapshot with every required file") {
    // tokenizer.json's status is unknown (no .no_exist marker), so the server is asked; it is down.
    CHECK(io::resolve_model_path("org/tiny", quiet({"config.json", "?tokenizer.json"})) == snap);
    CHECK_THAT(error_of([&] { io::resolve_model_path("org/tiny", quiet({"config.json", "tokenizer.json"})); }),
               Catch::Contains("cannot download org/tiny") && Catch::Contains("cannot reach"));
  }
  SECTION("HF_HOME/hub is used when HF_HUB_CACHE is unset") {
    EnvVar c("HF_HUB_CACHE", std::nullopt), h("HF_HOME", tmp.path.string());
    CHECK(io::resolve_model_path("org/tiny", opts) == snap);
  }
  SECTION("local directories win and bad names are explained") {
    CHECK(io::resolve_model_path(tmp.path.string(), opts) == tmp.path);
    CHECK_THAT(error_of([&] { io::resolve_model_path("./no/such/dir", opts); }), Catch::Contains("does not exist"));
    CHECK_THAT(error_of([&] { io::resolve_model_path("org--x/tiny", opts); }),
               Catch::Contains("nor a valid Hugging Face model id"));
  }
}

TEST_CASE("HF_HUB_OFFLINE=1 says what is missing and where it looked", "[hub]") {
  TempDir tmp;
  HubEnv env(tmp / "hub");
  EnvVar off("HF_HUB_OFFLINE", "1");
  fs::path repo = build_cache(tmp / "hub");

  // Optional files of unknown status do not block an offline run.
  CHECK(io::resolve_model_path("org/tiny", quiet({"config.json", "?tokenizer.model"})) == repo / "snapshots" / kSha);
  auto msg = error_of([&] { io::resolve_model_path("org/tiny", quiet({"config.json", "tokenizer.json"})); });
  CHECK_THAT(msg, Catch::Contains("HF_HUB_OFFLINE=1") && Catch::Contains("tokenizer.json") &&
                      Catch::Contains((repo / "snapshots" / kSha).string()));
  msg = error_of([&] { io::resolve_model_path("org/other", quiet({"config.json"})); });
  CHECK_THAT(msg, Catch::Contains("not in the Hugging Face cache") &&
                      Catch::Contains((tmp / "hub" / "models--org--other" / "refs" / "main").string()));
}

TEST_CASE("downloads from a hub server into the cache layout, then works without it", "[hub][download]") {
  TempDir tmp;
  auto tensors = build_remote(tmp / "remote");
  FakeHub hub(tmp.path, tmp / "remote");
  HubEnv env(tmp / "hub", hub.endpoint());
  io::HubOptions opts;  // the defaults other modules use
  opts.show_progress = false;

  fs::path dir = io::resolve_model_path("org/tiny", opts);
  fs::path repo = tmp / "hub" / "models--org--tiny";
  CHECK(dir == repo / "snapshots" / kSha);
  CHECK(io::read_text_file(repo / "refs" / "main") == kSha);
  // Files are blobs named by ETag with relative symlinks, as huggingface_hub stores them.
  auto manifest = hub.files();
  for (const char* f : {"config.json", "tokenizer.json", "model-00001-of-00002.safetensors"}) {
    INFO(f);
    REQUIRE(fs::is_symlink(dir / f));
    CHECK(fs::read_symlink(dir / f) ==
          fs::path("../../blobs") / manifest[std::string("org/tiny/") + f]["etag"].get<std::string>());
  }
  CHECK(manifest["org/tiny/model-00001-of-00002.safetensors"]["lfs"] == true);
  CHECK(fs::exists(repo / ".no_exist" / kSha / "tokenizer.model"));  // optional 404: skipped, remembered
  io::CheckpointReader r(dir);
  for (auto& [n, t] : tensors) CHECK(torch::equal(r.load(n), t));
  for (auto& req : hub.requests()) CHECK(req["auth"].is_null());  // no token configured: none sent

  hub.stop();
  CHECK(io::resolve_model_path("org/tiny", opts) == dir);  // complete cache: no request needed
}

TEST_CASE("an interrupted download resumes with a Range request", "[hub][download]") {
  TempDir tmp;
  build_remote(tmp / "remote");
  FakeHub hub(tmp.path, tmp / "remote");
  HubEnv env(tmp / "hub", hub.endpoint());
  auto m = hub.files()["org/tiny/model-00001-of-00002.safetensors"];
  std::string full = read_bytes(tmp / "remote" / "org" / "tiny" / "model-00001-of-00002.safetensors");
  fs::path blob = tmp / "hub" / "models--org--tiny" / "blobs" / m["etag"].get<std::string>();
  write_bytes(fs::path(blob.string() + ".incomplete"), full.substr(0, 1000));

  fs::path dir = io::resolve_model_path("org/tiny", quiet({"config.json", "?model.safetensors.index.json"}));
  CHECK(read_bytes(dir / "model-00001-of-00002.safetensors") == full);
  CHECK_FALSE(fs::exists(blob.string() + ".incomplete"));
  bool resumed = false;
  for (auto& req : hub.requests())
    if (req["method"] == "GET" && req["path"] == "/cdn/" + m["sha256"].get<std::string>()) {
      CHECK(req["range"] == "bytes=1000-");
      CHECK(req["status"] == 206);
      resumed = true;
    }
  CHECK(resumed);
}

TEST_CASE("gated repos need HF_TOKEN, which is sent as a bearer token", "[hub][download]") {
  TempDir tmp;
  build_remote(tmp / "remote");
  FakeHub hub(tmp.path, tmp / "remote", {"--require-token", "hf_secret"});
  HubEnv env(tmp / "hub", hub.endpoint());
  auto opts = quiet({"config.json"});
  auto msg = error_of([&] { io::resolve_model_path("org/tiny", opts); });
  CHECK_THAT(msg, Catch::Contains("HTTP 401") && Catch::Contains("HF_TOKEN") && Catch::Contains("licence"));

  EnvVar token("HF_TOKEN", "hf_secret");
  fs::path dir = io::resolve_model_path("org/tiny", opts);
  CHECK(fs::exists(dir / "config.json"));
  CHECK(hub.requests().back()["auth"] == "Bearer hf_secret");
}

TEST_CASE("a missing required file names the URL; missing optional files are skipped", "[hub][download]") {
  TempDir tmp;
  build_remote(tmp / "remote");
  FakeHub hub(tmp.path, tmp / "remote");
  HubEnv env(tmp / "hub", hub.endpoint());
  fs::path dir = io::resolve_model_path("org/tiny", quiet({"config.json", "?tokenizer.model", "?chat_template.jinja"}));
  CHECK(fs::exists(dir / "config.json"));
  CHECK_FALSE(fs::exists(dir / "tokenizer.model"));
  auto msg = error_of([&] { io::resolve_model_path("org/tiny", quiet({"config.json", "weights.bin"})); });
  CHECK_THAT(msg,
             Catch::Contains(hub.endpoint() + "/org/tiny/resolve/" + kSha + "/weights.bin") && Catch::Contains("404"));
}
