// Recipe -> YAML (the resolved recipe of `llmtune inspect` and output_dir/recipe.resolved.yaml)
// and the key table of `llmtune inspect --keys`. Strings are quoted whenever YAML could read
// them as something else, floats print in shortest round-trip form, so parsing gives back the
// same struct.
#include <charconv>
#include <cmath>
#include <fstream>

#include "config/schema_impl.h"
#include "core/core.h"

namespace llmtune::config {
namespace detail {

std::string yaml_scalar(const std::string& s) {
  auto plain_char = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '/' || c == '-' || c == '@' || c == '+' || c == '=';
  };
  bool plain = !s.empty() && std::all_of(s.begin(), s.end(), plain_char);
  if (plain) {
    char c0 = s[0];
    bool ok_start = std::isalpha(static_cast<unsigned char>(c0)) || c0 == '_' || c0 == '/' ||
                    (c0 == '.' && s.size() > 1 && (s[1] == '/' || s[1] == '.'));
    std::string l;
    for (char c : s) l += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    static const char* words[] = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "nan", "inf", "infinity"};
    for (const char* w : words)
      if (l == w) ok_start = false;
    plain = ok_start;
  }
  if (plain) return s;
  // A JSON string is a valid YAML double-quoted scalar (same escapes).
  return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string format_double(double v) {
  if (std::isnan(v)) return ".nan";
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  std::string s = fmt::format("{}", v);
  // YAML 1.1 (PyYAML, so Axolotl) reads 5e-05 as a string: keep a dot in the mantissa.
  auto e = s.find_first_of("eE");
  std::string mant = e == std::string::npos ? s : s.substr(0, e);
  if (mant.find('.') == std::string::npos) mant += ".0";
  return e == std::string::npos ? mant : mant + s.substr(e);
}

std::string kind_name(size_t i) {
  static const char* names[] = {"-",
                                "string", "string",
                                "bool", "bool",
                                "int", "int",
                                "float", "float",
                                "list of strings", "list of floats",
                                "bool|auto", "map of strings", "map of string lists",
                                "any YAML value",
                                "list of dataset entries", "map (trl keys)"};
  return i < std::size(names) ? names[i] : "?";
}

}  // namespace detail

namespace {
using namespace detail;

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

template <class T>
struct FlowText {
  const T& obj;
  std::string operator()(std::monostate) const { return "null"; }
  std::string operator()(std::string T::*m) const { return yaml_scalar(obj.*m); }
  std::string operator()(std::optional<std::string> T::*m) const { return obj.*m ? yaml_scalar(*(obj.*m)) : "null"; }
  std::string operator()(bool T::*m) const { return obj.*m ? "true" : "false"; }
  std::string operator()(std::optional<bool> T::*m) const { return obj.*m ? (*(obj.*m) ? "true" : "false") : "null"; }
  std::string operator()(int64_t T::*m) const { return fmt::format("{}", obj.*m); }
  std::string operator()(std::optional<int64_t> T::*m) const { return obj.*m ? fmt::format("{}", *(obj.*m)) : "null"; }
  std::string operator()(double T::*m) const { return format_double(obj.*m); }
  std::string operator()(std::optional<double> T::*m) const { return obj.*m ? format_double(*(obj.*m)) : "null"; }
  std::string operator()(std::vector<std::string> T::*m) const {
    std::vector<std::string> q;
    for (const auto& s : obj.*m) q.push_back(yaml_scalar(s));
    return "[" + join(q, ", ") + "]";
  }
  std::string operator()(std::vector<double> T::*m) const {
    std::vector<std::string> q;
    for (double d : obj.*m) q.push_back(format_double(d));
    return "[" + join(q, ", ") + "]";
  }
  std::string operator()(Tristate T::*m) const {
    return obj.*m == Tristate::automatic ? "auto" : (obj.*m == Tristate::on ? "true" : "false");
  }
  std::string operator()(StrMap T::*m) const {
    std::vector<std::string> q;
    for (const auto& [k, v] : obj.*m) q.push_back(yaml_scalar(k) + ": " + yaml_scalar(v));
    return "{" + join(q, ", ") + "}";
  }
  std::string operator()(RolesMap T::*m) const {
    std::vector<std::string> q;
    for (const auto& [k, v] : obj.*m) {
      std::vector<std::string> names;
      for (const auto& n : v) names.push_back(yaml_scalar(n));
      q.push_back(yaml_scalar(k) + ": [" + join(names, ", ") + "]");
    }
    return "{" + join(q, ", ") + "}";
  }
  std::string operator()(std::optional<nlohmann::json> T::*m) const {
    return obj.*m ? (obj.*m)->dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) : "null";
  }
  std::string operator()(std::vector<DatasetConfig> T::*m) const { return (obj.*m).empty() ? "[]" : "[...]"; }
  std::string operator()(TrlConfig T::*) const { return "{...}"; }
};

