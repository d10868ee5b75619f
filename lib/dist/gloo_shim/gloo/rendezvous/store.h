// llmtune stand-in for Gloo's rendezvous store interface (see ../../README.md). c10d's header
// derives GlooStore from it inline, so the virtual members it overrides must be declared; llmtune
// never instantiates GlooStore (libtorch does, with its own Gloo), so no vtable is emitted here.
#pragma once
#include <chrono>
#include <string>
#include <vector>
#include "gloo/algorithm.h"
namespace gloo::rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace gloo::rendezvous
