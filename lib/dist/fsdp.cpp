// ZeRO-3: decoder layers as sharded units. A unit's parameters are partitioned among the ranks
// (trainable and frozen separately, greedy by size); each rank keeps its own and the others are
// empty tensors (their data swapped with set_data, so every module keeps its parameter handles).
// The layer runner installed into the model wraps each layer in an autograd function that
//   forward:  all-gather the unit, run the layer without keeping activations, free the unit;
//   backward: all-gather again, recompute the layer with the forward's RNG state, take gradients
//             for the input and the unit's trainable parameters, reduce each parameter's gradient
//             to its owner, free the unit.
// Only owners receive parameter gradients, so the loop (told by is_local) keeps masters and
// optimizer state for its own parameters only.
#include <ATen/CPUGeneratorImpl.h>

#include "core/core.h"
#include "dist/dist.h"
#include "dist/dist_impl.h"
#include "model/model.h"

namespace llmtune::dist {

namespace {

constexpr int64_t kAlign = 16;  // byte alignment of every tensor inside a gathered payload
int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

torch::Tensor as_bytes(const torch::Tensor& t) { return t.contiguous().view({-1}).view(torch::kUInt8); }

struct Entry {
  torch::Tensor param;  // the module's parameter; its data is swapped, the handle never changes
  std::vector<int64_t> shape;
  torch::ScalarType dtype;
  int64_t bytes = 0, offset = 0;  // offset inside its owner's payload
  int owner = 0;
  bool trainable = false;
};

struct Unit {
  model::DecoderLayerImpl* layer = nullptr;
  std::vector<Entry> entries;
  int64_t payload = 0;  // bytes every rank contributes to a gather (the largest owner's share)
  bool whole = false;
};

}  // namespace

struct ShardedLayers::Impl {
  std::shared_ptr<ProcessGroup> pg;
  std::vector<Unit> units;
  std::map<const void*, std::pair<size_t, size_t>> where;  // TensorImpl* -> (unit, entry)
  std::map<const model::DecoderLayerImpl*, size_t> unit_of;
  torch::Tensor anchor = torch::zeros({1}).requires_grad_(true);

  int rank() const { return pg->rank(); }

  void gather(Unit& u) {
    if (u.whole) return;
    torch::NoGradGuard ng;
    const auto bytes = torch::TensorOptions().dtype(torch::kUInt8).device(pg->device());
    torch::Tensor mine = torch::zeros({u.payload}, bytes);
    for (const auto& e : u.entries)
      if (e.owner == rank()) mine.narrow(0, e.offset, e.bytes).copy_(as_bytes(e.param.detach()));
    torch::Tensor all = torch::empty({u.payload * pg->world_size()}, bytes);
    pg->all_gather(all, mine);
    for (auto& e : u.entries)
      if (e.owner != rank())
        e.param.set_data(all.narrow(0, e.owner * u.payload + e.offset, e.bytes).view(e.dtype).view(e.shape));
    u.whole = true;
  }

  void release(Unit& u) {
    if (!u.whole) return;
    for (auto& e : u.entries)
      if (e.owner != rank()) e.param.set_data(torch::empty({0}, e.param.options()));
    u.whole = false;
  }

