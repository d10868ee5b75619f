// World discovery: torchrun's environment (also what `llmtune launch` exports) or Slurm's srun
// variables. Caveat: for Slurm the master address is SLURM_LAUNCH_NODE_IPADDR or the first name of a
// plain comma list in SLURM_JOB_NODELIST; bracketed host ranges ("node[01-04]") need MASTER_ADDR set.
#include <cstdlib>

#include "core/core.h"
#include "dist/dist.h"

namespace llmtune::dist {
namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

int env_int(const char* name, const std::string& value) {
  try {
    size_t used = 0;
    int v = std::stoi(value, &used);
    if (used != value.size()) throw std::invalid_argument(value);
    return v;
  } catch (const std::exception&) {
    fail("environment variable {}={} is not an integer; the launcher (llmtune launch / torchrun / srun) sets it",
         name, value);
  }
}

// "4(x2),3" → tasks on the first node (Slurm's SLURM_TASKS_PER_NODE syntax).
int first_count(const std::string& s) {
  size_t i = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  return i ? std::stoi(s.substr(0, i)) : 1;
}

}  // namespace

std::optional<WorldInfo> world_from_env() {
  WorldInfo w;
  auto rank = env("RANK"), world = env("WORLD_SIZE");
  if (rank && world) {
    w.source = "torchrun";
    w.rank = env_int("RANK", *rank);
    w.world_size = env_int("WORLD_SIZE", *world);
    w.local_rank = env("LOCAL_RANK") ? env_int("LOCAL_RANK", *env("LOCAL_RANK")) : w.rank;
    w.local_world_size =
        env("LOCAL_WORLD_SIZE") ? env_int("LOCAL_WORLD_SIZE", *env("LOCAL_WORLD_SIZE")) : w.world_size;
    w.master_addr = env("MASTER_ADDR").value_or("127.0.0.1");
    w.master_port = env("MASTER_PORT") ? env_int("MASTER_PORT", *env("MASTER_PORT")) : 29500;
  } else if (auto procid = env("SLURM_PROCID"); procid && env("SLURM_NTASKS")) {
    w.source = "slurm";
    w.rank = env_int("SLURM_PROCID", *procid);
    w.world_size = env_int("SLURM_NTASKS", *env("SLURM_NTASKS"));
    w.local_rank = env("SLURM_LOCALID") ? env_int("SLURM_LOCALID", *env("SLURM_LOCALID")) : 0;
    if (auto n = env("SLURM_NTASKS_PER_NODE")) w.local_world_size = first_count(*n);
    else if (auto t = env("SLURM_TASKS_PER_NODE")) w.local_world_size = first_count(*t);
    else w.local_world_size = w.world_size;
    if (auto a = env("MASTER_ADDR")) w.master_addr = *a;
    else if (auto ip = env("SLURM_LAUNCH_NODE_IPADDR")) w.master_addr = *ip;
    else if (auto nodes = env("SLURM_JOB_NODELIST")) {
      if (nodes->find('[') != std::string::npos)
        fail("SLURM_JOB_NODELIST={} uses a host range; export MASTER_ADDR=<first node> in the job script", *nodes);
      w.master_addr = nodes->substr(0, nodes->find(','));
    }
    w.master_port = env("MASTER_PORT") ? env_int("MASTER_PORT", *env("MASTER_PORT")) : 29500;
  } else {
    return std::nullopt;
  }
  if (w.world_size < 1 || w.rank < 0 || w.rank >= w.world_size)
    fail("rank {} is outside world size {} ({} environment); check the launcher's arguments", w.rank, w.world_size,
         w.source);
  if (w.local_rank < 0 || w.local_world_size < 1 || w.local_rank >= w.local_world_size)
    fail("local rank {} is outside local world size {} ({} environment)", w.local_rank, w.local_world_size, w.source);
  if (w.master_port < 1 || w.master_port > 65535) fail("MASTER_PORT={} is not a TCP port", w.master_port);
  return w;
}

}  // namespace llmtune::dist
