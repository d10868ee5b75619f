// `llmtune launch --nproc-per-node N [--nnodes M --node-rank R --master-addr H --master-port P]
// -- SUBCOMMAND ARGS...`: runs N workers of `llmtune SUBCOMMAND ARGS...` with torchrun's environment
// (lib/dist). This file also installs lib/dist's process-group factory into the training stages, so
// any `llmtune sft` started by this launcher, torchrun or srun joins the process group.
#include "cli/commands.h"
#include "core/core.h"
#include "dist/dist.h"

namespace llmtune::cli {

RunFn setup_launch(CLI::App& app) {
  auto o = std::make_shared<dist::LaunchOptions>();
  auto log_dir = std::make_shared<std::string>();
  app.add_option("--nproc-per-node", o->nproc_per_node, "Worker processes on this node (one per GPU, or CPU workers)")
      ->required()
      ->check(CLI::PositiveNumber);
  app.add_option("--nnodes", o->nnodes, "Number of nodes (run `llmtune launch` once per node)")->check(CLI::PositiveNumber);
  app.add_option("--node-rank", o->node_rank, "This node's index, 0..nnodes-1");
  app.add_option("--master-addr", o->master_addr, "Address of node 0, which hosts the rendezvous (default 127.0.0.1)");
  app.add_option("--master-port", o->master_port, "Rendezvous TCP port (default 29500)");
  app.add_option("--rdzv-timeout", o->rdzv_timeout_s, "Seconds every rank has to join before the run fails (default 300)");
  app.add_option("--log-dir", *log_dir, "Also write each rank's output to DIR/rank-<r>.log");
  app.add_option("--tail-lines", o->tail_lines, "Lines of a failed worker's output to repeat (default 20)");
  app.add_option("command", o->command, "After `--`: the subcommand and its arguments, e.g. -- sft recipe.yaml")
      ->required();
  return [o, log_dir]() {
    if (!log_dir->empty()) o->log_dir = *log_dir;
    return dist::launch(*o);
  };
}

static const CommandRegistration register_launch{
    {90, "launch", "Run a training command on several processes / nodes (torchrun-style)", setup_launch}};
// Training stages find lib/dist through train::init_parallel once this has run (at start-up).
static const bool dist_installed = (dist::install(), true);

}  // namespace llmtune::cli
