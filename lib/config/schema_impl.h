// Internal: how registry entries bind YAML keys to struct members. A Field names a key, points
// at the member it fills (or at nothing, for refused and alias keys) and carries its help and
// status; parse.cpp and emit.cpp walk these tables generically, so a key is declared once.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "config/config.h"

namespace llmtune::config::detail {

template <class T>
using Member = std::variant<std::monostate,                        //
                            std::string T::*, std::optional<std::string> T::*,  //
                            bool T::*, std::optional<bool> T::*,     //
                            int64_t T::*, std::optional<int64_t> T::*,  //
                            double T::*, std::optional<double> T::*,  //
                            std::vector<std::string> T::*, std::vector<double> T::*,  //
                            Tristate T::*, StrMap T::*, RolesMap T::*,  //
                            std::optional<nlohmann::json> T::*,      //
                            std::vector<DatasetConfig> T::*, TrlConfig T::*>;

struct Range {
  double lo, hi;
  bool lo_open = false, hi_open = false;
};

template <class T>
struct Field {
  std::string name;
  Member<T> member;
  KeyStatus status = KeyStatus::implemented;
  std::string group;
  std::string help;
  std::string note;                  // no-op: why; refused: reason; alias: canonical key
  std::vector<std::string> choices;  // enum-like strings
  std::optional<Range> range;
  std::string default_doc;           // for derived defaults ("= micro_batch_size")

  Field with_choices(std::vector<std::string> c) const { Field f = *this; f.choices = std::move(c); return f; }
  Field with_range(double lo, double hi, bool lo_open = false, bool hi_open = false) const {
    Field f = *this; f.range = Range{lo, hi, lo_open, hi_open}; return f;
  }
  Field with_default_doc(std::string d) const { Field f = *this; f.default_doc = std::move(d); return f; }
};

const std::vector<Field<Recipe>>& recipe_fields();
const std::vector<Field<DatasetConfig>>& dataset_fields();
const std::vector<Field<TrlConfig>>& trl_fields();

// A value of an enum-like key that is accepted by mapping it onto an implemented one (with a
// notice), or refused with a reason.
struct ValueRule {
  std::string key, value;
  bool refuse;
  std::string rewrite_to;  // when !refuse
  std::string reason;
};
const std::vector<ValueRule>& value_rules();

// Names of the keys of a dataset entry's custom `type:` map (Axolotl's user-defined format).
const std::vector<std::string>& custom_format_keys();

// Text helpers shared by parse and emit.
std::string yaml_scalar(const std::string& s);  // plain if safe, else double-quoted
std::string format_double(double v);            // shortest round-trip text that reads as a float
std::string kind_name(size_t variant_index);    // "int", "list of strings", ...

}  // namespace llmtune::config::detail

namespace llmtune::config::detail {

// State of one parse: where values came from (for messages), and what to report at the end.
struct ParseContext {
  std::string source;                              // file name for file:line:col
  std::string source_dir;                          // for relative paths inside the recipe
  std::map<std::string, std::string> overrides;    // dotted path -> the `key=value` that set it
  std::map<std::string, std::string> key_locations;  // top-level key -> where it was set
  std::vector<std::string> notices;                // accepted no-op keys, rewritten values
  std::vector<std::string> warnings;               // keys that are set but have no effect here
  std::vector<std::string> refusals;               // refused keys; thrown after contradictions
  // "file:line:col" for a 0-based YAML mark, or "--set k=v" if the path came from an override.
  std::string location(int line, int column, const std::string& path) const;
  std::string where(const std::string& key) const;  // key_locations entry or "(default)"
};

// Dependent defaults, contradictions, refusals, warnings (validate.cpp). Throws llmtune::Error.
void resolve_and_check(Recipe& recipe, ParseContext& ctx);

}  // namespace llmtune::config::detail
