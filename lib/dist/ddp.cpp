// DDP gradient buckets. Each trainable parameter gets a post-accumulate hook; on the final
// micro-batch of an accumulation group the hook copies the finished .grad (fp32) into its bucket,
// and a bucket whose members are all in starts an asynchronous all-reduce (sum: the objective already divides by the global target count) while backward goes on.
// Buckets start strictly in index order so every rank issues the same collective sequence.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "core/core.h"
#include "dist/dist.h"

namespace llmtune::dist {

namespace {

// Runs a callback after AccumulateGrad has written a parameter's .grad.
struct GradReady : torch::autograd::PostAccumulateGradHook {
  explicit GradReady(std::function<void(const torch::Tensor&)> fn) : fn_(std::move(fn)) {}
  void operator()(const torch::autograd::Variable& param) override { fn_(param); }
  std::function<void(const torch::Tensor&)> fn_;
};

}  // namespace

GradBuckets::GradBuckets(std::shared_ptr<ProcessGroup> pg, const train::NamedTensors& trainable,
                         int64_t bucket_bytes)
    : pg_(std::move(pg)), alive_(std::make_shared<bool>(true)) {
  for (const auto& [name, p] : trainable) {
    names_.push_back(name);
    params_.push_back(p);
  }
  const size_t n = params_.size();
  bucket_of_.assign(n, 0);
  seen_.assign(n, false);
  // Reverse registration order: the last layers' gradients are ready first.
  Bucket cur;
  int64_t cur_elems = 0;
  auto close = [&]() {
    if (cur.members.empty()) return;
    cur.flat = torch::zeros({cur_elems}, torch::TensorOptions().dtype(torch::kFloat32).device(pg_->device()));
    buckets_.push_back(std::move(cur));
    cur = Bucket{};
    cur_elems = 0;
  };
  for (size_t k = n; k-- > 0;) {
    const int64_t numel = params_[k].numel();
    if (!cur.members.empty() && (cur_elems + numel) * 4 > bucket_bytes) close();
    bucket_of_[k] = buckets_.size();
    cur.members.push_back(k);
    cur.offsets.push_back(cur_elems);
    cur_elems += numel;
  }
  close();
  // A post-accumulate hook, not a tensor hook: tensor hooks also fire inside nested autograd::grad
  // calls (recompute-in-backward of checkpointed layers and of the chunked loss), once per partial
  // gradient, while this one fires once per backward with the finished .grad. A tied embedding
  // (used by the lookup and by every loss chunk) therefore arrives exactly once.
  std::weak_ptr<bool> alive = alive_;
  for (size_t i = 0; i < n; ++i)
    torch::autograd::impl::set_post_acc_grad_hooks(
        params_[i], std::make_unique<GradReady>([this, alive, i](const torch::Tensor&) {
          if (alive.expired()) return;
          on_grad(i);
        }));
}

GradBuckets::~GradBuckets() {
  alive_.reset();
  for (auto& b : buckets_) {
    try {
      b.pending.wait();
    } catch (...) {
    }
  }
}

void GradBuckets::arm(bool last_micro) {
  for (auto& b : buckets_) {  // a group whose reduce was skipped (non-finite loss) may leave work behind
    b.pending.wait();
    b.ready = 0;
  }
  std::fill(seen_.begin(), seen_.end(), false);
  next_launch_ = 0;
  armed_ = last_micro;
}

void GradBuckets::on_grad(size_t i) {
  if (!armed_) return;  // no_sync: earlier micro-batches only accumulate into .grad
  torch::NoGradGuard no_grad;
  Bucket& b = buckets_[bucket_of_[i]];
  size_t pos = 0;
  while (b.members[pos] != i) ++pos;
  torch::Tensor slot = b.flat.narrow(0, b.offsets[pos], params_[i].numel()).view(params_[i].sizes());
  if (seen_[i]) {  // accumulated twice in one backward: only possible if .grad changed after a reduce
    if (b.pending.valid())
      fail("internal: parameter '{}' received a gradient after its DDP bucket was reduced", names_[i]);
    slot.copy_(params_[i].grad());
    return;
  }
  slot.copy_(params_[i].grad());  // every micro-batch of the group, summed by AccumulateGrad
  seen_[i] = true;
  if (++b.ready == b.members.size()) launch_ready();
}

void GradBuckets::launch_ready() {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].ready == buckets_[next_launch_].members.size()) {
    Bucket& b = buckets_[next_launch_];
    b.pending = pg_->all_reduce_sum_async(b.flat, fmt::format("all_reduce(grad bucket {})", next_launch_));
    ++next_launch_;
  }
}

void GradBuckets::finish(std::vector<torch::Tensor>& grads) {
  torch::NoGradGuard no_grad;
  if (grads.size() != params_.size())
    fail("DDP: {} of {} trainable parameters received a gradient on rank {}; every trainable parameter must take "
         "part in the loss on every rank (unused parameters are not supported)",
         grads.size(), params_.size(), pg_->rank());
  // Members whose hook did not fire (not armed: a single micro-batch run without before_backward,
  // or a parameter the graph skipped) take the loop's gradient as it is now.
  for (size_t i = 0; i < params_.size(); ++i) {
    if (seen_[i]) continue;
    Bucket& b = buckets_[bucket_of_[i]];
    size_t pos = 0;
    while (b.members[pos] != i) ++pos;
    b.flat.narrow(0, b.offsets[pos], params_[i].numel()).view(params_[i].sizes()).copy_(grads[i]);
    seen_[i] = true;
    ++b.ready;
  }
  launch_ready();
  for (size_t k = 0; k < buckets_.size(); ++k) {
    Bucket& b = buckets_[k];
    b.pending.wait();
    for (size_t m = 0; m < b.members.size(); ++m) {
      const size_t i = b.members[m];
      grads[i].copy_(b.flat.narrow(0, b.offsets[m], params_[i].numel()).view(grads[i].sizes()));
    }
    b.ready = 0;
  }
  std::fill(seen_.begin(), seen_.end(), false);
  next_launch_ = 0;
  armed_ = false;
}

}  // namespace llmtune::dist
