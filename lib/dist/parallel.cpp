// train::Parallel on c10d: reads the recipe's distributed keys, joins the process group, and fills
// the loop's hooks: reduce_sum (all-reduce of scalars), DDP buckets (zero_stage 0/1) or owner-reduced
// partitioned gradients (zero_stage 2), the sharded optimizer (1/2), a clip that sums partitioned
// norms, a stop flag every rank agrees on, and step notes for hang diagnostics.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "config/config.h"
#include "core/core.h"
#include "dist/dist.h"
#include "dist/dist_impl.h"
#include "model/model.h"

namespace llmtune::dist {
namespace {

// Global-norm clipping when each gradient lives on one rank only (ZeRO-2/3): squared norms of the
// gradients held here are summed over ranks. Emptied gradients (another owner's) are skipped.
std::function<double(const std::vector<torch::Tensor>&, double)> partitioned_clip(std::shared_ptr<ProcessGroup> pg) {
  return [pg](const std::vector<torch::Tensor>& params, double max_norm) {
    torch::NoGradGuard ng;
    double local = 0;
    std::vector<torch::Tensor> grads;
    for (const auto& p : params)
      if (p.grad().defined() && p.grad().numel() > 0) {
        grads.push_back(p.grad());
        local += p.grad().to(torch::kFloat64).pow(2).sum().item<double>();
      }
    const double norm = std::sqrt(pg->all_reduce_scalar(local));
    if (max_norm > 0 && std::isfinite(norm)) {
      const double coef = max_norm / (norm + 1e-6);
      if (coef < 1.0)
        for (auto& g : grads) g.mul_(coef);
    }
    return norm;
  };
}

model::TransformerImpl* find_transformer(torch::nn::Module& root) {
  if (auto* t = dynamic_cast<model::TransformerImpl*>(&root)) return t;
  for (const auto& m : root.modules(/*include_self=*/false))
    if (auto* t = dynamic_cast<model::TransformerImpl*>(m.get())) return t;
  return nullptr;
}

class C10dParallel : public train::Parallel {
 public:
  C10dParallel(const WorldInfo& world, const ParallelOptions& o) : options_(o) {
    pg_ = init_process_group(world, o.group);
    // Printed by every rank (ranks > 0 otherwise log warnings only): who is who, for users and tests.
    std::fprintf(stderr, "dist: rank %d of %d joined (pid %ld, local rank %d)\n", world.rank, world.world_size,
                 static_cast<long>(::getpid()), world.local_rank);
    std::fflush(stderr);
    if (world.rank == 0)
      log::info(fmt::format("dist: {} ranks ({} environment), backend {}, {}", world.world_size, world.source,
                            pg_->backend_name(),
                            o.zero_stage == 0 ? std::string("DDP") : fmt::format("ZeRO stage {}", o.zero_stage)));
  }
  ~C10dParallel() override {
    // One line per rank for benchmarks and post-mortems (scripts/bench/dist.py parses it).
    std::fprintf(stderr, "dist: rank %d summary: peak_rss_mib %.1f, collectives_sent_mib %.1f, steps %lld\n",
                 pg_->rank(), static_cast<double>(peak_rss_bytes()) / (1 << 20), pg_->bytes_communicated() / (1 << 20),
                 static_cast<long long>(pg_->last_step()));
    std::fflush(stderr);
  }

  int rank() const override { return pg_->rank(); }
  int world_size() const override { return pg_->world_size(); }
  int local_rank() const override { return pg_->world().local_rank; }
  torch::Device device() const override { return pg_->device(); }
  void barrier() override { pg_->barrier(); }

