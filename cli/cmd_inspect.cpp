// `llmtune inspect RECIPE [--set k=v]...`: the resolved recipe with every default filled in;
// `llmtune inspect --keys`: every recipe key with its type, default, status and help;
// `llmtune inspect FILE.gguf`: a GGUF file's metadata and tensor table.
#include <iostream>

#include "cli/commands.h"
#include "config/config.h"
#include "core/core.h"
#include "export/export.h"

namespace llmtune::cli {

RunFn setup_inspect(CLI::App& app) {
  struct Opts {
    std::string path;
    std::vector<std::string> sets;
    bool keys = false;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("file", o->path, "Recipe (.yaml) to resolve and print, or a .gguf file to describe");
  app.add_option("--set", o->sets, "Override a recipe key: --set key=value (repeatable)");
  app.add_flag("--keys", o->keys, "Print the table of every recipe key instead");
  return [o]() {
    if (o->keys) {
      std::cout << config::format_recipe_keys();
      return 0;
    }
    if (o->path.empty()) fail("inspect needs a recipe file (or --keys); see `llmtune inspect --help`");
    if (o->path.size() > 5 && o->path.substr(o->path.size() - 5) == ".gguf") {
      std::cout << exporter::gguf_describe(exporter::gguf_read(o->path));
      return 0;
    }
    auto recipe = config::load_recipe(o->path, o->sets);
    std::cout << config::recipe_to_yaml(recipe);
    return 0;
  };
}

static const CommandRegistration register_inspect{{120, "inspect", "Print a resolved recipe (every default filled in), the recipe key table, or a GGUF file (metadata, tensors)", setup_inspect}};

}  // namespace llmtune::cli