template <class T>
bool is_default(const T& obj, const Field<T>& f) {
  static const T def{};
  return std::visit([&](auto m) -> bool {
    if constexpr (std::is_same_v<decltype(m), std::monostate>) return true;
    else return obj.*m == def.*m;
  }, f.member);
}

// Null optionals and empty containers: skipped inside datasets entries and trl.
template <class T>
bool is_empty(const T& obj, const Field<T>& f) {
  return std::visit([&](auto m) -> bool {
    if constexpr (std::is_same_v<decltype(m), std::monostate>) return true;
    else {
      const auto& v = obj.*m;
      using V = std::decay_t<decltype(v)>;
      if constexpr (requires { v.has_value(); }) return !v.has_value();
      else if constexpr (requires { v.empty(); } && !std::is_same_v<V, std::string>) return v.empty();
      else return false;
    }
  }, f.member);
}

std::vector<std::string> dataset_lines(const DatasetConfig& d) {
  std::vector<std::string> lines;
  const auto& custom = custom_format_keys();
  bool user_defined = d.type == "user_defined";
  for (const auto& f : dataset_fields()) {
    if (f.status == KeyStatus::alias || std::holds_alternative<std::monostate>(f.member)) continue;
    bool is_custom = std::find(custom.begin(), custom.end(), f.name) != custom.end();
    if (user_defined && is_custom) continue;
    if (f.name == "type" && user_defined) {
      std::vector<std::string> parts;
      for (const auto& cf : dataset_fields())
        if (std::find(custom.begin(), custom.end(), cf.name) != custom.end() && !is_empty(d, cf))
          parts.push_back(cf.name + ": " + std::visit(FlowText<DatasetConfig>{d}, cf.member));
      lines.push_back("type: {" + join(parts, ", ") + "}");
      continue;
    }
    if (is_empty(d, f)) continue;
    if (f.status != KeyStatus::implemented && is_default(d, f)) continue;
    lines.push_back(f.name + ": " + std::visit(FlowText<DatasetConfig>{d}, f.member));
  }
  return lines;
}

void emit_datasets(std::string& out, const std::string& name, const std::vector<DatasetConfig>& ds) {
  if (ds.empty()) {
    out += name + ": []\n";
    return;
  }
  out += name + ":\n";
  for (const auto& d : ds) {
    auto lines = dataset_lines(d);
    for (size_t i = 0; i < lines.size(); ++i) out += (i == 0 ? "  - " : "    ") + lines[i] + "\n";
  }
}

}  // namespace

std::string_view to_string(KeyStatus s) {
  switch (s) {
    case KeyStatus::implemented: return "implemented";
    case KeyStatus::accepted_noop: return "accepted-noop";
    case KeyStatus::refused: return "refused";
    case KeyStatus::alias: return "alias";
  }
  return "?";
}