  void attach(torch::nn::Module& model, train::TrainHooks& hooks) override {
    torch::NoGradGuard no_grad;
    train::NamedTensors trainable;
    std::vector<int64_t> numels;
    for (const auto& item : model.named_parameters(true))
      if (item.value().requires_grad()) {
        trainable.emplace_back(item.key(), item.value());
        numels.push_back(item.value().numel());
      }
    // Same starting point on every rank (DDP's initial broadcast from rank 0).
    for (auto& [name, p] : trainable) {
      torch::Tensor t = p.detach().to(torch::TensorOptions().dtype(torch::kFloat32).device(pg_->device())).contiguous();
      pg_->broadcast(t, 0);
      p.copy_(t);
    }
    auto pg = pg_;
    hooks.reduce_sum = [pg](double v) { return pg->all_reduce_scalar(v); };
    auto prev_step = hooks.on_step;
    hooks.on_step = [pg, prev_step](const train::StepReport& r) {
      pg->note_step(r.step);
      if (prev_step) prev_step(r);
    };
    auto prev_stop = hooks.should_stop;
    hooks.should_stop = [pg, prev_stop](int64_t step) {
      const bool mine = prev_stop && prev_stop(step);
      return pg->all_reduce_scalar(mine ? 1.0 : 0.0) > 0;  // every rank stops at the same step
    };

    if (options_.zero_stage == 3) {
      attach_fully_sharded(model, trainable, hooks);
      return;
    }
    std::map<std::string, int> owner;
    if (options_.zero_stage >= 1) {
      auto part = partition_params(numels, pg_->world_size());
      for (size_t i = 0; i < trainable.size(); ++i) owner[trainable[i].first] = part[i];
      hooks.make_optimizer = [pg, owner](const train::OptimizerOptions& o, std::vector<train::ParamGroup> groups) {
        return std::unique_ptr<train::Optimizer>(new ShardedOptimizer(pg, o, std::move(groups), owner));
      };
    }
    if (options_.zero_stage <= 1) {
      buckets_ = std::make_shared<GradBuckets>(pg_, trainable, options_.bucket_bytes);
      auto b = buckets_;
      hooks.before_backward = [b](bool last) { b->arm(last); };
      hooks.reduce_gradients = [b](std::vector<torch::Tensor>& grads) { b->finish(grads); };
    } else {
      // ZeRO-2: each owner receives the sum of its parameters' gradients; the others drop theirs.
      std::vector<int> owners;
      for (const auto& [name, p] : trainable) owners.push_back(owner.at(name));
      const size_t n = trainable.size();
      hooks.reduce_gradients = [pg, owners, n](std::vector<torch::Tensor>& grads) {
        if (grads.size() != n)
          fail("ZeRO-2: {} of {} trainable parameters received a gradient on rank {}; unused parameters are not "
               "supported", grads.size(), n, pg->rank());
        reduce_to_owners(*pg, grads, owners);
      };
      hooks.clip_gradients = partitioned_clip(pg);
    }
  }

  void unshard_model() override {
    if (sharded_) sharded_->gather_on_main(true);
  }

 private:
  // ZeRO-3: decoder layers sharded (lib/dist/fsdp.cpp); what stays outside them (embeddings, final
  // norm, untied lm head) is whole on every rank with ZeRO-2 treatment (owner-reduced gradients,
  // owner-updated, broadcast after the step).
  void attach_fully_sharded(torch::nn::Module& model, const train::NamedTensors& trainable, train::TrainHooks& hooks) {
    model::TransformerImpl* tf = find_transformer(model);
    if (!tf) fail("zero_stage 3 / fsdp: the model being trained has no llmtune transformer to shard");
    sharded_ = std::make_shared<ShardedLayers>(pg_, *tf);
    auto pg = pg_;
    auto sharded = sharded_;
    std::map<std::string, bool> local;
    std::vector<std::string> root;  // trainable names outside the layers, in registration order
    std::vector<int64_t> root_numels;
    for (const auto& [name, p] : trainable) {
      local[name] = sharded->is_local(p);
      if (!sharded->in_layers(p)) {
        root.push_back(name);
        root_numels.push_back(p.numel());
      }
    }
    const auto root_owner = partition_params(root_numels, pg->world_size());
    std::map<std::string, int> owner;
    std::set<std::string> publish(root.begin(), root.end());
    for (size_t i = 0; i < root.size(); ++i) owner[root[i]] = root_owner[i];
    std::vector<int> grad_owner;  // per local trainable, in the loop's order
    for (const auto& [name, p] : trainable) {
      if (!local.at(name)) continue;
      auto it = owner.find(name);
      grad_owner.push_back(it != owner.end() ? it->second : -1);
      if (it == owner.end()) owner[name] = pg->rank();
    }
    hooks.is_local = [local](const std::string& name) {
      auto it = local.find(name);
      return it == local.end() || it->second;
    };
    hooks.make_optimizer = [pg, owner, publish](const train::OptimizerOptions& o, std::vector<train::ParamGroup> groups) {
      return std::unique_ptr<train::Optimizer>(new ShardedOptimizer(pg, o, std::move(groups), owner, publish));
    };
    hooks.reduce_gradients = [pg, grad_owner](std::vector<torch::Tensor>& grads) {
      if (grads.size() != grad_owner.size())
        fail("ZeRO-3: {} of {} local trainable parameters received a gradient on rank {}; unused parameters are not "
             "supported", grads.size(), grad_owner.size(), pg->rank());
      reduce_to_owners(*pg, grads, grad_owner);
    };
    hooks.clip_gradients = partitioned_clip(pg);
    hooks.gather_to_main = [pg](const train::NamedTensors& mine) { return gather_named_to_main(*pg, mine); };
    hooks.unshard = [sharded](bool whole) { sharded->gather_on_main(whole); };
    log::info(fmt::format("ZeRO-3: {} decoder layers sharded over {} ranks; this rank keeps {:.1f} MiB of their "
                          "parameters, a gathered layer takes {:.1f} MiB; {} parameters outside the layers stay whole",
                          tf->decoder->layer_list.size(), pg->world_size(),
                          static_cast<double>(sharded->local_bytes()) / (1 << 20),
                          static_cast<double>(sharded->max_unit_bytes()) / (1 << 20), root.size()));
  }

