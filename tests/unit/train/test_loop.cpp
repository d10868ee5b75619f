// Tests of run_training on the toy LM: accumulation equivalence, the NaN guard, fp16 overflow
// skipping, fp32 masters for bf16 weights, bitwise-exact resume, checkpoint rotation and write
// failures, metrics.jsonl contents, eval numbers and the loss plot.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>

#include "core/core.h"
#include "toy_lm.h"
#include "train/train.h"

namespace tr = llmtune::train;
namespace fs = std::filesystem;

namespace {

fs::path scratch_root() { return fs::temp_directory_path() / ("llmtune_test_train_" + std::to_string(::getpid())); }

// This process's scratch directory goes when the test binary exits.
struct ScratchCleanup {
  ~ScratchCleanup() {
    std::error_code ec;
    fs::remove_all(scratch_root(), ec);
  }
} scratch_cleanup;

fs::path fresh_dir(const std::string& name) {
  fs::path d = scratch_root() / name;
  fs::remove_all(d);
  fs::create_directories(d.parent_path());
  return d;
}

toy::ToyLM make_model(uint64_t init_seed, double dropout = 0.0) {
  torch::manual_seed(init_seed);
  return toy::ToyLM(32, 16, dropout);
}

tr::TrainOptions base_options() {
  tr::TrainOptions o;
  o.optimizer.lr = 1e-2;
  o.optimizer.weight_decay = 0.01;
  o.schedule.type = "cosine";
  o.schedule.warmup_steps = 1;
  o.logging_steps = 1;
  o.progress = false;
  o.plot = false;
  return o;
}

std::vector<nlohmann::json> read_jsonl(const fs::path& p) {
  std::ifstream f(p);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(f, line)) out.push_back(nlohmann::json::parse(line));  // throws if not JSON
  return out;
}

// Wraps an objective and corrupts chosen calls of compute().
class FaultyObjective : public toy::LMObjective {
 public:
  using toy::LMObjective::LMObjective;
  std::function<torch::Tensor(int64_t call, torch::Tensor loss)> corrupt;
  int64_t calls = 0;
  tr::StepOutput compute(const tr::Batch& b, double normaliser) override {
    auto out = toy::LMObjective::compute(b, normaliser);
    if (corrupt) out.loss = corrupt(++calls, out.loss);
    return out;
  }
};

}  // namespace

TEST_CASE("micro 1 x accum 4 equals micro 4 x accum 1", "[loop]") {
  auto rows = toy::make_batches(12, 1, 10, 5);  // 12 single-row batches, different -100 counts
  auto grouped = toy::regroup(rows, 4);
  auto m1 = make_model(3), m4 = make_model(3);
  toy::LMObjective o1(m1), o4(m4);
  tr::VectorBatchSource s1(rows), s4(grouped);
  auto opt = base_options();
  opt.max_steps = 3;
  opt.max_grad_norm = 0.5;  // clipping active on both sides
  opt.gradient_accumulation_steps = 4;
  std::vector<double> l1, l4;
  tr::TrainHooks h1, h4;
  h1.on_step = [&](const tr::StepReport& r) { l1.push_back(r.loss); };
  h4.on_step = [&](const tr::StepReport& r) { l4.push_back(r.loss); };
  tr::run_training(*m1, o1, s1, nullptr, opt, h1);
  opt.gradient_accumulation_steps = 1;
  tr::run_training(*m4, o4, s4, nullptr, opt, h4);
  REQUIRE(l1.size() == 3);
  for (size_t i = 0; i < 3; ++i) CHECK(l1[i] == Approx(l4[i]).epsilon(1e-6));
  auto a = toy::snapshot(*m1), b = toy::snapshot(*m4), init = toy::snapshot(*make_model(3));
  for (const auto& [name, t] : a) {
    INFO(name);
    CHECK((t - b[name]).abs().max().item<double>() < 1e-6);
    CHECK((t - init[name]).abs().max().item<double>() > 1e-4);  // it did train
  }
}