std::string recipe_to_yaml(const Recipe& r) {
  std::string out = "# llmtune resolved recipe: every key with its value or default";
  if (!r.source.name.empty()) out += " (from " + r.source.name + ")";
  out += "\n";
  std::string group;
  std::string pending;  // lines of the current group, printed only if non-empty
  auto flush = [&] {
    if (!pending.empty()) out += "\n# --- " + group + " ---\n" + pending;
    pending.clear();
  };
  for (const auto& f : recipe_fields()) {
    if (f.group != group) { flush(); group = f.group; }
    if (f.status == KeyStatus::alias || std::holds_alternative<std::monostate>(f.member)) continue;
    if (f.status != KeyStatus::implemented && is_default(r, f)) continue;
    if (auto* m = std::get_if<std::vector<DatasetConfig> Recipe::*>(&f.member)) {
      emit_datasets(pending, f.name, r.*(*m));
    } else if (std::holds_alternative<TrlConfig Recipe::*>(f.member)) {
      pending += "trl:\n";
      for (const auto& tf : trl_fields()) {
        if (is_empty(r.trl, tf) || (tf.status != KeyStatus::implemented && is_default(r.trl, tf))) continue;
        pending += "  " + tf.name + ": " + std::visit(FlowText<TrlConfig>{r.trl}, tf.member) + "\n";
      }
    } else {
      pending += f.name + ": " + std::visit(FlowText<Recipe>{r}, f.member) + "\n";
    }
  }
  flush();
  return out;
}

void save_resolved(const Recipe& recipe, const std::filesystem::path& output_dir) {
  std::filesystem::create_directories(output_dir);
  auto final_path = output_dir / "recipe.resolved.yaml";
  auto tmp = output_dir / "recipe.resolved.yaml.tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail("cannot write {}", tmp.string());
    f << recipe_to_yaml(recipe);
    if (!f) fail("cannot write {}", tmp.string());
  }
  std::filesystem::rename(tmp, final_path);
}

namespace {
template <class T>
void add_keys(std::vector<KeyInfo>& out, const std::vector<Field<T>>& fields, const std::string& section) {
  static const T def{};
  for (const auto& f : fields) {
    KeyInfo k;
    k.section = section;
    k.name = f.name;
    k.group = f.group;
    k.type = kind_name(f.member.index());
    if (std::holds_alternative<std::monostate>(f.member)) k.type = f.status == KeyStatus::alias ? "-" : "any";
    k.default_value = f.default_doc.empty() ? std::visit(FlowText<T>{def}, f.member) : f.default_doc;
    if (std::holds_alternative<std::monostate>(f.member)) k.default_value = f.status == KeyStatus::alias ? "-" : "null";
    k.help = f.help;
    k.status = f.status;
    k.note = f.note;
    k.choices = f.choices;
    out.push_back(std::move(k));
  }
}
}  // namespace

const std::vector<KeyInfo>& recipe_keys() {
  static const std::vector<KeyInfo> keys = [] {
    std::vector<KeyInfo> k;
    add_keys(k, recipe_fields(), "");
    add_keys(k, dataset_fields(), "datasets[]");
    add_keys(k, trl_fields(), "trl");
    return k;
  }();
  return keys;
}

std::string format_recipe_keys() {
  std::string out = fmt::format("{:<34} {:<24} {:<14} {:<13} {}\n", "KEY", "TYPE", "DEFAULT", "STATUS", "MEANING");
  std::string group;
  for (const auto& k : recipe_keys()) {
    std::string name = k.section.empty() ? k.name : k.section + (k.section == "trl" ? "." : "") + k.name;
    if (k.section == "datasets[]") name = "datasets[]." + k.name;
    std::string g = k.section.empty() ? k.group : k.section;
    if (g != group) {
      out += fmt::format("\n# {}\n", g == "datasets[]" ? "datasets[] (also test_datasets[], pretraining_dataset[])" : g);
      group = g;
    }
    std::string type = k.choices.empty() ? k.type : join(k.choices, "|");
    std::string meaning = k.help;
    if (k.status == KeyStatus::accepted_noop) meaning += " — no effect: " + k.note;
    if (k.status == KeyStatus::refused) meaning = "refused: " + k.note;
    if (k.status == KeyStatus::alias) meaning = "alias of " + k.note;
    out += fmt::format("{:<34} {:<24} {:<14} {:<13} {}\n", name, type, k.default_value, to_string(k.status), meaning);
  }
  return out;
}

}  // namespace llmtune::config
