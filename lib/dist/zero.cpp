// ZeRO-1/2 optimizer sharding at parameter granularity (as torch's ZeroRedundancyOptimizer): every
// parameter has one owner rank that keeps its optimizer state and updates it; owners then broadcast
// the new values (the "all-gather after the step"). Checkpoints are unsharded: state_tensors() sends
// every rank's state to rank 0, load_state() keeps the owned part of a full state, so a run resumes
// at any world size. Caveat: balance is by whole tensors (one huge embedding may dominate a rank).
#include <numeric>

#include "core/core.h"
#include "dist/dist.h"

namespace llmtune::dist {
namespace {

// Union of two optimizer scalar records (per-parameter step maps / name lists from each rank).
void merge_json(nlohmann::json& a, const nlohmann::json& b) {
  if (a.is_object() && b.is_object()) {
    for (auto it = b.begin(); it != b.end(); ++it) {
      if (a.contains(it.key())) merge_json(a[it.key()], it.value());
      else a[it.key()] = it.value();
    }
  } else if (a.is_array() && b.is_array()) {
    for (const auto& x : b)
      if (std::find(a.begin(), a.end(), x) == a.end()) a.push_back(x);
  }
}

}  // namespace

std::vector<int> partition_params(const std::vector<int64_t>& numels, int world_size) {
  std::vector<size_t> order(numels.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return numels[a] > numels[b]; });
  std::vector<int64_t> load(static_cast<size_t>(std::max(world_size, 1)), 0);
  std::vector<int> owner(numels.size(), 0);
  for (size_t i : order) {
    const size_t r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = static_cast<int>(r);
    load[r] += numels[i];
  }
  return owner;
}

ShardedOptimizer::ShardedOptimizer(std::shared_ptr<ProcessGroup> pg, const train::OptimizerOptions& options,
                                   std::vector<train::ParamGroup> groups, std::map<std::string, int> owner,
                                   std::optional<std::set<std::string>> publish)
    : train::Optimizer(groups), pg_(std::move(pg)), owner_(std::move(owner)) {
  std::vector<train::ParamGroup> mine;
  for (const auto& g : groups) {
    train::ParamGroup m = g;
    m.names.clear();
    m.params.clear();
    for (size_t i = 0; i < g.names.size(); ++i) {
      auto it = owner_.find(g.names[i]);
      if (it == owner_.end()) fail("internal: ZeRO has no owner for parameter '{}'", g.names[i]);
      if (!publish || publish->count(g.names[i])) all_.emplace_back(g.names[i], g.params[i]);
      if (it->second == pg_->rank()) {
        m.names.push_back(g.names[i]);
        m.params.push_back(g.params[i]);
      }
    }
    mine.push_back(std::move(m));
  }
  inner_ = train::make_optimizer(options, std::move(mine));
}

void ShardedOptimizer::step(double lr) {
  inner_->step(lr);
  // Owners publish their updated parameters: one flat broadcast per owner rank.
  torch::NoGradGuard no_grad;
  for (int r = 0; r < pg_->world_size(); ++r) {
    std::vector<torch::Tensor> parts;
    for (const auto& [name, p] : all_)
      if (owner_.at(name) == r) parts.push_back(p);
    if (parts.empty()) continue;
    std::vector<torch::Tensor> flat_in;
    for (const auto& p : parts) flat_in.push_back(p.reshape({-1}).to(pg_->device()));
    torch::Tensor flat = torch::cat(flat_in);
    pg_->broadcast(flat, r);
    if (r == pg_->rank()) continue;
    int64_t off = 0;
    for (auto& p : parts) {
      p.copy_(flat.narrow(0, off, p.numel()).view(p.sizes()));
      off += p.numel();
    }
  }
}

train::NamedTensors ShardedOptimizer::state_tensors() const {
  // Index of what each rank holds, then owners send their tensors to rank 0.
  train::NamedTensors local = inner_->state_tensors();
  nlohmann::json index = nlohmann::json::array();
  for (const auto& [name, t] : local)
    index.push_back({{"name", name}, {"shape", t.sizes().vec()}, {"dtype", static_cast<int>(t.scalar_type())}});
  nlohmann::json payload = {{"index", index}, {"scalars", inner_->state_scalars()}};
  auto all = pg_->all_gather_bytes(payload.dump());
  train::NamedTensors out;
  gathered_scalars_ = nlohmann::json();
  for (int r = 0; r < pg_->world_size(); ++r) {
    auto j = nlohmann::json::parse(all[static_cast<size_t>(r)]);
    if (gathered_scalars_.is_null()) gathered_scalars_ = j.at("scalars");
    else merge_json(gathered_scalars_, j.at("scalars"));
    if (r == pg_->rank()) {
      if (r == 0) out.insert(out.end(), local.begin(), local.end());
      else
        for (const auto& [name, t] : local) {
          torch::Tensor c = t.contiguous();
          pg_->send(c, 0);
        }
      continue;
    }
    if (pg_->rank() != 0) continue;
    for (const auto& e : j.at("index")) {
      auto shape = e.at("shape").get<std::vector<int64_t>>();
      torch::Tensor t = torch::empty(shape, torch::TensorOptions()
                                                .dtype(static_cast<torch::ScalarType>(e.at("dtype").get<int>()))
                                                .device(pg_->device()));
      pg_->recv(t, r);
      out.emplace_back(e.at("name").get<std::string>(), t.cpu());
    }
  }
  return out;
}

nlohmann::json ShardedOptimizer::state_scalars() const {
  return gathered_scalars_.is_null() ? inner_->state_scalars() : gathered_scalars_;
}

void ShardedOptimizer::load_state(const std::map<std::string, torch::Tensor>& tensors, const nlohmann::json& scalars) {
  inner_->load_state(tensors, scalars);  // the inner optimizer only looks up the parameters it owns
}

}  // namespace llmtune::dist
