// YAML text -> Recipe: walks the registry tables in schema.cpp, so every key is type-checked,
// unknown keys get a did-you-mean with file:line:col, and `--set key=value` overrides are
// applied to the YAML tree first (nested `datasets.0.path`, flow lists) and reported as such.
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "config/schema_impl.h"
#include "core/core.h"

namespace llmtune::config {
namespace detail {

std::string ParseContext::location(int line, int column, const std::string& path) const {
  // An override covers its path and everything below it (datasets=[...] covers datasets.0.path).
  std::string p = path;
  while (!p.empty()) {
    auto it = overrides.find(p);
    if (it != overrides.end()) return "--set " + it->second;
    auto dot = p.rfind('.');
    if (dot == std::string::npos) break;
    p.resize(dot);
  }
  if (line < 0) return source;
  return fmt::format("{}:{}:{}", source, line + 1, column + 1);
}

std::string ParseContext::where(const std::string& key) const {
  auto it = key_locations.find(key);
  return it == key_locations.end() ? std::string("(default)") : it->second;
}

}  // namespace detail

namespace {
using namespace detail;

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// "datasets.0.path" -> "datasets[0].path" for messages.
std::string display_path(const std::string& path) {
  std::string out;
  size_t start = 0;
  while (start <= path.size()) {
    size_t dot = path.find('.', start);
    std::string seg = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    bool index = !seg.empty() && std::all_of(seg.begin(), seg.end(), ::isdigit);
    if (index) out += "[" + seg + "]";
    else out += (out.empty() ? "" : ".") + seg;
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return out;
}

std::string join_path(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

bool is_null(const YAML::Node& n) { return !n.IsDefined() || n.IsNull(); }
bool is_plain(const YAML::Node& n) { return n.Tag() == "?"; }

std::string describe(const YAML::Node& n) {
  if (is_null(n)) return "nothing (null)";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a map";
  std::string s = n.Scalar();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return "`" + s + "`";
}

std::optional<bool> to_bool(const std::string& s) {
  std::string l = lower(s);
  // YAML 1.1 spellings too, because Axolotl recipes are read by PyYAML.
  if (l == "true" || l == "yes" || l == "on") return true;
  if (l == "false" || l == "no" || l == "off") return false;
  return std::nullopt;
}

std::optional<double> to_double(std::string s) {
  if (s == ".inf" || s == "+.inf") return INFINITY;
  if (s == "-.inf") return -INFINITY;
  if (s == ".nan") return NAN;
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  if (s.empty()) return std::nullopt;
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

std::optional<int64_t> to_int(std::string s) {
  if (!s.empty() && s[0] == '+') s.erase(0, 1);
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec == std::errc() && p == s.data() + s.size()) return v;
  // 100.0 or 1e3 written for an integer key: accept when exactly integral (pydantic does too).
  auto d = to_double(s);
  if (d && std::isfinite(*d) && std::floor(*d) == *d && std::fabs(*d) < 9.0e18) return static_cast<int64_t>(*d);
  return std::nullopt;
}

nlohmann::json to_json(const YAML::Node& n) {
  if (is_null(n)) return nullptr;
  if (n.IsSequence()) {
    nlohmann::json a = nlohmann::json::array();
    for (const auto& e : n) a.push_back(to_json(e));
    return a;
  }
  if (n.IsMap()) {
    nlohmann::json o = nlohmann::json::object();
    for (const auto& kv : n) o[kv.first.Scalar()] = to_json(kv.second);
    return o;
  }
  const std::string& s = n.Scalar();
  if (!is_plain(n)) return s;
  std::string l = lower(s);
  if (l == "true") return true;
  if (l == "false") return false;
  int64_t i = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), i);
  if (ec == std::errc() && p == s.data() + s.size()) return i;
  if (auto d = to_double(s); d && std::isfinite(*d)) return *d;
  return s;
}

// Parses one value into its member. Lives in a class so the visitor can reach the context.
template <class T>
struct ValueParser {
  const Field<T>& field;
  const YAML::Node& v;
  const std::string& path;
  ParseContext& ctx;
  T& obj;