  ParallelOptions options_;
  std::shared_ptr<ShardedLayers> sharded_;
  std::shared_ptr<ProcessGroup> pg_;
  std::shared_ptr<GradBuckets> buckets_;
};

}  // namespace

void reduce_to_owners(ProcessGroup& pg, std::vector<torch::Tensor>& grads, const std::vector<int>& owners) {
  torch::NoGradGuard ng;
  for (int r = 0; r < pg.world_size(); ++r) {
    std::vector<torch::Tensor> parts;
    std::vector<size_t> idx;
    for (size_t i = 0; i < grads.size(); ++i)
      if (owners[i] == r) {
        parts.push_back(grads[i].reshape({-1}).to(torch::TensorOptions().dtype(torch::kFloat32).device(pg.device())));
        idx.push_back(i);
      }
    if (parts.empty()) continue;
    torch::Tensor flat = torch::cat(parts);
    pg.reduce_sum(flat, r);
    int64_t off = 0;
    for (size_t i : idx) {
      const int64_t k = grads[i].numel();
      if (r == pg.rank()) grads[i].copy_(flat.narrow(0, off, k).view(grads[i].sizes()));
      else grads[i].set_();  // freed: this rank never reads another owner's gradient
      off += k;
    }
  }
}

ParallelOptions parallel_options_from_recipe(const config::Recipe& r) {
  ParallelOptions o;
  o.group.backend = r.ddp_backend.value_or("");
  if (r.ddp_timeout) o.group.timeout = std::chrono::seconds(*r.ddp_timeout);
  if (const char* t = std::getenv("LLMTUNE_RDZV_TIMEOUT"); t && *t)
    o.group.rdzv_timeout = std::chrono::milliseconds(static_cast<int64_t>(std::atof(t) * 1000));
  o.zero_stage = static_cast<int>(r.zero_stage.value_or(0));
  if (!r.fsdp.empty()) {
    for (const auto& option : r.fsdp)
      if (option != "full_shard" && option != "auto_wrap" && option != "shard_grad_op")
        fail("fsdp: option '{}' is not supported; llmtune's FSDP is full_shard with one unit per decoder layer "
             "(auto_wrap); parameters are not offloaded", option);
    o.zero_stage = 3;
    if (std::find(r.fsdp.begin(), r.fsdp.end(), "shard_grad_op") != r.fsdp.end()) o.zero_stage = 2;
  }
  if (r.ddp_bucket_cap_mb) o.bucket_bytes = *r.ddp_bucket_cap_mb << 20;
  if (o.zero_stage == 3 && !r.eval_tasks.empty())
    fail("eval_tasks cannot run with zero_stage 3 / fsdp: rank 0 runs them alone, and every sharded layer needs all "
         "ranks to gather it; evaluate the saved checkpoints with `llmtune eval` instead, or use zero_stage 2");
  return o;
}

std::unique_ptr<train::Parallel> make_parallel(const WorldInfo& world, const ParallelOptions& options) {
  return std::make_unique<C10dParallel>(world, options);
}

void install() {
  train::set_parallel_factory([](const config::Recipe& recipe) -> std::unique_ptr<train::Parallel> {
    auto world = world_from_env();
    if (!world || world->world_size == 1) return nullptr;
    auto options = parallel_options_from_recipe(recipe);
    if (world->rank != 0) log::set_level(log::Level::warn);  // rank 0 speaks for the run
    return make_parallel(*world, options);
  });
}

}  // namespace llmtune::dist