  // Sums every rank's gradients of the unit's trainable parameters onto their owners. `grads` is in
  // trainable-entry order; on return only this rank's own entries are defined.
  void reduce_unit_grads(Unit& u, std::vector<torch::Tensor>& grads) {
    torch::NoGradGuard ng;
    std::vector<int> owners;
    size_t j = 0;
    for (const auto& e : u.entries) {
      if (!e.trainable) continue;
      // An unused parameter still takes part, as zeros, so every rank sends the same sizes.
      if (!grads[j].defined()) grads[j] = torch::zeros(e.shape, e.param.options());
      owners.push_back(e.owner);
      ++j;
    }
    reduce_to_owners(*pg, grads, owners);
    for (size_t k = 0; k < grads.size(); ++k)
      if (owners[k] != rank()) grads[k] = torch::Tensor();
  }
};

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the autograd node needs in backward: the unit, the layer's per-forward inputs, the RNG state.
struct UnitCall : torch::CustomClassHolder {
  std::shared_ptr<ShardedLayers::Impl> impl;
  size_t unit = 0;
  model::LayerInputs in;
  at::Generator rng;  // a copy of the CPU generator as the forward found it
};

// Puts the default CPU generator into `from`'s state.
void restore_cpu_rng(const at::Generator& from) {
  auto gen = at::detail::getDefaultCPUGenerator();
  const torch::Tensor state = from.get_state();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

struct UnitFunction : public torch::autograd::Function<UnitFunction> {
  // tensors = {x, anchor, the unit's trainable parameters this rank owns, in entry order}. Parameters owned
  // elsewhere are not inputs: they are empty here, and autograd would record that empty shape as
  // their gradient's expected shape (their gradients go to their owners anyway).
  static torch::Tensor forward(AutogradContext* ctx, c10::intrusive_ptr<UnitCall> call, at::TensorList tensors) {
    ctx->save_for_backward({tensors[0]});
    ctx->saved_data["call"] = c10::IValue::make_capsule(call);
    call->rng = at::detail::getDefaultCPUGenerator().clone();
    auto& impl = *call->impl;
    Unit& u = impl.units[call->unit];
    impl.gather(u);
    torch::Tensor y;
    try {
      y = u.layer->forward(tensors[0], call->in);
    } catch (...) {
      impl.release(u);
      throw;
    }
    impl.release(u);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto call = c10::static_intrusive_pointer_cast<UnitCall>(ctx->saved_data["call"].toCapsule());
    auto& impl = *call->impl;
    Unit& u = impl.units[call->unit];
    const torch::Tensor saved_x = ctx->get_saved_variables()[0];
    torch::Tensor x = saved_x.detach();
    if (saved_x.requires_grad()) x.requires_grad_(true);

    impl.gather(u);
    std::vector<torch::Tensor> params;
    for (const auto& e : u.entries)
      if (e.trainable) params.push_back(e.param);
    std::vector<torch::Tensor> wrt;
    if (x.requires_grad()) wrt.push_back(x);
    wrt.insert(wrt.end(), params.begin(), params.end());

    variable_list grads;
    try {
      const at::Generator now = at::detail::getDefaultCPUGenerator().clone();
      restore_cpu_rng(call->rng);  // dropout masks as in the forward
      torch::Tensor y;
      {
        torch::AutoGradMode enable(true);
        y = u.layer->forward(x, call->in);
      }
      restore_cpu_rng(now);
      grads = torch::autograd::grad({y}, wrt, {grad_out[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                    /*allow_unused=*/true);
    } catch (...) {
      impl.release(u);
      throw;
    }
    std::vector<torch::Tensor> param_grads(grads.begin() + (x.requires_grad() ? 1 : 0), grads.end());
    impl.reduce_unit_grads(u, param_grads);
    impl.release(u);

    variable_list result(3);  // call, x, anchor (no gradient), then this rank's parameters
    if (x.requires_grad()) result[1] = grads[0];
    size_t j = 0;
    for (const auto& e : u.entries) {
      if (!e.trainable) continue;
      if (e.owner == impl.rank()) result.push_back(param_grads[j]);
      ++j;
    }
    return result;
  }
};

// Greedy balance of one kind of entry (trainable or frozen) over the ranks, largest first.
void assign_owners(std::vector<Entry*> entries, int world_size) {
  std::vector<int64_t> sizes;
  for (auto* e : entries) sizes.push_back(e->bytes);
  auto owner = partition_params(sizes, world_size);
  for (size_t i = 0; i < entries.size(); ++i) entries[i]->owner = owner[i];
}

}  // namespace

ShardedLayers::ShardedLayers(std::shared_ptr<ProcessGroup> pg, model::TransformerImpl& model)
    : impl_(std::make_shared<Impl>()) {
  impl_->pg = std::move(pg);
  const int world = impl_->pg->world_size();
  for (auto& layer : model.decoder->layer_list) {
    Unit u;
    u.layer = layer.get();
    for (const auto& p : layer->parameters(/*recurse=*/true)) {
      Entry e;
      e.param = p;
      e.shape = p.sizes().vec();
      e.dtype = p.scalar_type();
      e.bytes = p.numel() * static_cast<int64_t>(p.element_size());
      e.trainable = p.requires_grad();
      u.entries.push_back(std::move(e));
    }
    std::vector<Entry*> trainable, frozen;
    for (auto& e : u.entries) (e.trainable ? trainable : frozen).push_back(&e);
    // Offset the frozen partition so the largest trainable and frozen tensors do not pile up on rank 0.
    assign_owners(trainable, world);
    assign_owners(frozen, world);
    for (auto* e : frozen) e->owner = (e->owner + static_cast<int>(impl_->units.size())) % world;
    std::vector<int64_t> used(static_cast<size_t>(world), 0);
    for (auto& e : u.entries) {
      e.offset = used[static_cast<size_t>(e.owner)];
      used[static_cast<size_t>(e.owner)] += align_up(e.bytes);
    }
    u.payload = std::max<int64_t>(*std::max_element(used.begin(), used.end()), kAlign);
    const size_t index = impl_->units.size();
    for (size_t i = 0; i < u.entries.size(); ++i)
      impl_->where[u.entries[i].param.unsafeGetTensorImpl()] = {index, i};
    impl_->unit_of[u.layer] = index;
    impl_->units.push_back(std::move(u));
  }
  // Start sharded: every rank frees what it does not own.
  torch::NoGradGuard ng;
  for (auto& u : impl_->units) {
    u.whole = true;
    impl_->release(u);
  }

  // The runner shares the state: the model may outlive this object (stages destroy the Parallel
  // and the model in either order), and the state never touches the model itself.
  auto impl = impl_;
  model.set_layer_runner([impl](model::DecoderLayerImpl& layer, const torch::Tensor& x, const model::LayerInputs& in,
                                bool /*checkpointed: always recomputed*/) -> torch::Tensor {
    const size_t index = impl->unit_of.at(&layer);
    Unit& u = impl->units[index];
    bool any_trainable = false;
    for (const auto& e : u.entries) any_trainable |= e.trainable;
    if (!torch::GradMode::is_enabled() || (!x.requires_grad() && !any_trainable)) {
      impl->gather(u);
      torch::Tensor y;
      try {
        y = layer.forward(x, in);
      } catch (...) {
        impl->release(u);
        throw;
      }
      impl->release(u);
      return y;
    }
    auto call = c10::make_intrusive<UnitCall>();
    call->impl = impl;
    call->unit = index;
    call->in = in;
    // The anchor requires grad, so every rank records this node and joins the unit's backward
    // collectives even when it owns none of the unit's trainable parameters and x needs no grad.
    std::vector<torch::Tensor> tensors{x, impl->anchor};
    for (const auto& e : u.entries)
      if (e.trainable && e.owner == impl->rank()) tensors.push_back(e.param);
    return UnitFunction::apply(call, at::TensorList(tensors));
  });
}

ShardedLayers::~ShardedLayers() = default;

bool ShardedLayers::in_layers(const torch::Tensor& param) const {
  return impl_->where.count(param.unsafeGetTensorImpl()) > 0;
}

bool ShardedLayers::is_local(const torch::Tensor& param) const {
  auto it = impl_->where.find(param.unsafeGetTensorImpl());
  if (it == impl_->where.end()) return true;
  return impl_->units[it->second.first].entries[it->second.second].owner == impl_->rank();
}

void ShardedLayers::gather_on_main(bool whole) {
  auto& pg = *impl_->pg;
  torch::NoGradGuard ng;
  const auto bytes = torch::TensorOptions().dtype(torch::kUInt8).device(pg.device());
  for (auto& u : impl_->units) {
    if (!whole) {
      if (pg.rank() == 0) impl_->release(u);
      continue;
    }
    // Owners send their share to rank 0 only: no rank but the writer ever holds the whole model.
    for (int r = 1; r < pg.world_size(); ++r) {
      int64_t n = 0;
      for (const auto& e : u.entries)
        if (e.owner == r) n = std::max(n, e.offset + e.bytes);
      if (n == 0) continue;
      if (pg.rank() == r) {
        torch::Tensor mine = torch::zeros({n}, bytes);
        for (const auto& e : u.entries)
          if (e.owner == r) mine.narrow(0, e.offset, e.bytes).copy_(as_bytes(e.param.detach()));
        pg.send(mine, 0);
      } else if (pg.rank() == 0) {
        torch::Tensor theirs = torch::empty({n}, bytes);
        pg.recv(theirs, r);
        for (auto& e : u.entries)
          if (e.owner == r) e.param.set_data(theirs.narrow(0, e.offset, e.bytes).view(e.dtype).view(e.shape));
      }
    }
    if (pg.rank() == 0) u.whole = true;
  }
}

int64_t ShardedLayers::local_bytes() const {
  int64_t n = 0;
  for (const auto& u : impl_->units)
    for (const auto& e : u.entries)
      if (e.owner == impl_->rank()) n += e.bytes;
  return n;
}

int64_t ShardedLayers::max_unit_bytes() const {
  int64_t n = 0;
  for (const auto& u : impl_->units) {
    int64_t s = 0;
    for (const auto& e : u.entries) s += e.bytes;
    n = std::max(n, s);
  }
  return n;
}

train::NamedTensors gather_named_to_main(ProcessGroup& pg, const train::NamedTensors& local) {
  nlohmann::json index = nlohmann::json::array();
  for (const auto& [name, t] : local)
    index.push_back({{"name", name}, {"shape", t.sizes().vec()}, {"dtype", static_cast<int>(t.scalar_type())}});
  auto all = pg.all_gather_bytes(index.dump());
  // Every rank computes who sends what: a name comes from the lowest rank holding it.
  std::vector<std::vector<nlohmann::json>> sends(static_cast<size_t>(pg.world_size()));
  {
    std::set<std::string> seen;
    for (const auto& e : nlohmann::json::parse(all[0])) seen.insert(e.at("name").get<std::string>());
    for (int r = 1; r < pg.world_size(); ++r)
      for (const auto& e : nlohmann::json::parse(all[static_cast<size_t>(r)])) {
        const auto name = e.at("name").get<std::string>();
        if (seen.insert(name).second) sends[static_cast<size_t>(r)].push_back(e);
      }
  }
  train::NamedTensors out;
  if (pg.rank() == 0) out = local;
  std::map<std::string, torch::Tensor> mine(local.begin(), local.end());
  for (int r = 1; r < pg.world_size(); ++r)
    for (const auto& e : sends[static_cast<size_t>(r)]) {
      const auto name = e.at("name").get<std::string>();
      if (pg.rank() == r) {
        torch::Tensor t = mine.at(name).detach().to(pg.device()).contiguous();
        pg.send(t, 0);
      } else if (pg.rank() == 0) {
        torch::Tensor t = torch::empty(e.at("shape").get<std::vector<int64_t>>(),
                                       torch::TensorOptions()
                                           .dtype(static_cast<torch::ScalarType>(e.at("dtype").get<int>()))
                                           .device(pg.device()));
        pg.recv(t, r);
        out.emplace_back(name, t.cpu());
      }
    }
  return out;
}

}  // namespace llmtune::dist
