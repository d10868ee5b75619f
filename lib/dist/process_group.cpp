// Process groups on c10d: a TCPStore rendezvous (rank 0 hosts it; every rank checks in so a timeout
// can name the ranks that never came), then ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA,
// nccl_group.cpp). Every collective goes through run(), which records it and, on failure or
// ddp_timeout, prints this rank's and every reachable rank's last step and last collective.
// Caveat: the wheel ships no Gloo headers; lib/dist/gloo_shim declares the few types c10d names.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
// The Gloo stand-in headers come from lib/dist/gloo_shim on the include path (CMakeLists.txt);
// without it this file still builds and the Gloo backend reports itself missing at run time.
#if __has_include(<gloo/rendezvous/store.h>)
#define LLMTUNE_HAVE_GLOO 1
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#include <cstdlib>
#include <thread>

#include "core/core.h"
#include "dist/dist.h"
#include "dist/dist_impl.h"

namespace llmtune::dist {
namespace {

using Ms = std::chrono::milliseconds;

std::string bytes_str(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::vector<uint8_t> to_bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, const WorldInfo& w,
                                            Ms timeout) {
#ifndef LLMTUNE_HAVE_GLOO
  fail("ddp_backend: gloo is not available in this llmtune build (lib/dist/gloo_shim was not on the include path); "
       "rebuild with the CMake line that adds it");
#else
  auto is_loopback = [](const std::string& addr) {
    return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
  };
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  else if (is_loopback(w.master_addr))
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  else
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("gloo", store);
  return c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, w.rank, w.world_size, opts);
#endif
}

}  // namespace

ProcessGroup::ProcessGroup(const WorldInfo& world, const GroupOptions& options) : world_(world), options_(options) {
  backend_name_ = options.backend.empty() ? (torch::cuda::is_available() ? "nccl" : "gloo") : options.backend;
  if (backend_name_ != "gloo" && backend_name_ != "nccl")
    fail("ddp_backend: '{}' is not a backend; use gloo (CPU) or nccl (CUDA)", backend_name_);
  if (backend_name_ == "nccl" && !torch::cuda::is_available())
    fail("ddp_backend: nccl needs CUDA devices, and none is visible on rank {}; use ddp_backend: gloo for CPU "
         "training", world.rank);

  // ---- rendezvous -----------------------------------------------------------------------------
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(world.master_port);
  so.isServer = world.rank == 0;
  so.numWorkers = std::nullopt;  // we count arrivals ourselves, to name the missing ranks
  so.waitWorkers = false;
  so.timeout = options.rdzv_timeout;
  so.useLibUV = false;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(world.master_addr, so);
  } catch (const std::exception& e) {
    if (world.rank == 0)
      fail("rank 0 could not host the rendezvous on port {} ({}); is another run using it? Pick another "
           "--master-port / MASTER_PORT", world.master_port, first_line(e.what()));
    fail("rank {} could not reach the rendezvous at {}:{} within {} s ({}); rank 0 hosts it: check that it "
         "started, and MASTER_ADDR / MASTER_PORT", world.rank, world.master_addr, world.master_port,
         std::chrono::duration_cast<std::chrono::seconds>(options.rdzv_timeout).count(), first_line(e.what()));
  }
  store->set(fmt::format("llmtune/rdzv/rank/{}", world.rank), to_bytes(std::to_string(::getpid())));
  const int64_t arrived_now = store->add("llmtune/rdzv/arrived", 1);
  (void)arrived_now;
  const double deadline = now_seconds() + std::chrono::duration<double>(options.rdzv_timeout).count();
  try {
    for (;;) {
      if (store->add("llmtune/rdzv/arrived", 0) >= world.world_size) break;
      if (now_seconds() > deadline) {
        std::string missing;
        int n_missing = 0;
        for (int r = 0; r < world.world_size; ++r)
          if (!store->check({fmt::format("llmtune/rdzv/rank/{}", r)})) {
            missing += (n_missing++ ? ", " : "") + std::to_string(r);
          }
        fail("rendezvous timed out after {} s at {}:{}: {} of {} ranks arrived; missing rank(s): {}. Start every rank "
             "(llmtune launch on each node with --nnodes/--node-rank), or raise --rdzv-timeout",
             std::chrono::duration_cast<std::chrono::seconds>(options.rdzv_timeout).count(), world.master_addr,
             world.master_port, world.world_size - n_missing, world.world_size, missing);
      }
      std::this_thread::sleep_for(Ms(50));
    }
  } catch (const llmtune::Error&) {
    throw;
  } catch (const std::exception& e) {
    fail("rank {} lost the rendezvous at {}:{} while waiting for the other ranks ({}); rank 0 hosts it: see its "
         "error", world.rank, world.master_addr, world.master_port, first_line(e.what()));
  }

  // ---- backend --------------------------------------------------------------------------------
  c10::intrusive_ptr<c10d::Backend> backend;
  if (backend_name_ == "gloo") {
    backend = make_gloo(store, world, options.timeout);
  } else {
    device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(world.local_rank));
    backend = detail::make_nccl(store, world.rank, world.world_size, options.timeout);
  }
  store_ = store.get();
  backend_ = backend.get();
  store_holder_ = std::shared_ptr<void>(store.release(), [](void* p) {
    c10::intrusive_ptr<c10d::Store>::reclaim(static_cast<c10d::Store*>(p));
  });
  backend_holder_ = std::shared_ptr<void>(backend.release(), [](void* p) {
    c10::intrusive_ptr<c10d::Backend>::reclaim(static_cast<c10d::Backend*>(p));
  });
}

