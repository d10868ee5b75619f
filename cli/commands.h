// The subcommand registry, printed by `llmtune --help`. Each cli/cmd_*.cpp registers itself
// with a static CommandRegistration (so adding a command touches no shared file); `order`
// sorts the help table. Each entry wires its CLI11 options and returns the function that runs it.
// Only commands that work are registered.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace llmtune::cli {

using RunFn = std::function<int()>;
struct Command {
  int order;  // position in the help table (training stages 10-99, tools 100+)
  const char* name;
  const char* summary;
  // Adds options to `app` and returns the function to run when this subcommand is chosen.
  std::function<RunFn(CLI::App& app)> setup;
};

// Every registered command, sorted by order.
std::vector<Command> commands();

// `static const CommandRegistration reg{{order, "name", "summary", setup_fn}};` at file scope.
struct CommandRegistration {
  explicit CommandRegistration(Command command);
};

}  // namespace llmtune::cli
