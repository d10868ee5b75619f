// llmtune::dist — multi-process training on PyTorch's own c10d: the `llmtune launch` worker
// launcher (torchrun's environment contract), world discovery (torchrun / Slurm env), process
// groups (Gloo on CPU, NCCL on CUDA) with per-rank hang diagnostics, DDP gradient buckets that
// all-reduce during backward, and a ZeRO-1/2 sharded optimizer. The training loop stays dist-free:
// this module plugs into it through train::TrainHooks and the train::Parallel seam.
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "train/train.h"

namespace c10d {
class Backend;
class Store;
}  // namespace c10d

namespace llmtune::model {
class TransformerImpl;
}  // namespace llmtune::model

namespace llmtune::dist {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Who am I: from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT) or, failing those, Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
// SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE, SLURM_LAUNCH_NODE_IPADDR or the first host of
// SLURM_JOB_NODELIST; port MASTER_PORT or 29500).
struct WorldInfo {
  int rank = 0, world_size = 1, local_rank = 0, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "single";  // "torchrun" (also `llmtune launch`), "slurm" or "single"
};
// nullopt when neither contract is present (a plain single-process run). Error on inconsistent values.
std::optional<WorldInfo> world_from_env();

// ---------------------------------------------------------------------------------------------
// The launcher: `llmtune launch --nproc-per-node N [--nnodes M --node-rank R --master-addr H
// --master-port P] -- SUBCOMMAND ARGS...`.
struct LaunchOptions {
  int nproc_per_node = 1;
  int nnodes = 1, node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::vector<std::string> command;  // argv after `--`; argv[0] is run as this executable's subcommand
  std::string executable;            // defaults to /proc/self/exe
  fs::path log_dir;                  // non-empty: also write each rank's output to log_dir/rank-<r>.log
  double rdzv_timeout_s = 300;       // exported as LLMTUNE_RDZV_TIMEOUT for the workers' rendezvous
  int tail_lines = 20;               // lines of a dead worker's output repeated in the failure report
  double grace_s = 10;               // SIGTERM → SIGKILL delay when stopping the other workers
};
// Runs the workers to completion. Returns 0 when all exit 0; otherwise the first failed worker's
// exit code (128+signal when killed), after stopping the others and printing its last lines.
int launch(const LaunchOptions& options);

// ---------------------------------------------------------------------------------------------
// Process group: a c10d backend plus a record of the last completed step and collective, printed
// by every rank when a collective fails or times out (ddp_timeout).
struct GroupOptions {
  std::string backend;  // "gloo" | "nccl" | "" (nccl when CUDA is available, else gloo)
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};       // collectives (ddp_timeout)
  std::chrono::milliseconds rdzv_timeout{std::chrono::minutes(5)};   // every rank must arrive by then
};

class ProcessGroup {
 public:
  ProcessGroup(const WorldInfo& world, const GroupOptions& options);
  ~ProcessGroup();
  int rank() const { return world_.rank; }
  int world_size() const { return world_.world_size; }
  const WorldInfo& world() const { return world_; }
  const std::string& backend_name() const { return backend_name_; }
  torch::Device device() const { return device_; }

  // Blocking collectives (tensors are contiguous; on NCCL they live on device()).
  void all_reduce_sum(torch::Tensor& t);
  void broadcast(torch::Tensor& t, int root);
  void reduce_sum(torch::Tensor& t, int root);
  void all_gather(torch::Tensor& out, const torch::Tensor& in);  // out = cat of every rank's in
  void barrier();
  void send(torch::Tensor& t, int dst);
  void recv(torch::Tensor& t, int src);
  double all_reduce_scalar(double v);
  // Rank r's bytes for every r (through the store; small payloads such as JSON).
  std::vector<std::string> all_gather_bytes(const std::string& mine);