TEST_CASE("non-finite steps are skipped; max_bad_steps in a row stops with an Error", "[loop]") {
  auto data = toy::make_batches(6, 2, 8, 9);
  auto dir = fresh_dir("nan");
  SECTION("one NaN loss: no update, optimizer state untouched, training continues") {
    auto m = make_model(1);
    FaultyObjective obj(m);
    obj.corrupt = [](int64_t call, torch::Tensor l) { return call == 2 ? l * std::nan("") : l; };
    tr::VectorBatchSource src(data);
    auto opt = base_options();
    opt.max_steps = 4;
    opt.output_dir = dir;
    opt.save_steps = 1;
    std::vector<std::map<std::string, torch::Tensor>> snaps;
    std::vector<tr::StepReport> reps;
    tr::TrainHooks hooks;
    hooks.on_step = [&](const tr::StepReport& r) { reps.push_back(r); snaps.push_back(toy::snapshot(*m)); };
    auto res = tr::run_training(*m, obj, src, nullptr, opt, hooks);
    CHECK(res.steps == 4);
    CHECK(res.skipped_steps == 1);
    REQUIRE(reps.size() == 4);
    CHECK(reps[1].skipped);
    CHECK(reps[1].skip_reason == "non-finite loss");
    for (const auto& [n, t] : snaps[0]) CHECK(torch::equal(t, snaps[1][n]));
    std::ifstream f(dir / "checkpoint-2" / "trainer_state.json");
    auto st = nlohmann::json::parse(f);
    for (const auto& [n, v] : st["optimizer"]["step"].items()) CHECK(v.get<int64_t>() == 1);
    auto lines = read_jsonl(dir / "metrics.jsonl");
    CHECK(lines.back()["skipped_steps"] == 1);
  }
  SECTION("finite loss with NaN gradients is skipped too") {
    auto m = make_model(1);
    FaultyObjective obj(m);
    auto w = m->fc->weight;
    obj.corrupt = [&](int64_t call, torch::Tensor l) {
      return call == 1 ? l + torch::sqrt(w.sum() * 0.0) : l;  // value 0, gradient 0 * inf = NaN
    };
    tr::VectorBatchSource src(data);
    auto opt = base_options();
    opt.max_steps = 2;
    std::vector<tr::StepReport> reps;
    tr::TrainHooks hooks;
    hooks.on_step = [&](const tr::StepReport& r) { reps.push_back(r); };
    auto init = toy::snapshot(*m);
    tr::run_training(*m, obj, src, nullptr, opt, hooks);
    CHECK(reps[0].skipped);
    CHECK(reps[0].skip_reason == "non-finite grad norm");
    CHECK_FALSE(reps[1].skipped);
  }
  SECTION("max_bad_steps non-finite steps in a row end the run") {
    auto m = make_model(1);
    FaultyObjective obj(m);
    obj.corrupt = [](int64_t call, torch::Tensor l) { return call >= 2 ? l * INFINITY : l; };
    tr::VectorBatchSource src(data);
    auto opt = base_options();
    opt.max_steps = 10;
    opt.max_bad_steps = 3;
    CHECK_THROWS_WITH(tr::run_training(*m, obj, src, nullptr, opt),
                      Catch::Contains("training stopped at step 4") && Catch::Contains("3 steps in a row"));
  }
}

