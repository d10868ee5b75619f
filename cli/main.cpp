// llmtune entry point: parses the subcommand, runs it, and turns user errors into one
// clear line on stderr (exit 1) instead of a stack dump.
#include <algorithm>
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "core/core.h"

#ifndef LLMTUNE_VERSION
#define LLMTUNE_VERSION "dev"
#endif

namespace llmtune::cli {
namespace {
// Function-local so registrations from other translation units may run before main's statics.
std::vector<Command>& registry() {
  static std::vector<Command> table;
  return table;
}
}  // namespace

CommandRegistration::CommandRegistration(Command command) { registry().push_back(std::move(command)); }

std::vector<Command> commands() {
  std::vector<Command> sorted = registry();
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const Command& a, const Command& b) { return a.order < b.order; });
  return sorted;
}
}  // namespace llmtune::cli

int main(int argc, char** argv) {
  using namespace llmtune;
  CLI::App app{"llmtune: fine-tune Llama-family language models from the command line"};
  app.set_version_flag("--version", std::string("llmtune ") + LLMTUNE_VERSION + " (allocator: " + LLMTUNE_ALLOCATOR + ")");
  app.require_subcommand(1);
  bool quiet = false, verbose = false;
  app.add_flag("-q,--quiet", quiet, "Only print warnings and errors");
  app.add_flag("-v,--verbose", verbose, "Print debug messages");
  std::string table = "Subcommands:\n";
  std::vector<std::pair<CLI::App*, cli::RunFn>> runners;
  for (const auto& c : cli::commands()) {
    CLI::App* sub = app.add_subcommand(c.name, c.summary);
    runners.emplace_back(sub, c.setup(*sub));
    table += fmt::format("  {:<10} {}\n", c.name, c.summary);
  }
  app.footer(table + "\nRun `llmtune SUBCOMMAND --help` for a subcommand's options.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (quiet) log::set_level(log::Level::warn);
  if (verbose) log::set_level(log::Level::debug);
  try {
    for (auto& [sub, run] : runners)
      if (sub->parsed()) return run();
  } catch (const Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    // Library errors (c10::Error and friends) reaching here are bugs or unforeseen input:
    // print only the first line so the user sees the cause, not a backtrace.
    std::string what = e.what();
    auto nl = what.find('\n');
    std::fprintf(stderr, "error: %s\n", what.substr(0, nl).c_str());
    return 1;
  }
  return 0;
}