  // Asynchronous all-reduce (sum) for gradient buckets: returns a handle to wait() on.
  class Pending {
   public:
    Pending() = default;
    void wait();
    bool valid() const { return static_cast<bool>(work_); }
   private:
    friend class ProcessGroup;
    std::shared_ptr<void> work_;
    ProcessGroup* pg_ = nullptr;
    std::string what_;
  };
  Pending all_reduce_sum_async(torch::Tensor& t, const std::string& what);

  // Diagnostics: the loop's progress and the last collective, kept for hang reports.
  void note_step(int64_t step) { last_step_ = step; }
  int64_t last_step() const { return last_step_; }
  std::string diagnostics() const;
  // Bytes this rank has sent into collectives since construction (payload size, per the
  // ring-algorithm volume: all-reduce 2(n-1)/n, all-gather/reduce-scatter (n-1)/n, broadcast 1).
  double bytes_communicated() const { return bytes_; }

 private:
  void run(const std::string& what, const std::function<void()>& fn);
  [[noreturn]] void fail_collective(const std::string& what, const std::string& error);
  WorldInfo world_;
  GroupOptions options_;
  std::string backend_name_;
  torch::Device device_{torch::kCPU};
  std::shared_ptr<void> store_holder_;   // c10::intrusive_ptr<c10d::Store> kept alive
  std::shared_ptr<void> backend_holder_;  // c10::intrusive_ptr<c10d::Backend>
  c10d::Store* store_ = nullptr;
  c10d::Backend* backend_ = nullptr;
  int64_t last_step_ = 0, collectives_ = 0, gather_seq_ = 0;
  std::string last_collective_ = "(none)";
  double bytes_ = 0;
};

// Connects to the rendezvous (TCPStore at master_addr:master_port, rank 0 hosts it) and waits for
// every rank; on timeout the Error names the ranks that never arrived.
std::shared_ptr<ProcessGroup> init_process_group(const WorldInfo& world, const GroupOptions& options);

// ---------------------------------------------------------------------------------------------
// DDP: trainable parameters in ~bucket_bytes buckets (reverse registration order, the order their
// gradients are produced). On the final micro-batch of an accumulation group each parameter's
// post-accumulate hook copies its finished gradient into its bucket and a full bucket starts its
// all-reduce while backward continues; earlier micro-batches only accumulate locally (no_sync).
class GradBuckets {
 public:
  GradBuckets(std::shared_ptr<ProcessGroup> pg, const train::NamedTensors& trainable, int64_t bucket_bytes);
  ~GradBuckets();
  void arm(bool last_micro);  // before each backward
  // After backward: waits for the buckets and writes the summed gradients into `grads` (same order
  // and count as the trainable list).
  void finish(std::vector<torch::Tensor>& grads);
  size_t num_buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<size_t> members;      // indices into params_
    std::vector<int64_t> offsets;     // element offset of each member in flat
    torch::Tensor flat;               // fp32
    size_t ready = 0;
    ProcessGroup::Pending pending;
  };
  void on_grad(size_t index);  // after AccumulateGrad wrote params_[index].grad()
  void launch_ready();  // starts ready buckets in index order (the same collective order on every rank)
  std::shared_ptr<ProcessGroup> pg_;
  std::vector<torch::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<size_t> bucket_of_;
  std::vector<bool> seen_;
  std::vector<Bucket> buckets_;
  size_t next_launch_ = 0;
  bool armed_ = false;
  std::shared_ptr<bool> alive_;
};

// ---------------------------------------------------------------------------------------------
// ZeRO-1/2: each parameter is owned by one rank (greedy balance by size, deterministic); that rank
// alone keeps its optimizer state and updates it; after the step owners broadcast the new values.
// Checkpoints gather the full state on rank 0 (state_tensors() is a collective), and load_state
// takes a full state, so a run resumes at any world size.
std::vector<int> partition_params(const std::vector<int64_t>& numels, int world_size);