  std::string loc() const { return ctx.location(v.Mark().line, v.Mark().column, path); }
  [[noreturn]] void wrong(const std::string& expected) const {
    fail("wrong type for `{}` at {}: expected {}, got {}", display_path(path), loc(), expected, describe(v));
  }
  void check_range(double x) const {
    if (!field.range) return;
    const Range& r = *field.range;
    bool ok = (r.lo_open ? x > r.lo : x >= r.lo) && (r.hi_open ? x < r.hi : x <= r.hi);
    if (!ok || std::isnan(x)) {
      std::string lo = r.lo <= -1e17 ? "-inf" : format_double(r.lo), hi = r.hi >= 1e17 ? "inf" : format_double(r.hi);
      if (std::holds_alternative<int64_t T::*>(field.member) || std::holds_alternative<std::optional<int64_t> T::*>(field.member)) {
        lo = r.lo <= -1e17 ? "-inf" : fmt::format("{}", static_cast<int64_t>(r.lo));
        hi = r.hi >= 1e17 ? "inf" : fmt::format("{}", static_cast<int64_t>(r.hi));
      }
      fail("`{}: {}` at {} is out of range: expected a value in {}{}, {}{}", display_path(path), v.Scalar(), loc(),
           r.lo_open ? "(" : "[", lo, hi, r.hi_open ? ")" : "]");
    }
  }
  std::string scalar() const {
    if (!v.IsScalar()) wrong("a string");
    return v.Scalar();
  }
  std::string str() const {
    std::string s = scalar();
    for (const auto& rule : value_rules()) {
      if (rule.key != field.name || rule.value != s) continue;
      if (rule.refuse) {
        ctx.refusals.push_back(fmt::format("`{}: {}` at {} is not supported: {}", display_path(path), s, loc(), rule.reason));
        return s;
      }
      ctx.notices.push_back(fmt::format("`{}: {}` runs as `{}`: {}", display_path(path), s, rule.rewrite_to, rule.reason));
      return rule.rewrite_to;
    }
    if (!field.choices.empty() && std::find(field.choices.begin(), field.choices.end(), s) == field.choices.end()) {
      std::vector<std::string> all = field.choices;
      for (const auto& rule : value_rules())
        if (rule.key == field.name) all.push_back(rule.value);
      auto guess = closest_match(s, all);
      std::string list;
      for (const auto& c : field.choices) list += (list.empty() ? "" : ", ") + c;
      fail("`{}: {}` at {} is not a valid value; expected one of: {}{}", display_path(path), s, loc(), list,
           guess ? fmt::format(" — did you mean `{}`?", *guess) : std::string());
    }
    return s;
  }
  bool boolean() const {
    if (!v.IsScalar()) wrong("a bool (true or false)");
    auto b = to_bool(v.Scalar());
    if (!b) wrong("a bool (true or false)");
    return *b;
  }
  int64_t integer() const {
    if (!v.IsScalar()) wrong("an integer");
    auto i = to_int(v.Scalar());
    if (!i) wrong("an integer");
    check_range(static_cast<double>(*i));
    return *i;
  }
  double number() const {
    if (!v.IsScalar()) wrong("a number");
    auto d = to_double(v.Scalar());
    if (!d) wrong("a number");
    check_range(*d);
    return *d;
  }
  std::vector<std::string> str_list() const {
    std::vector<std::string> out;
    if (v.IsScalar()) return {v.Scalar()};  // a single name written without brackets
    if (!v.IsSequence()) wrong("a list of strings");
    for (const auto& e : v) {
      if (!e.IsScalar()) wrong("a list of strings");
      out.push_back(e.Scalar());
    }
    return out;
  }
  std::vector<double> num_list() const {
    std::vector<double> out;
    if (!v.IsSequence()) wrong("a list of numbers");
    for (const auto& e : v) {
      auto d = e.IsScalar() ? to_double(e.Scalar()) : std::nullopt;
      if (!d) wrong("a list of numbers");
      out.push_back(*d);
    }
    return out;
  }
  StrMap str_map() const {
    if (!v.IsMap()) wrong("a map of strings");
    StrMap m;
    for (const auto& kv : v) {
      if (!kv.second.IsScalar()) wrong("a map of strings");
      m[kv.first.Scalar()] = kv.second.Scalar();
    }
    return m;
  }
  RolesMap roles_map() const {
    if (!v.IsMap()) wrong("a map from role to a list of role names");
    RolesMap m;
    for (const auto& kv : v) {
      auto& names = m[kv.first.Scalar()];
      if (kv.second.IsScalar()) names.push_back(kv.second.Scalar());
      else if (kv.second.IsSequence()) {
        for (const auto& e : kv.second) {
          if (!e.IsScalar()) wrong("a map from role to a list of role names");
          names.push_back(e.Scalar());
        }
      } else wrong("a map from role to a list of role names");
    }
    return m;
  }