ProcessGroup::~ProcessGroup() = default;

std::string ProcessGroup::diagnostics() const {
  std::string s = fmt::format("rank {}: last completed step {}, last collective #{} {}", world_.rank, last_step_,
                              collectives_, last_collective_);
  // Other ranks publish the same line in the store (see run()); read what is there, briefly.
  for (int r = 0; r < world_.world_size; ++r) {
    if (r == world_.rank) continue;
    const std::string key = fmt::format("llmtune/status/{}", r);
    try {
      if (store_->check({key})) s += "\n  " + bytes_str(store_->get(key));
      else s += fmt::format("\n  rank {}: no status (never reached a collective)", r);
    } catch (const std::exception&) {
      s += fmt::format("\n  rank {}: status unreachable (the rendezvous host, rank 0, may be gone)", r);
    }
  }
  return s;
}

void ProcessGroup::fail_collective(const std::string& what, const std::string& error) {
  const std::string diag = diagnostics();
  std::fprintf(stderr, "error: collective %s failed on rank %d: %s\n  %s\n", what.c_str(), world_.rank,
               first_line(error).c_str(), diag.c_str());
  std::fflush(stderr);
  fail("collective {} failed on rank {} (timeout {} s, ddp_timeout): {}. A rank that stalled or died is the one "
       "with the lowest step / collective number above.",
       what, world_.rank, std::chrono::duration_cast<std::chrono::seconds>(options_.timeout).count(),
       first_line(error));
}

void ProcessGroup::run(const std::string& what, const std::function<void()>& fn) {
  ++collectives_;
  last_collective_ = what + " (in progress)";
  const std::string status =
      fmt::format("rank {}: last completed step {}, in collective #{} {}", world_.rank, last_step_, collectives_, what);
  try {
    store_->set(fmt::format("llmtune/status/{}", world_.rank), to_bytes(status));
    fn();
  } catch (const llmtune::Error&) {
    throw;
  } catch (const std::exception& e) {
    fail_collective(what, e.what());
  }
  last_collective_ = what;
}

namespace {
void wait_work(const c10::intrusive_ptr<c10d::Work>& w) {
  w->wait();
}
double ring(int n) { return n > 1 ? static_cast<double>(n - 1) / n : 0.0; }
double nbytes(const torch::Tensor& t) { return static_cast<double>(t.numel() * t.element_size()); }
}  // namespace

void ProcessGroup::all_reduce_sum(torch::Tensor& t) {
  run(fmt::format("all_reduce({})", t.numel()), [&] {
    std::vector<at::Tensor> v{t};
    wait_work(backend_->allreduce(v));
  });
  bytes_ += 2 * ring(world_size()) * nbytes(t);
}

