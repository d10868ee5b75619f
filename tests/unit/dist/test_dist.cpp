// lib/dist on real c10d Gloo groups, with the ranks as threads of this process (each has its own
// TCPStore client and ProcessGroupGloo; rank 0 hosts the store): collectives, the rendezvous
// timeout message, torchrun/Slurm env parsing, the ZeRO partition, and the loop under DDP,
// ZeRO-1 and ZeRO-2 against one process over the same global batch (toy LM, fp32 tolerance).
// LibTorch first, Catch2 after: c10's logging also defines CHECK, and Catch2's must win (as with the PCH).
#include "core/core.h"
#include "dist/dist.h"
#include "train/toy_lm.h"
#include "train/train.h"

#include <catch2/catch.hpp>

#include <cstdlib>
#include <functional>
#include <thread>

namespace dist = llmtune::dist;
namespace tr = llmtune::train;

namespace {

int next_port() {
  static int port = 20000 + static_cast<int>(::getpid() % 20000);
  return ++port;
}

dist::WorldInfo world(int rank, int size, int port) {
  dist::WorldInfo w;
  w.rank = rank;
  w.world_size = size;
  w.local_rank = rank;
  w.local_world_size = size;
  w.master_port = port;
  w.source = "test";
  return w;
}

// Runs fn(rank) on `size` threads; rethrows the first exception.
void on_ranks(int size, const std::function<void(int)>& fn) {
  std::vector<std::thread> ts;
  std::vector<std::exception_ptr> errs(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r)
    ts.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        errs[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : ts) t.join();
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
}

void set_env(const char* k, const char* v) { ::setenv(k, v, 1); }
void clear_world_env() {
  for (const char* k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
                        "SLURM_TASKS_PER_NODE", "SLURM_LAUNCH_NODE_IPADDR", "SLURM_JOB_NODELIST"})
    ::unsetenv(k);
}

}  // namespace

TEST_CASE("world_from_env reads torchrun's and Slurm's variables", "[dist][env]") {
  clear_world_env();
  CHECK_FALSE(dist::world_from_env().has_value());
  set_env("RANK", "3");
  set_env("WORLD_SIZE", "4");
  set_env("LOCAL_RANK", "1");
  set_env("LOCAL_WORLD_SIZE", "2");
  set_env("MASTER_ADDR", "10.1.2.3");
  set_env("MASTER_PORT", "1234");
  auto w = dist::world_from_env();
  REQUIRE(w);
  CHECK(w->source == "torchrun");
  CHECK(w->rank == 3);
  CHECK(w->world_size == 4);
  CHECK(w->local_rank == 1);
  CHECK(w->local_world_size == 2);
  CHECK(w->master_addr == "10.1.2.3");
  CHECK(w->master_port == 1234);
  set_env("RANK", "4");
  CHECK_THROWS_WITH(dist::world_from_env(), Catch::Contains("rank 4 is outside world size 4"));
  clear_world_env();

  set_env("SLURM_PROCID", "5");
  set_env("SLURM_NTASKS", "8");
  set_env("SLURM_LOCALID", "1");
  set_env("SLURM_TASKS_PER_NODE", "4(x2)");
  set_env("SLURM_JOB_NODELIST", "gpu7,gpu8");
  w = dist::world_from_env();
  REQUIRE(w);
  CHECK(w->source == "slurm");
  CHECK(w->rank == 5);
  CHECK(w->world_size == 8);
  CHECK(w->local_rank == 1);
  CHECK(w->local_world_size == 4);
  CHECK(w->master_addr == "gpu7");
  CHECK(w->master_port == 29500);
  set_env("SLURM_JOB_NODELIST", "gpu[7-8]");
  CHECK_THROWS_WITH(dist::world_from_env(), Catch::Contains("export MASTER_ADDR"));
  clear_world_env();
}

TEST_CASE("partition_params balances whole tensors deterministically", "[dist][zero]") {
  auto owner = dist::partition_params({100, 10, 60, 40, 5, 5}, 2);
  std::vector<int64_t> load(2, 0);
  const std::vector<int64_t> n = {100, 10, 60, 40, 5, 5};
  for (size_t i = 0; i < n.size(); ++i) load[static_cast<size_t>(owner[i])] += n[i];
  CHECK(load[0] == 110);  // 100 + 10 ; 60 + 40 + 5 + 5
  CHECK(load[1] == 110);
  CHECK(owner == dist::partition_params({100, 10, 60, 40, 5, 5}, 2));
  auto one = dist::partition_params({3, 2, 1}, 1);
  CHECK(one == std::vector<int>{0, 0, 0});
}

