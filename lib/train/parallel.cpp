// The data-parallel factory slot (train::Parallel): train never includes c10d; lib/dist installs a
// factory at program start and stages ask it for a Parallel. No factory = single process.
#include "train/train.h"

namespace llmtune::train {
namespace {
ParallelFactory& factory_slot() {
  static ParallelFactory f;
  return f;
}
}  // namespace

void set_parallel_factory(ParallelFactory factory) { factory_slot() = std::move(factory); }

std::unique_ptr<Parallel> init_parallel(const config::Recipe& recipe) {
  return factory_slot() ? factory_slot()(recipe) : nullptr;
}

}  // namespace llmtune::train