class ShardedOptimizer : public train::Optimizer {
 public:
  // `owner`: parameter name → rank (partition_params over the trainable list, the same on every rank).
  // `publish`: the parameters whose owner broadcasts them after the step (every rank keeps them
  // whole); nullopt = all of them (ZeRO-1/2). ZeRO-3 publishes only the parameters outside the
  // sharded layers, since the layers' parameters are gathered when they are used.
  ShardedOptimizer(std::shared_ptr<ProcessGroup> pg, const train::OptimizerOptions& options,
                   std::vector<train::ParamGroup> groups, std::map<std::string, int> owner,
                   std::optional<std::set<std::string>> publish = std::nullopt);
  void step(double lr) override;
  train::NamedTensors state_tensors() const override;
  nlohmann::json state_scalars() const override;
  void load_state(const std::map<std::string, torch::Tensor>& tensors, const nlohmann::json& scalars) override;
  int owner(const std::string& param) const { return owner_.at(param); }
  bool owns(const std::string& param) const { return owner_.at(param) == pg_->rank(); }
  const train::Optimizer& local() const { return *inner_; }

 private:
  std::shared_ptr<ProcessGroup> pg_;
  std::unique_ptr<train::Optimizer> inner_;
  std::map<std::string, int> owner_;
  std::vector<std::pair<std::string, torch::Tensor>> all_;  // every published param, in group order
  mutable nlohmann::json gathered_scalars_;  // filled by state_tensors() for state_scalars()
};

// ---------------------------------------------------------------------------------------------
// ZeRO-3 (fully sharded): every decoder layer is a unit whose parameters (trainable and frozen,
// partitioned separately, greedy by size) are spread over the ranks; a rank keeps only its own and
// the others are empty tensors. The model's layer runner all-gathers a unit before its forward and
// frees it after; backward gathers it again, recomputes the layer (RNG state restored), and reduces
// each trainable parameter's gradient to its owner, which alone keeps gradient, master and optimizer
// state. Parameters outside the layers (embeddings, final norm, untied lm head) stay whole on every
// rank; their gradients and optimizer states are partitioned as in ZeRO-2.
class ShardedLayers {
 public:
  ShardedLayers(std::shared_ptr<ProcessGroup> pg, model::TransformerImpl& model);
  ~ShardedLayers();
  ShardedLayers(const ShardedLayers&) = delete;
  ShardedLayers& operator=(const ShardedLayers&) = delete;
  // For parameters of the model (matched by tensor identity, so any wrapper's names work).
  bool in_layers(const torch::Tensor& param) const;
  bool is_local(const torch::Tensor& param) const;  // true for everything outside the layers
  // Rank 0 receives every parameter whole (a collective), or frees what it does not own again.
  void gather_on_main(bool whole);
  // Bytes of layer parameters this rank keeps, and the largest unit (what a gather materialises).
  int64_t local_bytes() const;
  int64_t max_unit_bytes() const;

  struct Impl;  // defined in fsdp.cpp; public so its autograd nodes can hold it

 private:
  std::shared_ptr<Impl> impl_;  // shared with the layer runner's autograd nodes
};

// Gathers named tensors held by different ranks onto rank 0 (a collective): each name is taken from
// the lowest rank that holds it. Other ranks get an empty list.
train::NamedTensors gather_named_to_main(ProcessGroup& pg, const train::NamedTensors& local);

// ---------------------------------------------------------------------------------------------
// The train::Parallel implementation, from the recipe (ddp_backend, ddp_timeout, zero_stage /
// deepspeed / fsdp, ddp_bucket_cap_mb) and the environment. Installed into train by install().
struct ParallelOptions {
  GroupOptions group;
  int zero_stage = 0;          // 0 DDP, 1 optimizer states, 2 + gradients, 3 + parameters
  int64_t bucket_bytes = 25 << 20;
  fs::path log_dir;            // LLMTUNE_RANK_LOG_DIR: every rank also logs to log_dir/rank-<r>.log
};
ParallelOptions parallel_options_from_recipe(const config::Recipe& recipe);
std::unique_ptr<train::Parallel> make_parallel(const WorldInfo& world, const ParallelOptions& options);

// Registers make_parallel as train's parallel factory (the llmtune binary calls it at start-up).
void install();

}  // namespace llmtune::dist