  void operator()(std::monostate) const {}
  void operator()(std::string T::*m) const { obj.*m = str(); }
  void operator()(std::optional<std::string> T::*m) const { obj.*m = str(); }
  void operator()(bool T::*m) const { obj.*m = boolean(); }
  void operator()(std::optional<bool> T::*m) const { obj.*m = boolean(); }
  void operator()(int64_t T::*m) const { obj.*m = integer(); }
  void operator()(std::optional<int64_t> T::*m) const { obj.*m = integer(); }
  void operator()(double T::*m) const { obj.*m = number(); }
  void operator()(std::optional<double> T::*m) const { obj.*m = number(); }
  void operator()(std::vector<std::string> T::*m) const { obj.*m = str_list(); }
  void operator()(std::vector<double> T::*m) const { obj.*m = num_list(); }
  void operator()(Tristate T::*m) const {
    if (v.IsScalar() && lower(v.Scalar()) == "auto") { obj.*m = Tristate::automatic; return; }
    if (!v.IsScalar() || !to_bool(v.Scalar())) wrong("true, false or auto");
    obj.*m = *to_bool(v.Scalar()) ? Tristate::on : Tristate::off;
  }
  void operator()(StrMap T::*m) const { obj.*m = str_map(); }
  void operator()(RolesMap T::*m) const { obj.*m = roles_map(); }
  void operator()(std::optional<nlohmann::json> T::*m) const { obj.*m = to_json(v); }
  void operator()(std::vector<DatasetConfig> T::*m) const;
  void operator()(TrlConfig T::*m) const;
};

template <class T>
const std::vector<Field<T>>& fields_of();
template <>
const std::vector<Field<Recipe>>& fields_of<Recipe>() { return recipe_fields(); }
template <>
const std::vector<Field<DatasetConfig>>& fields_of<DatasetConfig>() { return dataset_fields(); }
template <>
const std::vector<Field<TrlConfig>>& fields_of<TrlConfig>() { return trl_fields(); }

template <class T>
const Field<T>* find_field(const std::string& name) {
  for (const auto& f : fields_of<T>())
    if (f.name == name) return &f;
  return nullptr;
}
template <class T>
std::vector<std::string> field_names() {
  std::vector<std::string> n;
  for (const auto& f : fields_of<T>()) n.push_back(f.name);
  return n;
}

// Null, false, 0 and empty mean "not used": a refused key written that way is harmless
// (Axolotl examples list `relora_steps:` and friends with empty values).
bool harmless(const YAML::Node& v) {
  if (is_null(v)) return true;
  if (v.IsSequence() || v.IsMap()) return v.size() == 0;
  const std::string& s = v.Scalar();
  if (s.empty()) return true;
  if (auto b = to_bool(s); b && !*b) return true;
  if (auto d = to_double(s); d && *d == 0) return true;
  return false;
}

std::string short_text(const YAML::Node& v) {
  std::string s = v.IsScalar() ? v.Scalar() : (v.IsSequence() ? "[...]" : "{...}");
  return s.size() > 40 ? s.substr(0, 37) + "..." : s;
}

template <class T>
bool equals_default(const T& obj, const Field<T>& f) {
  static const T def{};
  return std::visit(
      [&](auto m) -> bool {
        if constexpr (std::is_same_v<decltype(m), std::monostate>) return true;
        else return obj.*m == def.*m;
      },
      f.member);
}

template <class T>
void parse_section(const YAML::Node& map, T& obj, const std::string& prefix, ParseContext& ctx) {
  const std::string where_text = prefix.empty() ? std::string() : " in " + display_path(prefix);
  if (!map.IsMap())
    fail("{} at {} must be a map of keys, got {}", prefix.empty() ? std::string("the recipe") : display_path(prefix),
         ctx.location(map.Mark().line, map.Mark().column, prefix), describe(map));
  std::set<std::string> seen;
  std::map<std::string, std::string> canonical_from;  // canonical key -> "key (location)" that set it
  struct MapAlias { std::string map_field, map_key, value, text; };
  std::vector<MapAlias> map_aliases;

  for (const auto& kv : map) {
    const YAML::Node& k = kv.first;
    const YAML::Node& v = kv.second;
    if (!k.IsScalar()) fail("a key{} at {} is not a plain name", where_text, ctx.location(k.Mark().line, k.Mark().column, prefix));
    const std::string name = k.Scalar();
    const std::string path = join_path(prefix, name);
    const std::string kloc = ctx.location(k.Mark().line, k.Mark().column, path);
    if (!seen.insert(name).second) fail("duplicate key `{}`{} at {}", name, where_text, kloc);
    const Field<T>* f = find_field<T>(name);
    if (!f) {
      auto guess = closest_match(name, field_names<T>());
      if (guess) fail("unknown key `{}`{} at {} — did you mean `{}`?", name, where_text, kloc, *guess);
      fail("unknown key `{}`{} at {} (run `llmtune inspect --keys` for every recipe key)", name, where_text, kloc);
    }
    if (prefix.empty()) ctx.key_locations[name] = kloc;

    if (f->status == KeyStatus::alias) {
      const std::string& target = f->note;
      auto dot = target.find('.');
      if (dot != std::string::npos) {  // alias of one entry of a map key (message_field_role)
        if (!is_null(v)) {
          if (!v.IsScalar()) fail("wrong type for `{}` at {}: expected a string, got {}", display_path(path), kloc, describe(v));
          map_aliases.push_back({target.substr(0, dot), target.substr(dot + 1), v.Scalar(), name + " (" + kloc + ")"});
        }
        continue;
      }
      if (auto it = canonical_from.find(target); it != canonical_from.end())
        fail("`{}` ({}) is an alias of `{}`, which is also set by {}; set only one", name, kloc, target, it->second);
      if (is_null(v)) continue;
      canonical_from[target] = "`" + name + "` (" + kloc + ")";
      const Field<T>* cf = find_field<T>(target);
      std::visit(ValueParser<T>{*cf, v, path, ctx, obj}, cf->member);
      if (prefix.empty()) ctx.key_locations[target] = kloc;
      continue;
    }
    if (auto it = canonical_from.find(name); it != canonical_from.end() && !is_null(v))
      fail("`{}` ({}) is also set by its alias {}; set only one", name, kloc, it->second);
    if (!is_null(v)) canonical_from[name] = "`" + name + "` (" + kloc + ")";

    if (std::holds_alternative<std::monostate>(f->member)) {  // refused, no member
      if (!harmless(v))
        ctx.refusals.push_back(fmt::format("`{}` at {} is not supported: {}", display_path(path), kloc, f->note));
      continue;
    }
    if constexpr (std::is_same_v<T, DatasetConfig>) {
      if (name == "type" && v.IsMap()) {  // Axolotl's custom prompt format
        for (const auto& fkv : v) {
          const std::string fname = fkv.first.Scalar();
          const std::string fpath = path + "." + fname;
          const auto& allowed = custom_format_keys();
          if (std::find(allowed.begin(), allowed.end(), fname) == allowed.end()) {
            auto guess = closest_match(fname, allowed);
            fail("unknown key `{}` in the custom format of {} at {}{}", fname, display_path(prefix),
                 ctx.location(fkv.first.Mark().line, fkv.first.Mark().column, fpath),
                 guess ? fmt::format(" — did you mean `{}`?", *guess) : std::string());
          }
          if (is_null(fkv.second)) continue;
          const Field<T>* ff = find_field<T>(fname);
          std::visit(ValueParser<T>{*ff, fkv.second, fpath, ctx, obj}, ff->member);
        }
        obj.type = "user_defined";
        continue;
      }
    }
    if (is_null(v)) {  // `key:` with no value means "use the default" (as in Axolotl)
      static const T def{};
      std::visit([&](auto m) {
        if constexpr (!std::is_same_v<decltype(m), std::monostate>) obj.*m = def.*m;
      }, f->member);
      continue;
    }
    std::visit(ValueParser<T>{*f, v, path, ctx, obj}, f->member);
    if (f->status == KeyStatus::accepted_noop && !equals_default(obj, *f))
      ctx.notices.push_back(fmt::format("`{}: {}` has no effect: {}", display_path(path), short_text(v), f->note));
    if (f->status == KeyStatus::refused && !equals_default(obj, *f))
      ctx.refusals.push_back(fmt::format("`{}: {}` at {} is not supported: {}", display_path(path), short_text(v), kloc, f->note));
  }

  if constexpr (std::is_same_v<T, DatasetConfig>) {
    for (const auto& a : map_aliases) {
      auto& m = obj.message_property_mappings;
      if (seen.count(a.map_field) && m.count(a.map_key) && m[a.map_key] != a.value)
        fail("{} says `{}` but `{}` in {} says `{}`; set only one", a.text, a.value, a.map_field, display_path(prefix),
             m[a.map_key]);
      m[a.map_key] = a.value;
    }
    // A mapping that names only one property keeps the default for the other.
    obj.message_property_mappings.try_emplace("role", "role");
    obj.message_property_mappings.try_emplace("content", "content");
    if (!obj.path)
      fail("{} at {} has no `path` (the dataset to read: a hub id, file or directory)", display_path(prefix),
           ctx.location(map.Mark().line, map.Mark().column, prefix));
    if (!obj.train_on_eot) obj.train_on_eot = obj.train_on_eos;
  }
}

template <class T>
void ValueParser<T>::operator()(std::vector<DatasetConfig> T::*m) const {
  if (!v.IsSequence()) wrong("a list of dataset entries (`- path: ...`)");
  std::vector<DatasetConfig> out;
  for (size_t i = 0; i < v.size(); ++i) {
    DatasetConfig d;
    parse_section(v[i], d, path + "." + std::to_string(i), ctx);
    out.push_back(std::move(d));
  }
  obj.*m = std::move(out);
}

template <class T>
void ValueParser<T>::operator()(TrlConfig T::*m) const {
  if (!v.IsMap()) wrong("a map of trl keys");
  TrlConfig t;
  parse_section(v, t, path, ctx);
  obj.*m = std::move(t);
}

// --- overrides --------------------------------------------------------------------------

bool is_index(const std::string& s) { return !s.empty() && std::all_of(s.begin(), s.end(), ::isdigit); }

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

template <class T>
const Field<T>& override_field(const std::string& name, const std::string& spec, const std::string& where) {
  const Field<T>* f = find_field<T>(name);
  if (f) return *f;
  auto guess = closest_match(name, field_names<T>());
  fail("unknown key `{}`{} in --set {}{}", name, where, spec,
       guess ? fmt::format(" — did you mean `{}`?", *guess) : std::string(" (run `llmtune inspect --keys`)"));
}

// Checks the dotted path against the schema; returns whether the target takes a string (so a
// value that is not valid YAML, like `You are: helpful`, is kept as text).
bool check_override_path(const std::vector<std::string>& segs, const std::string& spec) {
  const auto& top = override_field<Recipe>(segs[0], spec, "");
  size_t i = 1;
  size_t kind = top.member.index();
  auto is_string = [](size_t k) { return k == 1 || k == 2; };
  auto nested = [&](size_t k) { return k == 12 || k == 13 || k == 14; };  // maps and free JSON
  if (i == segs.size()) return is_string(kind);
  if (kind == 15) {  // datasets
    if (!is_index(segs[i])) fail("--set {}: `{}` is a list; write `{}.N.key` with N the entry index", spec, segs[0], segs[0]);
    if (++i == segs.size()) return false;
    const auto& df = override_field<DatasetConfig>(segs[i], spec, " of a dataset entry");
    ++i;
    if (i == segs.size()) return is_string(df.member.index());
    if (df.name == "type") {
      const auto& allowed = custom_format_keys();
      if (std::find(allowed.begin(), allowed.end(), segs[i]) == allowed.end()) {
        auto guess = closest_match(segs[i], allowed);
        fail("unknown key `{}` of a custom dataset format in --set {}{}", segs[i], spec,
             guess ? fmt::format(" — did you mean `{}`?", *guess) : std::string());
      }
      return i + 1 == segs.size();
    }
    if (nested(df.member.index())) return false;
    fail("--set {}: `{}` is not a map", spec, df.name);
  }
  if (kind == 16) {  // trl
    const auto& tf = override_field<TrlConfig>(segs[i], spec, " of trl");
    if (i + 1 == segs.size()) return is_string(tf.member.index());
    fail("--set {}: `trl.{}` is not a map", spec, tf.name);
  }
  if (nested(kind)) return false;
  fail("--set {}: `{}` is not a map or list, so `{}` cannot go below it", spec, segs[0], segs[0]);
}

void apply_override(YAML::Node& root, const std::string& spec, ParseContext& ctx) {
  auto eq = spec.find('=');
  if (eq == std::string::npos || eq == 0) fail("--set expects key=value (for example lora_r=16), got `{}`", spec);
  std::string key = trim(spec.substr(0, eq));
  std::string text = spec.substr(eq + 1);
  std::vector<std::string> segs;
  for (size_t start = 0;;) {
    size_t dot = key.find('.', start);
    segs.push_back(key.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  for (const auto& s : segs)
    if (s.empty()) fail("--set {}: empty key segment in `{}`", spec, key);
  bool string_target = check_override_path(segs, spec);

  YAML::Node value;
  try {
    value = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    if (!string_target) fail("--set {}: `{}` is not valid YAML ({})", spec, text, e.msg);
    value = YAML::Node(text);
  }
  if (string_target && !is_null(value) && !value.IsScalar()) value = YAML::Node(text);

  // An override of an aliased key replaces whichever spelling the file used.
  if (segs.size() == 1) {
    const auto* f = find_field<Recipe>(segs[0]);
    for (const auto& other : recipe_fields()) {
      if (other.status != KeyStatus::alias) continue;
      if ((f->status == KeyStatus::alias && other.name == segs[0]) || other.note == segs[0]) {
        if (f->status == KeyStatus::alias) root.remove(f->note);
        else root.remove(other.name);
      }
    }
  }

  YAML::Node cur = root;
  for (size_t i = 0; i + 1 < segs.size(); ++i) {
    const std::string& seg = segs[i];
    YAML::Node next;
    if (cur.IsSequence()) {
      size_t idx = std::stoul(seg);
      if (idx > cur.size())
        fail("--set {}: `{}` has {} entries, so index {} does not exist (use {} to add one)", spec, segs[i - 1],
             cur.size(), idx, cur.size());
      if (idx == cur.size()) cur.push_back(YAML::Node(YAML::NodeType::Map));
      next.reset(cur[idx]);
    } else {
      if (!cur[seg].IsDefined() || !(cur[seg].IsMap() || cur[seg].IsSequence()))
        cur[seg] = is_index(segs[i + 1]) ? YAML::Node(YAML::NodeType::Sequence) : YAML::Node(YAML::NodeType::Map);
      next.reset(cur[seg]);
    }
    cur.reset(next);
  }
  const std::string& last = segs.back();
  if (cur.IsSequence()) {
    size_t idx = std::stoul(last);
    if (idx > cur.size()) fail("--set {}: index {} is past the end ({} entries)", spec, idx, cur.size());
    if (idx == cur.size()) cur.push_back(value);
    else cur[idx] = value;
  } else {
    cur[last] = value;
  }
  ctx.overrides[key] = spec;
}

Recipe parse_tree(YAML::Node root, ParseContext& ctx, const std::vector<std::string>& overrides,
                  std::vector<std::string>* notices) {
  if (is_null(root)) root = YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap()) fail("{}: a recipe must be a map of keys (key: value lines), got {}", ctx.source, describe(root));
  for (const auto& o : overrides) apply_override(root, o, ctx);
  Recipe r;
  parse_section(root, r, "", ctx);
  r.source.name = ctx.source;
  resolve_and_check(r, ctx);
  for (const auto& w : ctx.warnings) {
    log::warn(w);
    if (notices) notices->push_back("warning: " + w);
  }
  for (const auto& n : ctx.notices) {
    log::notice(n);
    if (notices) notices->push_back(n);
  }
  return r;
}

}  // namespace

Recipe parse_recipe(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides, std::vector<std::string>* notices) {
  ParseContext ctx;
  ctx.source = source_name;
  ctx.source_dir = std::filesystem::path(source_name).parent_path().string();
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    fail("{}:{}:{}: YAML syntax error: {}", source_name, e.mark.line + 1, e.mark.column + 1, e.msg);
  }
  return parse_tree(root, ctx, overrides, notices);
}

Recipe load_recipe(const std::filesystem::path& file, const std::vector<std::string>& overrides,
                   std::vector<std::string>* notices) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("cannot read recipe {}: {}", file.string(), std::filesystem::exists(file) ? "permission denied" : "no such file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_recipe(ss.str(), file.string(), overrides, notices);
}

Recipe apply_overrides(const Recipe& recipe, const std::vector<std::string>& overrides, std::vector<std::string>* notices) {
  // Errors in the overrides name `--set`; anything else would be a bug in recipe_to_yaml.
  Recipe r = parse_recipe(recipe_to_yaml(recipe), recipe.source.name + " (resolved)", overrides, notices);
  r.source = recipe.source;
  return r;
}

}  // namespace llmtune::config