TEST_CASE("fp16 loss scaling: an overflow skips the step and halves the scale", "[loop][precision]") {
  auto data = toy::make_batches(4, 2, 8, 11);
  auto m = make_model(2);
  FaultyObjective obj(m);
  // 1e35 is finite in fp32, but times the 2^16 scale it overflows: grads become inf.
  obj.corrupt = [](int64_t call, torch::Tensor l) { return call == 2 ? l * 1e35 : l; };
  tr::VectorBatchSource src(data);
  auto opt = base_options();
  opt.precision = tr::Precision::fp16;
  opt.max_steps = 3;
  opt.output_dir = fresh_dir("fp16");
  std::vector<tr::StepReport> reps;
  std::vector<std::map<std::string, torch::Tensor>> snaps;
  tr::TrainHooks hooks;
  hooks.on_step = [&](const tr::StepReport& r) { reps.push_back(r); snaps.push_back(toy::snapshot(*m)); };
  auto res = tr::run_training(*m, obj, src, nullptr, opt, hooks);
  CHECK(res.steps == 3);
  CHECK(reps[1].skipped);
  CHECK(reps[1].skip_reason == "fp16 overflow");
  for (const auto& [n, t] : snaps[0]) CHECK(torch::equal(t, snaps[1][n]));
  auto lines = read_jsonl(opt.output_dir / "metrics.jsonl");
  REQUIRE(lines.size() == 3);
  CHECK(lines[0]["loss_scale"] == 65536.0);
  CHECK(lines[1]["loss_scale"] == 32768.0);
  CHECK(lines[2]["loss_scale"] == 32768.0);
}

TEST_CASE("bf16 weights train through fp32 masters", "[loop][precision]") {
  // With lr 1e-4 each SGD update is far below bf16's resolution near 1.0 (2^-8), so bf16 weights
  // alone would never move; the fp32 master accumulates the updates and the copy moves.
  auto data = toy::make_batches(2, 1, 6, 13);
  auto m = make_model(4);
  m->to(torch::kBFloat16);
  for (auto& p : m->parameters()) p.set_requires_grad(false);
  auto bias = m->norm->bias;  // bf16 zeros at init
  m->norm->weight.set_requires_grad(true);
  {
    torch::NoGradGuard ng;
    m->norm->weight.fill_(1.0);
  }
  toy::LMObjective obj(m);
  tr::VectorBatchSource src(data);
  auto opt = base_options();
  opt.optimizer.name = "sgd";
  opt.optimizer.lr = 1e-4;
  opt.schedule.type = "constant";
  opt.schedule.warmup_steps = 0;
  opt.max_grad_norm = 0;
  opt.precision = tr::Precision::bf16;
  opt.max_steps = 1;
  // One step: the update is below bf16 resolution, so the bf16 weight has not moved.
  tr::run_training(*m, obj, src, nullptr, opt);
  CHECK(torch::all(m->norm->weight == 1.0).item<bool>());
  opt.max_steps = 400;
  tr::run_training(*m, obj, src, nullptr, opt);
  CHECK(m->norm->weight.scalar_type() == torch::kBFloat16);
  CHECK_FALSE(torch::all(m->norm->weight == 1.0).item<bool>());  // accumulated in fp32, then visible
}

namespace {
struct ResumeSetup {
  torch::ScalarType dtype;
  std::string optimizer;
};

tr::TrainResult resume_run(const fs::path& dir, uint64_t init_seed, ResumeSetup setup,
                           std::function<bool(int64_t)> stop, const std::string& resume,
                           std::map<std::string, torch::Tensor>* weights) {
  auto m = make_model(init_seed, 0.3);  // dropout: resume must restore the RNG
  if (setup.dtype != torch::kFloat32) m->to(setup.dtype);
  toy::LMObjective obj(m);
  tr::VectorBatchSource src(toy::make_batches(10, 2, 8, 21), /*shuffle=*/true, /*seed=*/7);
  tr::VectorBatchSource eval(toy::make_batches(3, 2, 8, 22));
  auto opt = base_options();
  opt.optimizer.name = setup.optimizer;
  opt.optimizer.momentum = 0.9;
  opt.precision = setup.dtype == torch::kBFloat16 ? tr::Precision::bf16 : tr::Precision::fp32;
  opt.output_dir = dir;
  opt.gradient_accumulation_steps = 2;  // 5 steps per epoch
  opt.num_epochs = 2;
  opt.logging_steps = 2;
  opt.eval_steps = 3;
  opt.save_steps = 3;
  opt.save_on_stop = false;  // behave like a kill: only checkpoint-6 survives a stop at step 7
  opt.resume = resume;
  opt.plot = true;
  tr::TrainHooks hooks;
  hooks.should_stop = stop;
  auto r = tr::run_training(*m, obj, src, &eval, opt, hooks);
  if (weights) *weights = toy::snapshot(*m);
  return r;
}
}  // namespace