TEST_CASE("Gloo collectives on 2 ranks", "[dist][pg]") {
  // Catch2 assertions are not thread-safe: ranks record, the test thread checks.
  struct Seen {
    std::string backend;
    torch::Tensor sum, bcast, gathered;
    double scalar = 0, bytes_sent = 0;
    std::vector<std::string> bytes;
  };
  std::vector<Seen> seen(2);
  const int port = next_port();
  on_ranks(2, [&](int r) {
    auto pg = dist::init_process_group(world(r, 2, port), {});
    Seen& s = seen[static_cast<size_t>(r)];
    s.backend = pg->backend_name();
    s.sum = torch::full({5}, static_cast<float>(r + 1));
    pg->all_reduce_sum(s.sum);
    s.bcast = torch::full({3}, static_cast<float>(r == 1 ? 7 : 0));
    pg->broadcast(s.bcast, 1);
    s.gathered = torch::zeros({4});
    pg->all_gather(s.gathered, torch::full({2}, static_cast<float>(r)));
    s.scalar = pg->all_reduce_scalar(r + 0.5);
    s.bytes = pg->all_gather_bytes("rank" + std::to_string(r));
    s.bytes_sent = pg->bytes_communicated();
    pg->barrier();
  });
  for (const auto& s : seen) {
    CHECK(s.backend == "gloo");
    CHECK(torch::allclose(s.sum, torch::full({5}, 3.0f)));
    CHECK(torch::allclose(s.bcast, torch::full({3}, 7.0f)));
    CHECK(torch::allclose(s.gathered, torch::tensor({0.f, 0.f, 1.f, 1.f})));
    CHECK(s.scalar == Approx(2.0));
    CHECK(s.bytes == std::vector<std::string>{"rank0", "rank1"});
    CHECK(s.bytes_sent > 0);
  }
}

TEST_CASE("a rendezvous missing a rank fails naming it", "[dist][pg]") {
  dist::GroupOptions o;
  o.rdzv_timeout = std::chrono::milliseconds(1500);
  const int port = next_port();
  // World of 3 where rank 2 never comes.
  std::vector<std::string> messages(2);
  on_ranks(2, [&](int r) {
    try {
      dist::init_process_group(world(r, 3, port), o);
    } catch (const std::exception& e) {
      messages[static_cast<size_t>(r)] = e.what();
    }
  });
  CHECK_THAT(messages[0], Catch::Contains("missing rank(s): 2") && Catch::Contains("2 of 3 ranks arrived"));
  // Rank 1 either names the missing rank too or, if rank 0 (the store's host) gave up first, says so.
  CHECK_THAT(messages[1], Catch::Contains("missing rank(s): 2") || Catch::Contains("lost the rendezvous"));
}

TEST_CASE("a collective timeout prints every rank's last step and collective", "[dist][pg][diagnostics]") {
  dist::GroupOptions o;
  o.timeout = std::chrono::milliseconds(1500);
  const int port = next_port();
  std::string message;
  on_ranks(2, [&](int r) {
    auto pg = dist::init_process_group(world(r, 2, port), o);
    pg->note_step(r == 0 ? 7 : 6);
    pg->barrier();
    if (r == 1) {  // rank 1 "stalls": it never joins the next all-reduce, then leaves
      std::this_thread::sleep_for(std::chrono::milliseconds(3000));
      return;
    }
    auto t = torch::ones({4});
    try {
      pg->all_reduce_sum(t);
    } catch (const llmtune::Error& e) {
      message = e.what();
      message += "\n" + pg->diagnostics();
    }
  });
  CHECK_THAT(message, Catch::Contains("collective all_reduce(4) failed on rank 0"));
  CHECK_THAT(message, Catch::Contains("rank 0: last completed step 7"));
  CHECK_THAT(message, Catch::Contains("rank 1: last completed step 6, in collective #1 barrier"));
}

// ---- the loop, distributed vs one process --------------------------------------------------------

