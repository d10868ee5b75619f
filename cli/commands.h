// The subcommand registry: one table, printed by `llmtune --help`. Each entry wires its
// CLI11 options and returns the function that runs it. Only commands that work are listed.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace llmtune::cli {

using RunFn = std::function<int()>;
struct Command {
  const char* name;
  const char* summary;
  // Adds options to `app` and returns the function to run when this subcommand is chosen.
  std::function<RunFn(CLI::App& app)> setup;
};

const std::vector<Command>& commands();

// Declared here, defined one per file in cli/cmd_*.cpp.
RunFn setup_generate(CLI::App& app);
RunFn setup_eval(CLI::App& app);
RunFn setup_inspect(CLI::App& app);
RunFn setup_tokenize(CLI::App& app);
RunFn setup_sft(CLI::App& app);
RunFn setup_merge(CLI::App& app);

}  // namespace llmtune::cli