TEST_CASE("a run interrupted and resumed ends bitwise identical", "[loop][resume]") {
  for (ResumeSetup setup : {ResumeSetup{torch::kFloat32, "adamw"}, ResumeSetup{torch::kBFloat16, "sgd"}}) {
    INFO("dtype " << c10::toString(setup.dtype) << ", optimizer " << setup.optimizer);
    auto dir_a = fresh_dir("resume_a"), dir_b = fresh_dir("resume_b");
    std::map<std::string, torch::Tensor> wa, wc;
    auto ra = resume_run(dir_a, 1, setup, nullptr, "", &wa);
    CHECK(ra.steps == 10);
    auto rb = resume_run(dir_b, 1, setup, [](int64_t s) { return s == 7; }, "", nullptr);
    CHECK(rb.stopped_early);
    CHECK(rb.steps == 7);
    // A differently initialised model and a fresh data source: everything must come from checkpoint-6.
    auto rc = resume_run(dir_b, 999, setup, nullptr, "auto", &wc);
    CHECK(rc.resumed_from_step == 6);
    CHECK(rc.steps == 10);
    for (const auto& [n, t] : wa) {
      INFO(n);
      CHECK(torch::equal(t, wc[n]));
    }
    // The logged history is identical too (lines after the checkpoint were rewritten).
    auto la = read_jsonl(dir_a / "metrics.jsonl"), lb = read_jsonl(dir_b / "metrics.jsonl");
    REQUIRE(la.size() == lb.size());
    for (size_t i = 0; i < la.size(); ++i) {
      INFO("line " << i << ": " << la[i].dump());
      CHECK(la[i]["step"] == lb[i]["step"]);
      for (const char* k : {"loss", "lr", "grad_norm", "tokens", "epoch", "eval_loss"})
        if (la[i].contains(k)) CHECK(la[i][k] == lb[i][k]);
    }
    CHECK(rc.last_eval_loss == ra.last_eval_loss);
  }
}

TEST_CASE("metrics.jsonl, eval numbers and the loss plot", "[loop][metrics]") {
  auto dir = fresh_dir("metrics");
  auto m = make_model(5);
  toy::LMObjective obj(m);
  tr::VectorBatchSource src(toy::make_batches(4, 2, 8, 31));
  auto eval_batches = toy::make_batches(3, 2, 8, 32);
  tr::VectorBatchSource eval(eval_batches);
  auto opt = base_options();
  opt.output_dir = dir;
  opt.max_steps = 6;
  opt.logging_steps = 2;
  opt.eval_steps = 3;
  opt.plot = true;
  auto res = tr::run_training(*m, obj, src, &eval, opt);
  auto lines = read_jsonl(dir / "metrics.jsonl");
  int train_lines = 0, eval_lines = 0;
  for (const auto& l : lines) {
    if (l.contains("eval_loss")) {
      ++eval_lines;
      CHECK(l["eval_perplexity"].get<double>() == Approx(std::exp(l["eval_loss"].get<double>())));
      continue;
    }
    ++train_lines;
    for (const char* k : {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s",
                          "peak_rss_mib", "token_accuracy"}) {
      INFO(k);
      CHECK(l.contains(k));
    }
    CHECK(l["step"].get<int64_t>() % 2 == 0);
  }
  CHECK(train_lines == 3);
  CHECK(eval_lines == 2);  // steps 3 and 6
  // The last eval loss is the token-weighted mean over the eval set with the final weights.
  m->eval();
  torch::NoGradGuard ng;
  double sum = 0, count = 0;
  for (const auto& b : eval_batches) {
    sum += obj.compute(b, 1.0).loss.item<double>();
    count += llmtune::train::count_target_tokens(b);
  }
  CHECK(res.last_eval_loss == Approx(sum / count).epsilon(1e-9));
  std::ifstream svg(dir / "loss.svg");
  REQUIRE(svg.good());
  std::string text((std::istreambuf_iterator<char>(svg)), std::istreambuf_iterator<char>());
  CHECK(text.rfind("<svg", 0) == 0);
  CHECK(text.find("id=\"train_loss\"") != std::string::npos);
  CHECK(text.find("id=\"eval_loss\"") != std::string::npos);
  CHECK(text.find("id=\"lr\"") != std::string::npos);
  CHECK(text.find("learning rate") != std::string::npos);
}