namespace {

tr::TrainOptions loop_options(int64_t accum, int rank, int world_size) {
  tr::TrainOptions o;
  o.optimizer.lr = 1e-2;
  o.optimizer.weight_decay = 0.01;
  o.schedule.type = "cosine";
  o.schedule.warmup_steps = 1;
  o.max_steps = 5;
  o.gradient_accumulation_steps = accum;
  o.max_grad_norm = 0.5;  // clipping active: exercises the (sharded) global norm
  o.logging_steps = 1;
  o.progress = false;
  o.plot = false;
  o.rank = rank;
  o.world_size = world_size;
  return o;
}

std::map<std::string, torch::Tensor> train_single(const std::vector<tr::Batch>& batches, int64_t accum,
                                                  const std::string& optimizer) {
  torch::manual_seed(11);
  toy::ToyLM m(32, 16, 0.0);
  toy::LMObjective obj(m);
  tr::VectorBatchSource src(batches);
  auto o = loop_options(accum, 0, 1);
  o.optimizer.name = optimizer;
  o.optimizer.momentum = 0.9;
  tr::run_training(*m, obj, src, nullptr, o);
  return toy::snapshot(*m);
}

std::vector<std::map<std::string, torch::Tensor>> train_ranks(const std::vector<tr::Batch>& batches, int world_size,
                                                              int64_t accum, int zero_stage,
                                                              const std::string& optimizer) {
  std::vector<std::map<std::string, torch::Tensor>> out(static_cast<size_t>(world_size));
  const int port = next_port();
  // Models are built here, not in the rank threads (the global generator is shared). Ranks > 0
  // start from other weights on purpose: attach() broadcasts rank 0's.
  std::vector<toy::ToyLM> models;
  for (int r = 0; r < world_size; ++r) {
    torch::manual_seed(11 + 100 * r);
    models.emplace_back(32, 16, 0.0);
  }
  on_ranks(world_size, [&](int r) {
    toy::ToyLM m = models[static_cast<size_t>(r)];
    toy::LMObjective obj(m);
    std::vector<tr::Batch> mine;  // batch k goes to rank k % world_size (lib/data's sharding)
    for (size_t k = static_cast<size_t>(r); k < batches.size(); k += static_cast<size_t>(world_size))
      mine.push_back(batches[k]);
    tr::VectorBatchSource src(mine);
    dist::ParallelOptions po;
    po.zero_stage = zero_stage;
    po.bucket_bytes = 600 * 4;  // several buckets for the toy model
    auto par = dist::make_parallel(world(r, world_size, port), po);
    tr::TrainHooks hooks;
    par->attach(*m, hooks);
    auto o = loop_options(accum, r, world_size);
    o.optimizer.name = optimizer;
    o.optimizer.momentum = 0.9;
    tr::run_training(*m, obj, src, nullptr, o, hooks);
    par->barrier();
    out[static_cast<size_t>(r)] = toy::snapshot(*m);
  });
  return out;
}

void check_close(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  REQUIRE(a.size() == b.size());
  for (const auto& [name, t] : a) {
    INFO(name);
    CHECK(torch::allclose(t, b.at(name), 1e-4, 1e-5));
  }
}

}  // namespace

TEST_CASE("DDP and ZeRO-1/2 on 2 ranks equal one process over the global batch", "[dist][loop]") {
  auto batches = toy::make_batches(40, 2, 12, 5);
  // One process: micro-batches 0..3 form step 1 (accum 4); two ranks with accum 2 see 0,2 and 1,3.
  auto single = train_single(batches, 4, "adamw");
  for (int stage : {0, 1, 2}) {
    DYNAMIC_SECTION("zero_stage " << stage) {
      auto ranks = train_ranks(batches, 2, 2, stage, "adamw");
      check_close(ranks[0], single);
      check_close(ranks[1], single);
    }
  }
}

TEST_CASE("ZeRO-2 with SGD momentum and 3 ranks matches one process", "[dist][loop][zero]") {
  auto batches = toy::make_batches(30, 2, 10, 9);
  auto single = train_single(batches, 3, "sgd");
  auto ranks = train_ranks(batches, 3, 1, 2, "sgd");
  for (const auto& r : ranks) check_close(r, single);
}