void ProcessGroup::broadcast(torch::Tensor& t, int root) {
  run(fmt::format("broadcast({}, root {})", t.numel(), root), [&] {
    std::vector<at::Tensor> v{t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait_work(backend_->broadcast(v, o));
  });
  bytes_ += world_.rank == root ? nbytes(t) : 0.0;
}

void ProcessGroup::reduce_sum(torch::Tensor& t, int root) {
  run(fmt::format("reduce({}, root {})", t.numel(), root), [&] {
    std::vector<at::Tensor> v{t};
    c10d::ReduceOptions o;
    o.rootRank = root;
    wait_work(backend_->reduce(v, o));
  });
  bytes_ += ring(world_size()) * nbytes(t);
}

void ProcessGroup::all_gather(torch::Tensor& out, const torch::Tensor& in) {
  run(fmt::format("all_gather({})", in.numel()), [&] {
    std::vector<at::Tensor> parts = out.chunk(world_size());
    std::vector<std::vector<at::Tensor>> outs{parts};
    std::vector<at::Tensor> ins{in};
    wait_work(backend_->allgather(outs, ins));
  });
  bytes_ += ring(world_size()) * nbytes(out);
}

void ProcessGroup::barrier() {
  run("barrier", [&] { wait_work(backend_->barrier()); });
}

void ProcessGroup::send(torch::Tensor& t, int dst) {
  run(fmt::format("send({}, to {})", t.numel(), dst), [&] {
    std::vector<at::Tensor> v{t};
    wait_work(backend_->send(v, dst, 0));
  });
  bytes_ += nbytes(t);
}

void ProcessGroup::recv(torch::Tensor& t, int src) {
  run(fmt::format("recv({}, from {})", t.numel(), src), [&] {
    std::vector<at::Tensor> v{t};
    wait_work(backend_->recv(v, src, 0));
  });
}

double ProcessGroup::all_reduce_scalar(double v) {
  auto t = torch::tensor({v}, torch::TensorOptions().dtype(torch::kFloat64).device(device_));
  all_reduce_sum(t);
  return t.cpu().item<double>();
}

std::vector<std::string> ProcessGroup::all_gather_bytes(const std::string& mine) {
  const int64_t seq = ++gather_seq_;
  std::vector<std::string> out(static_cast<size_t>(world_size()));
  run(fmt::format("gather_bytes(#{})", seq), [&] {
    store_->set(fmt::format("llmtune/gather/{}/{}", seq, world_.rank), to_bytes(mine));
    for (int r = 0; r < world_size(); ++r) {
      const std::string key = fmt::format("llmtune/gather/{}/{}", seq, r);
      store_->wait({key}, options_.timeout);
      out[static_cast<size_t>(r)] = bytes_str(store_->get(key));
    }
  });
  barrier();  // everyone has read: the keys can go
  store_->deleteKey(fmt::format("llmtune/gather/{}/{}", seq, world_.rank));
  return out;
}

ProcessGroup::Pending ProcessGroup::all_reduce_sum_async(torch::Tensor& t, const std::string& what) {
  Pending p;
  p.pg_ = this;
  p.what_ = what;
  run(what + " (launch)", [&] {
    std::vector<at::Tensor> v{t};
    auto w = backend_->allreduce(v);
    p.work_ = std::shared_ptr<void>(w.release(), [](void* q) {
      c10::intrusive_ptr<c10d::Work>::reclaim(static_cast<c10d::Work*>(q));
    });
  });
  bytes_ += 2 * ring(world_size()) * nbytes(t);
  return p;
}

void ProcessGroup::Pending::wait() {
  if (!work_) return;
  auto* w = static_cast<c10d::Work*>(work_.get());
  pg_->run(what_, [&] { w->wait(); });
  work_.reset();
}

std::shared_ptr<ProcessGroup> init_process_group(const WorldInfo& world, const GroupOptions& options) {
  return std::make_shared<ProcessGroup>(world, options);
}

}  // namespace llmtune::dist