TEST_CASE("checkpoint rotation and write failures", "[loop][checkpoint]") {
  auto data = toy::make_batches(4, 2, 8, 41);
  SECTION("save_total_limit keeps the newest") {
    auto dir = fresh_dir("rotate");
    auto m = make_model(6);
    toy::LMObjective obj(m);
    tr::VectorBatchSource src(data);
    auto opt = base_options();
    opt.output_dir = dir;
    opt.max_steps = 5;
    opt.save_steps = 1;
    opt.save_total_limit = 2;
    auto res = tr::run_training(*m, obj, src, nullptr, opt);
    auto cks = tr::list_checkpoints(dir);
    REQUIRE(cks.size() == 2);
    CHECK(cks[0].filename() == "checkpoint-4");
    CHECK(cks[1].filename() == "checkpoint-5");
    CHECK(res.last_checkpoint == cks[1]);
    for (const char* f : {"trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"})
      CHECK(fs::exists(cks[1] / f));
    int entries = 0;
    for (const auto& e : fs::directory_iterator(dir)) entries += e.path().filename().string().find(".tmp-") != std::string::npos;
    CHECK(entries == 0);
    CHECK(tr::resolve_resume(dir, "auto") == cks[1]);
    CHECK_THROWS_WITH(tr::resolve_resume(dir, (dir / "nope").string()), Catch::Contains("not a directory"));
  }
  SECTION("a failed write leaves earlier checkpoints intact and says so") {
    auto dir = fresh_dir("fail");
    auto m = make_model(6);
    toy::LMObjective obj(m);
    tr::VectorBatchSource src(data);
    auto opt = base_options();
    opt.output_dir = dir;
    opt.max_steps = 4;
    opt.save_steps = 2;
    tr::TrainHooks hooks;
    int saves = 0;
    hooks.save_extra = [&](const fs::path& tmp) {
      std::ofstream(tmp / "adapter_model.safetensors") << "partial";
      if (++saves == 2) throw llmtune::Error("write adapter_model.safetensors: No space left on device (simulated)");
    };
    CHECK_THROWS_WITH(tr::run_training(*m, obj, src, nullptr, opt, hooks),
                      Catch::Contains("checkpoint-4") && Catch::Contains("No space left on device") &&
                          Catch::Contains("earlier checkpoints are intact"));
    auto cks = tr::list_checkpoints(dir);
    REQUIRE(cks.size() == 1);
    CHECK(cks[0].filename() == "checkpoint-2");
    CHECK(fs::exists(cks[0] / "adapter_model.safetensors"));
    for (const auto& e : fs::directory_iterator(dir))
      CHECK(e.path().filename().string().find(".tmp-") == std::string::npos);
    // And the surviving checkpoint resumes.
    auto m2 = make_model(7);
    toy::LMObjective obj2(m2);
    tr::VectorBatchSource src2(data);
    opt.resume = "auto";
    auto r = tr::run_training(*m2, obj2, src2, nullptr, opt);
    CHECK(r.resumed_from_step == 2);
    CHECK(r.steps == 4);
  }
  SECTION("an output_dir that cannot be created is a clear error") {
    auto file = fresh_dir("blocker");
    fs::create_directories(file.parent_path());
    std::ofstream(file) << "a file, not a dir";
    auto m = make_model(6);
    toy::LMObjective obj(m);
    tr::VectorBatchSource src(data);
    auto opt = base_options();
    opt.output_dir = file / "out";
    opt.max_steps = 1;
    CHECK_THROWS_WITH(tr::run_training(*m, obj, src, nullptr, opt), Catch::Contains("cannot create output_dir"));
  }
}
