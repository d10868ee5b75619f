// Jinja builtins used by chat templates: filters, tests, globals (raise_exception, range, namespace,
// strftime_now, dict) and the safe str/dict methods the immutable sandbox allows. Anything else
// fails naming the construct. Case mapping (upper/lower/title/capitalize) is ASCII-only.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <ctime>
#include "tokenizer/jinja_impl.h"

namespace llmtune::tok::jinja {

Value CallArgs::get(size_t idx, std::string_view name, Value dflt) const {
  if (idx < pos.size()) return pos[idx];
  for (const auto& [k, v] : kw)
    if (k == name) return v;
  return dflt;
}

namespace {

using K = Value::Kind;

// ---- UTF-8 / Python string helpers -----------------------------------------------------------
uint32_t decode_at(const std::string& s, size_t b, size_t e) {
  unsigned char c = s[b];
  uint32_t cp = c < 0x80 ? c : c >= 0xF0 ? (c & 0x07) : c >= 0xE0 ? (c & 0x0F) : (c & 0x1F);
  for (size_t k = b + 1; k < e; ++k) cp = (cp << 6) | (s[k] & 0x3F);
  return cp;
}
bool py_isspace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Python str.strip/lstrip/rstrip with optional chars; keeps provenance.
Value py_strip(const Value& v, const Value& chars, bool left, bool right) {
  const std::string& s = v.str();
  std::vector<size_t> offs = utf8_offsets(s);
  std::vector<uint32_t> set;
  bool by_chars = chars.is_string();
  if (by_chars) {
    auto co = utf8_offsets(chars.str());
    for (size_t k = 0; k + 1 < co.size(); ++k) set.push_back(decode_at(chars.str(), co[k], co[k + 1]));
  }
  auto strip_cp = [&](size_t k) {
    uint32_t cp = decode_at(s, offs[k], offs[k + 1]);
    return by_chars ? std::find(set.begin(), set.end(), cp) != set.end() : py_isspace(cp);
  };
  size_t n = offs.size() - 1, b = 0, e = n;
  if (left)
    while (b < e && strip_cp(b)) ++b;
  if (right)
    while (e > b && strip_cp(e - 1)) --e;
  return Value::string(substr_tagged(*v.s, offs[b], offs[e]));
}

std::string ascii_map(std::string s, int (*f)(int)) {
  for (auto& c : s)
    if (static_cast<unsigned char>(c) < 0x80) c = char(f(static_cast<unsigned char>(c)));
  return s;
}
bool is_alpha_ascii(char c) { return std::isalpha(static_cast<unsigned char>(c)) != 0; }

std::string py_title(const std::string& s) {  // str.title(): word = run of letters
  std::string out = s;
  bool prev_cased = false;
  for (auto& c : out) {
    if (is_alpha_ascii(c)) {
      c = char(prev_cased ? std::tolower(c) : std::toupper(c));
      prev_cased = true;
    } else {
      prev_cased = static_cast<unsigned char>(c) >= 0x80 && prev_cased;
    }
  }
  return out;
}
std::string jinja_title(const std::string& s) {  // do_title: words split at whitespace, - ( { [ <
  std::string out = s;
  bool start = true;
  for (auto& c : out) {
    bool sep = std::isspace(static_cast<unsigned char>(c)) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    if (sep) {
      start = true;
    } else {
      c = char(start ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
      start = false;
    }
  }
  return out;
}
std::string py_capitalize(const std::string& s) {
  std::string out = ascii_map(s, [](int c) { return std::tolower(c); });
  if (!out.empty() && static_cast<unsigned char>(out[0]) < 0x80) out[0] = char(std::toupper(static_cast<unsigned char>(out[0])));
  return out;
}

std::vector<Value> py_split(const Value& v, const Value& sep, int64_t maxsplit) {
  const std::string& s = v.str();
  std::vector<Value> parts;
  if (sep.is_none() || sep.is_undefined()) {
    std::vector<size_t> offs = utf8_offsets(s);
    size_t n = offs.size() - 1, k = 0;
    auto ws = [&](size_t i) { return py_isspace(decode_at(s, offs[i], offs[i + 1])); };
    while (true) {
      while (k < n && ws(k)) ++k;
      if (k >= n) break;
      size_t b = k;
      if (maxsplit >= 0 && int64_t(parts.size()) == maxsplit) {
        size_t e = n;
        while (e > b && ws(e - 1)) --e;
        parts.push_back(Value::string(substr_tagged(*v.s, offs[b], offs[e])));
        break;
      }
      while (k < n && !ws(k)) ++k;
      parts.push_back(Value::string(substr_tagged(*v.s, offs[b], offs[k])));
    }
    return parts;
  }
  const std::string& d = sep.str();
  if (d.empty()) throw Error("empty separator");
  size_t b = 0;
  while (true) {
    size_t p = (maxsplit >= 0 && int64_t(parts.size()) == maxsplit) ? std::string::npos : s.find(d, b);
    if (p == std::string::npos) {
      parts.push_back(Value::string(substr_tagged(*v.s, b, s.size())));
      break;
    }
    parts.push_back(Value::string(substr_tagged(*v.s, b, p)));
    b = p + d.size();
  }
  return parts;
}

std::string py_replace(const std::string& s, const std::string& a, const std::string& b, int64_t count) {
  std::string out;
  if (a.empty()) {  // Python inserts `b` between every character
    auto offs = utf8_offsets(s);
    int64_t done = 0;
    for (size_t k = 0; k + 1 < offs.size(); ++k) {
      if (count < 0 || done < count) out += b, ++done;
      out += s.substr(offs[k], offs[k + 1] - offs[k]);
    }
    if (count < 0 || done < count) out += b;
    return out;
  }
  size_t pos = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    size_t p = s.find(a, pos);
    if (p == std::string::npos) break;
    out += s.substr(pos, p - pos) + b;
    pos = p + a.size();
    ++done;
  }
  return out + s.substr(pos);
}

int64_t py_len(Interp& in, const Value& v, const Loc& loc) {
  switch (v.kind) {
    case K::Undefined: return 0;
    case K::String: return int64_t(utf8_offsets(v.str()).size()) - 1;
    case K::List: return int64_t(v.l->items.size());
    case K::Dict: return int64_t(v.d->items.size());
    case K::Namespace: return int64_t(v.ns->attrs.size());
    default: interp_fail(in, loc, "object of type '" + type_name(v) + "' has no len()");
  }
}

const std::string& need_str(Interp& in, const Value& v, const Loc& loc, const char* what) {
  if (!v.is_string()) interp_fail(in, loc, fmt::format("{} expects a string, got {}", what, type_name(v)));
  return v.str();
}

int64_t need_int(Interp& in, const Value& v, const Loc& loc, const char* what) {
  if (v.kind == K::Int) return v.i;
  if (v.kind == K::Bool) return v.b;
  interp_fail(in, loc, fmt::format("{} expects an integer, got {}", what, type_name(v)));
}

// Dotted attribute lookup used by selectattr/map/join(attribute=...); "0" segments index lists.
Value attr_path(Interp& in, const Value& obj, const std::string& path, const Loc& loc) {
  Value cur = obj;
  size_t b = 0;
  while (true) {
    size_t e = path.find('.', b);
    std::string part = path.substr(b, e == std::string::npos ? std::string::npos : e - b);
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
    cur = digits ? get_item(in, cur, Value::integer(std::stoll(part)), loc) : get_item(in, cur, Value::string(part), loc);
    if (e == std::string::npos) return cur;
    b = e + 1;
  }
}

// ---- methods ---------------------------------------------------------------------------------
Value bound(const std::string& name, std::function<Value(Interp&, CallArgs&, const Loc&)> fn) {
  return Value::func(name, std::move(fn));
}

Value string_method(const Value& self, const std::string& name) {
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    return bound(name, [self, name](Interp&, CallArgs& a, const Loc&) {
      return py_strip(self, a.get(0, "chars", Value::none()), name != "rstrip", name != "lstrip");
    });
  }
  if (name == "split") {
    return bound(name, [self](Interp& in, CallArgs& a, const Loc& loc) {
      Value mx = a.get(1, "maxsplit", Value::integer(-1));
      return Value::list(py_split(self, a.get(0, "sep", Value::none()), need_int(in, mx, loc, "split maxsplit")));
    });
  }
  if (name == "startswith" || name == "endswith") {
    return bound(name, [self, name](Interp& in, CallArgs& a, const Loc& loc) {
      Value p = a.get(0, "prefix");
      std::vector<Value> cands = p.kind == K::List ? p.l->items : std::vector<Value>{p};
      const std::string& s = self.str();
      for (const auto& c : cands) {
        const std::string& x = need_str(in, c, loc, name.c_str());
        bool hit = name == "startswith" ? s.compare(0, x.size(), x) == 0
                                        : (s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0);
        if (hit) return Value::boolean(true);
      }
      return Value::boolean(false);
    });
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize" || name == "swapcase") {
    return bound(name, [self, name](Interp&, CallArgs&, const Loc&) {
      const std::string& s = self.str();
      if (name == "upper") return Value::string(ascii_map(s, [](int c) { return std::toupper(c); }));
      if (name == "lower") return Value::string(ascii_map(s, [](int c) { return std::tolower(c); }));
      if (name == "title") return Value::string(py_title(s));
      if (name == "capitalize") return Value::string(py_capitalize(s));
      return Value::string(ascii_map(s, [](int c) { return std::isupper(c) ? std::tolower(c) : std::toupper(c); }));
    });
  }
  if (name == "replace") {
    return bound(name, [self](Interp& in, CallArgs& a, const Loc& loc) {
      return Value::string(py_replace(self.str(), need_str(in, a.get(0, "old"), loc, "replace"),
                                      need_str(in, a.get(1, "new"), loc, "replace"),
                                      need_int(in, a.get(2, "count", Value::integer(-1)), loc, "replace")));
    });
  }
  if (name == "find" || name == "rfind" || name == "count" || name == "index") {
    return bound(name, [self, name](Interp& in, CallArgs& a, const Loc& loc) {
      const std::string& s = self.str();
      const std::string& x = need_str(in, a.get(0, "sub"), loc, name.c_str());
      if (name == "count") {
        if (x.empty()) return Value::integer(int64_t(utf8_offsets(s).size()));
        int64_t c = 0;
        for (size_t p = s.find(x); p != std::string::npos; p = s.find(x, p + x.size())) ++c;
        return Value::integer(c);
      }
      size_t p = name == "rfind" ? s.rfind(x) : s.find(x);
      if (p == std::string::npos) {
        if (name == "index") interp_fail(in, loc, "substring not found");
        return Value::integer(-1);
      }
      return Value::integer(int64_t(utf8_offsets(s.substr(0, p)).size()) - 1);
    });
  }
  if (name == "join") {
    return bound(name, [self](Interp& in, CallArgs& a, const Loc& loc) {
      Str acc;
      std::vector<Value> items = iterate(in, a.get(0, "iterable"), loc);
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) acc = concat_tagged(acc, *self.s);
        if (!items[k].is_string()) interp_fail(in, loc, "sequence item " + std::to_string(k) + ": expected str instance, " + type_name(items[k]) + " found");
        acc = concat_tagged(acc, *items[k].s);
      }
      return Value::string(std::move(acc));
    });
  }
  if (name == "removeprefix" || name == "removesuffix") {
    return bound(name, [self, name](Interp& in, CallArgs& a, const Loc& loc) {
      const std::string& s = self.str();
      const std::string& x = need_str(in, a.get(0, "prefix"), loc, name.c_str());
      if (name == "removeprefix" && s.compare(0, x.size(), x) == 0) return Value::string(substr_tagged(*self.s, x.size(), s.size()));
      if (name == "removesuffix" && !x.empty() && s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0)
        return Value::string(substr_tagged(*self.s, 0, s.size() - x.size()));
      return self;
    });
  }
  if (name == "splitlines") {
    return bound(name, [self](Interp&, CallArgs&, const Loc&) {
      std::vector<Value> parts;
      const std::string& s = self.str();
      size_t b = 0;
      for (size_t k = 0; k < s.size(); ++k) {
        if (s[k] == '\n' || s[k] == '\r') {
          parts.push_back(Value::string(substr_tagged(*self.s, b, k)));
          if (s[k] == '\r' && k + 1 < s.size() && s[k + 1] == '\n') ++k;
          b = k + 1;
        }
      }
      if (b < s.size()) parts.push_back(Value::string(substr_tagged(*self.s, b, s.size())));
      return Value::list(std::move(parts));
    });
  }
  if (name == "isdigit" || name == "isspace" || name == "isalpha" || name == "isalnum" || name == "islower" || name == "isupper") {
    return bound(name, [self, name](Interp&, CallArgs&, const Loc&) {
      const std::string& s = self.str();
      if (s.empty()) return Value::boolean(false);
      if (name == "islower" || name == "isupper") {
        bool cased = false;
        for (unsigned char c : s) {
          if (std::isalpha(c)) {
            cased = true;
            if (name == "islower" ? std::isupper(c) : std::islower(c)) return Value::boolean(false);
          }
        }
        return Value::boolean(cased);
      }
      for (unsigned char c : s) {
        bool ok = name == "isdigit" ? std::isdigit(c) : name == "isspace" ? std::isspace(c)
                : name == "isalpha" ? std::isalpha(c) : std::isalnum(c);
        if (!ok) return Value::boolean(false);
      }
      return Value::boolean(true);
    });
  }
  return Value::undefined();
}

Value dict_method(const Value& self, const std::string& name) {
  if (name == "get") {
    return bound(name, [self](Interp&, CallArgs& a, const Loc&) {
      Value k = a.get(0, "key");
      const Value* v = k.is_string() ? self.d->find(k.str()) : nullptr;
      return v ? *v : a.get(1, "default", Value::none());
    });
  }
  if (name == "items" || name == "keys" || name == "values") {
    return bound(name, [self, name](Interp&, CallArgs&, const Loc&) {
      std::vector<Value> out;
      for (const auto& [k, v] : self.d->items) {
        if (name == "items") out.push_back(Value::list({Value::string(k), v}, true));
        else if (name == "keys") out.push_back(Value::string(k));
        else out.push_back(v);
      }
      return Value::list(std::move(out));
    });
  }
  return Value::undefined();
}

bool is_mutating(const Value& obj, const std::string& name) {
  static const char* list_mut[] = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse"};
  static const char* dict_mut[] = {"pop", "popitem", "setdefault", "update", "clear"};
  if (obj.kind == K::List)
    return std::any_of(std::begin(list_mut), std::end(list_mut), [&](const char* m) { return name == m; });
  if (obj.kind == K::Dict)
    return std::any_of(std::begin(dict_mut), std::end(dict_mut), [&](const char* m) { return name == m; });
  return false;
}

std::string strftime_at(Interp& in, const std::string& format, const Loc& loc) {
  std::time_t t = in.now_unix >= 0 ? std::time_t(in.now_unix) : std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  std::string buf(256 + format.size() * 8, '\0');
  size_t n = std::strftime(buf.data(), buf.size(), format.c_str(), &tm);
  if (n == 0 && !format.empty()) interp_fail(in, loc, "strftime_now: format produced no output");
  buf.resize(n);
  return buf;
}

Value sort_values(Interp& in, std::vector<Value> items, bool reverse, const Value& attribute, const Loc& loc) {
  auto key = [&](const Value& v) { return attribute.is_string() ? attr_path(in, v, attribute.str(), loc) : v; };
  std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
    Value x = key(a), y = key(b);
    bool lt;
    if (x.is_number() && y.is_number()) lt = x.as_double() < y.as_double();
    else if (x.is_string() && y.is_string()) lt = ascii_map(x.str(), [](int c) { return std::tolower(c); }) < ascii_map(y.str(), [](int c) { return std::tolower(c); });
    else interp_fail(in, loc, "sort: cannot compare " + type_name(x) + " and " + type_name(y));
    return reverse ? false : lt;
  });
  if (reverse) {
    std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
      Value x = key(a), y = key(b);
      if (x.is_number() && y.is_number()) return x.as_double() > y.as_double();
      return ascii_map(x.str(), [](int c) { return std::tolower(c); }) > ascii_map(y.str(), [](int c) { return std::tolower(c); });
    });
  }
  return Value::list(std::move(items));
}

}  // namespace

// ---- attribute / item access -------------------------------------------------------------------
Value get_attr(Interp& in, const Value& obj, const std::string& name, const Loc& loc) {
  switch (obj.kind) {
    case K::Undefined: {
      std::string hint = obj.s ? obj.s->text : "value";
      interp_fail(in, loc, hint.find(' ') == std::string::npos ? "'" + hint + "' is undefined" : hint);
    }
    case K::Dict: {
      Value m = dict_method(obj, name);
      if (!m.is_undefined()) return m;
      if (is_mutating(obj, name)) interp_fail(in, loc, "access to attribute '" + name + "' of 'dict' object is unsafe");
      if (const Value* v = obj.d->find(name)) return *v;
      return Value::undefined("'dict object' has no attribute '" + name + "'");
    }
    case K::String: {
      Value m = string_method(obj, name);
      if (!m.is_undefined()) return m;
      if (name == "format") interp_fail(in, loc, "unsupported Jinja construct: str.format");
      return Value::undefined("'str object' has no attribute '" + name + "'");
    }
    case K::List:
      if (is_mutating(obj, name)) interp_fail(in, loc, "access to attribute '" + name + "' of 'list' object is unsafe");
      return Value::undefined("'list object' has no attribute '" + name + "'");
    case K::Namespace:
      for (const auto& [k, v] : obj.ns->attrs)
        if (k == name) return v;
      return Value::undefined("'Namespace object' has no attribute '" + name + "'");
    default: return Value::undefined("'" + type_name(obj) + " object' has no attribute '" + name + "'");
  }
}

Value get_item(Interp& in, const Value& obj, const Value& key, const Loc& loc) {
  switch (obj.kind) {
    case K::Undefined: return get_attr(in, obj, "", loc);
    case K::Dict: {
      if (key.is_string()) {
        if (const Value* v = obj.d->find(key.str())) return *v;
        Value m = dict_method(obj, key.str());
        if (!m.is_undefined()) return m;
        return Value::undefined("'dict object' has no attribute '" + key.str() + "'");
      }
      return Value::undefined("'dict object' has no attribute '" + to_str(key) + "'");
    }
    case K::List: {
      if (key.kind != K::Int) {
        if (key.is_string()) return get_attr(in, obj, key.str(), loc);
        interp_fail(in, loc, "list indices must be integers, not " + type_name(key));
      }
      int64_t n = int64_t(obj.l->items.size()), k = key.i < 0 ? key.i + n : key.i;
      if (k < 0 || k >= n) return Value::undefined("'list object' has no element " + std::to_string(key.i));
      return obj.l->items[size_t(k)];
    }
    case K::String: {
      if (key.kind != K::Int) {
        if (key.is_string()) return get_attr(in, obj, key.str(), loc);
        interp_fail(in, loc, "string indices must be integers");
      }
      auto offs = utf8_offsets(obj.str());
      int64_t n = int64_t(offs.size()) - 1, k = key.i < 0 ? key.i + n : key.i;
      if (k < 0 || k >= n) return Value::undefined("'str object' has no element " + std::to_string(key.i));
      return Value::string(substr_tagged(*obj.s, offs[k], offs[k + 1]));
    }
    case K::Namespace:
      if (key.is_string()) return get_attr(in, obj, key.str(), loc);
      [[fallthrough]];
    default: return Value::undefined("'" + type_name(obj) + " object' has no element " + repr(key));
  }
}

Value call_value(Interp& in, const Value& f, CallArgs& args, const Loc& loc) {
  if (f.kind == K::Func) return f.fn->fn(in, args, loc);
  if (f.is_undefined()) {
    std::string hint = f.s ? f.s->text : "value";
    interp_fail(in, loc, hint.find(' ') == std::string::npos ? "'" + hint + "' is undefined" : hint);
  }
  interp_fail(in, loc, "'" + type_name(f) + "' object is not callable");
}

std::vector<Value> iterate(Interp& in, const Value& v, const Loc& loc) {
  switch (v.kind) {
    case K::Undefined: return {};
    case K::List: return v.l->items;
    case K::Dict: {
      std::vector<Value> keys;
      for (const auto& kv : v.d->items) keys.push_back(Value::string(kv.first));
      return keys;
    }
    case K::String: {
      auto offs = utf8_offsets(v.str());
      std::vector<Value> chars;
      for (size_t k = 0; k + 1 < offs.size(); ++k) chars.push_back(Value::string(substr_tagged(*v.s, offs[k], offs[k + 1])));
      return chars;
    }
    default: interp_fail(in, loc, "'" + type_name(v) + "' object is not iterable");
  }
}

// ---- globals ---------------------------------------------------------------------------------
Value make_global(Interp& in, const std::string& name) {
  (void)in;
  if (name == "raise_exception") {
    return Value::func(name, [](Interp& in, CallArgs& a, const Loc& loc) -> Value {
      std::string msg = to_str(a.get(0, "message"));
      throw ChatTemplateError(fmt::format("chat template `{}` raised an error (line {}): {}", in.prog.name, loc.line, msg), msg);
    });
  }
  if (name == "range") {
    return Value::func(name, [](Interp& in, CallArgs& a, const Loc& loc) {
      int64_t start = 0, stop, step = 1;
      if (a.pos.size() == 1) {
        stop = need_int(in, a.pos[0], loc, "range");
      } else if (a.pos.size() >= 2) {
        start = need_int(in, a.pos[0], loc, "range");
        stop = need_int(in, a.pos[1], loc, "range");
        if (a.pos.size() > 2) step = need_int(in, a.pos[2], loc, "range");
      } else {
        interp_fail(in, loc, "range expected at least 1 argument");
      }
      if (step == 0) interp_fail(in, loc, "range() arg 3 must not be zero");
      std::vector<Value> out;
      for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
        out.push_back(Value::integer(k));
        if (out.size() > 10'000'000) interp_fail(in, loc, "range too large");
      }
      return Value::list(std::move(out));
    });
  }
  if (name == "namespace" || name == "dict") {
    return Value::func(name, [name](Interp& in, CallArgs& a, const Loc& loc) {
      std::vector<std::pair<std::string, Value>> attrs;
      for (const auto& p : a.pos) {
        if (p.kind != K::Dict) interp_fail(in, loc, name + "() positional argument must be a dict");
        attrs.insert(attrs.end(), p.d->items.begin(), p.d->items.end());
      }
      for (const auto& kv : a.kw) {
        bool found = false;
        for (auto& x : attrs)
          if (x.first == kv.first) x.second = kv.second, found = true;
        if (!found) attrs.push_back(kv);
      }
      if (name == "dict") return Value::dict(std::move(attrs));
      Value v;
      v.kind = K::Namespace;
      v.ns = std::make_shared<NsData>(NsData{std::move(attrs)});
      return v;
    });
  }
  if (name == "strftime_now") {
    return Value::func(name, [](Interp& in, CallArgs& a, const Loc& loc) {
      return Value::string(strftime_at(in, need_str(in, a.get(0, "format"), loc, "strftime_now"), loc));
    });
  }
  return Value::undefined();
}

bool is_known_filter(const std::string& name) {
  static const char* names[] = {"trim", "length", "count", "upper", "lower", "title", "capitalize", "string",
                                "safe", "tojson", "int", "float", "abs", "round", "default", "d", "first",
                                "last", "list", "reverse", "items", "join", "replace", "unique", "sort", "min",
                                "max", "sum", "select", "reject", "selectattr", "rejectattr", "map", "dictsort"};
  return std::any_of(std::begin(names), std::end(names), [&](const char* n) { return name == n; });
}

bool is_known_test(const std::string& name) {
  static const char* names[] = {"defined", "undefined", "none", "string", "mapping", "iterable", "sequence",
                                "number", "integer", "float", "boolean", "true", "false", "callable", "equalto",
                                "eq", "==", "ne", "!=", "sameas", "gt", ">", "ge", ">=", "lt", "<", "le", "<=",
                                "odd", "even", "divisibleby", "in", "lower", "upper"};
  return std::any_of(std::begin(names), std::end(names), [&](const char* n) { return name == n; });
}

// ---- tests -----------------------------------------------------------------------------------
bool apply_test(Interp& in, const std::string& name, const Value& v, CallArgs& a, const Loc& loc) {
  auto arg = [&]() { return a.get(0, "other"); };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.kind == K::Dict;
  if (name == "iterable") return v.kind == K::List || v.kind == K::Dict || v.is_string() || v.is_undefined();
  if (name == "sequence") return v.kind == K::List || v.kind == K::Dict || v.is_string();
  if (name == "number") return v.is_number();
  if (name == "integer") return v.kind == K::Int;
  if (name == "float") return v.kind == K::Float;
  if (name == "boolean") return v.kind == K::Bool;
  if (name == "true") return v.kind == K::Bool && v.b;
  if (name == "false") return v.kind == K::Bool && !v.b;
  if (name == "callable") return v.kind == K::Func;
  if (name == "equalto" || name == "eq" || name == "==") return equals(v, arg());
  if (name == "ne" || name == "!=") return !equals(v, arg());
  if (name == "sameas") {
    Value o = arg();
    if (v.kind != o.kind) return false;
    if (v.kind == K::None || v.kind == K::Undefined) return true;
    if (v.kind == K::Bool) return v.b == o.b;
    return equals(v, o) && (v.kind == K::Int || v.s == o.s || v.l == o.l || v.d == o.d);
  }
  if (name == "gt" || name == ">" || name == "ge" || name == ">=" || name == "lt" || name == "<" || name == "le" || name == "<=") {
    Value o = arg();
    int c;
    if (v.is_number() && o.is_number()) c = v.as_double() < o.as_double() ? -1 : v.as_double() > o.as_double() ? 1 : 0;
    else if (v.is_string() && o.is_string()) c = v.str() < o.str() ? -1 : v.str() > o.str() ? 1 : 0;
    else interp_fail(in, loc, "test `" + name + "`: cannot compare " + type_name(v) + " and " + type_name(o));
    if (name == "gt" || name == ">") return c > 0;
    if (name == "ge" || name == ">=") return c >= 0;
    if (name == "lt" || name == "<") return c < 0;
    return c <= 0;
  }
  if (name == "odd" || name == "even") {
    int64_t x = need_int(in, v, loc, name.c_str());
    return ((x % 2) != 0) == (name == "odd");
  }
  if (name == "divisibleby") {
    int64_t d = need_int(in, arg(), loc, "divisibleby");
    if (d == 0) interp_fail(in, loc, "divisibleby 0");
    return need_int(in, v, loc, "divisibleby") % d == 0;
  }
  if (name == "in") {
    Value o = a.get(0, "seq");
    if (o.is_string()) return v.is_string() && o.str().find(v.str()) != std::string::npos;
    if (o.kind == K::Dict) return v.is_string() && o.d->find(v.str());
    for (const auto& x : iterate(in, o, loc))
      if (equals(v, x)) return true;
    return false;
  }
  if (name == "lower") return v.is_string() && v.str() == ascii_map(v.str(), [](int c) { return std::tolower(c); });
  if (name == "upper") return v.is_string() && v.str() == ascii_map(v.str(), [](int c) { return std::toupper(c); });
  interp_fail(in, loc, "unsupported Jinja test `" + name + "`");
}

// ---- filters ---------------------------------------------------------------------------------
Value apply_filter(Interp& in, const std::string& name, const Value& v, CallArgs& a, const Loc& loc) {
  auto undefined_input = [&]() {
    if (v.is_undefined()) get_attr(in, v, "", loc);  // raises "'x' is undefined"
  };
  if (name == "trim") {
    Value s = v.is_string() ? v : Value::string(to_str(v));
    return py_strip(s, a.get(0, "chars", Value::none()), true, true);
  }
  if (name == "length" || name == "count") return Value::integer(py_len(in, v, loc));
  if (name == "upper") return Value::string(ascii_map(to_str(v), [](int c) { return std::toupper(c); }));
  if (name == "lower") return Value::string(ascii_map(to_str(v), [](int c) { return std::tolower(c); }));
  if (name == "title") return Value::string(jinja_title(to_str(v)));
  if (name == "capitalize") return Value::string(py_capitalize(to_str(v)));
  if (name == "string") return v.is_string() ? v : Value::string(to_str(v));
  if (name == "safe") return v;
  if (name == "tojson") {
    Value ind = a.get(0, "indent", Value::none());
    int indent = -1;
    if (ind.kind == K::Int) indent = int(ind.i);
    else if (!ind.is_none()) interp_fail(in, loc, "tojson indent must be an integer");
    Value ea = a.get(1, "ensure_ascii", Value::boolean(false));
    Value seps = a.get(2, "separators", Value::none());
    std::string isep = indent >= 0 ? "," : ", ", ksep = ": ";
    if (seps.kind == K::List && seps.l->items.size() == 2) {
      isep = need_str(in, seps.l->items[0], loc, "tojson separators");
      ksep = need_str(in, seps.l->items[1], loc, "tojson separators");
    }
    Value sk = a.get(3, "sort_keys", Value::boolean(false));
    if (v.is_undefined()) interp_fail(in, loc, "Object of type Undefined is not JSON serializable");
    try {
      return Value::string(json_dumps(v, indent, truthy(ea), isep, ksep, truthy(sk), loc));
    } catch (const Error& e) {
      interp_fail(in, loc, e.what());
    }
  }
  if (name == "int") {
    Value d = a.get(0, "default", Value::integer(0));
    if (v.kind == K::Int) return v;
    if (v.kind == K::Bool) return Value::integer(v.b);
    if (v.kind == K::Float) return Value::integer(int64_t(v.f));
    if (v.is_string()) {
      std::string s = py_strip(v, Value::none(), true, true).str();
      try {
        size_t used = 0;
        int64_t x = std::stoll(s, &used, 10);
        if (used == s.size()) return Value::integer(x);
        double f = std::stod(s, &used);
        if (used == s.size()) return Value::integer(int64_t(f));
      } catch (const std::exception&) {
      }
    }
    return d;
  }
  if (name == "float") {
    Value d = a.get(0, "default", Value::floating(0.0));
    if (v.is_number()) return Value::floating(v.as_double());
    if (v.is_string()) {
      try {
        size_t used = 0;
        std::string s = py_strip(v, Value::none(), true, true).str();
        double f = std::stod(s, &used);
        if (used == s.size()) return Value::floating(f);
      } catch (const std::exception&) {
      }
    }
    return d;
  }
  if (name == "abs") {
    undefined_input();
    if (v.kind == K::Float) return Value::floating(std::fabs(v.f));
    int64_t x = need_int(in, v, loc, "abs");
    return Value::integer(x < 0 ? -x : x);
  }
  if (name == "round") {
    int64_t prec = need_int(in, a.get(0, "precision", Value::integer(0)), loc, "round");
    Value m = a.get(1, "method", Value::string("common"));
    if (!v.is_number()) interp_fail(in, loc, "round expects a number");
    double x = v.as_double(), p = std::pow(10.0, double(prec));
    std::string method = need_str(in, m, loc, "round");
    if (method == "common") return Value::floating(std::nearbyint(x * p) / p);  // Python: half to even
    if (method == "ceil") return Value::floating(std::ceil(x * p) / p);
    if (method == "floor") return Value::floating(std::floor(x * p) / p);
    interp_fail(in, loc, "round method must be common, ceil or floor");
  }
  if (name == "default" || name == "d") {
    Value d = a.get(0, "default_value", Value::string(""));
    bool boolean = truthy(a.get(1, "boolean", Value::boolean(false)));
    if (v.is_undefined() || (boolean && !truthy(v))) return d;
    return v;
  }
  if (name == "first" || name == "last") {
    std::vector<Value> items = iterate(in, v, loc);
    if (items.empty()) return Value::undefined("No " + name + " item, sequence was empty.");
    return name == "first" ? items.front() : items.back();
  }
  if (name == "list") return Value::list(iterate(in, v, loc));
  if (name == "reverse") {
    if (v.is_string()) {
      auto offs = utf8_offsets(v.str());
      std::string out;
      for (size_t k = offs.size() - 1; k > 0; --k) out += v.str().substr(offs[k - 1], offs[k] - offs[k - 1]);
      return Value::string(std::move(out));
    }
    std::vector<Value> items = iterate(in, v, loc);
    std::reverse(items.begin(), items.end());
    return Value::list(std::move(items));
  }
  if (name == "items") {
    if (v.is_undefined()) return Value::list({});
    if (v.kind != K::Dict) interp_fail(in, loc, "items filter expects a mapping, got " + type_name(v));
    return call_value(in, dict_method(v, "items"), a, loc);
  }
  if (name == "join") {
    Value sep = a.get(0, "d", Value::string(""));
    Value attr = a.get(1, "attribute", Value::none());
    Str acc;
    std::vector<Value> items = iterate(in, v, loc);
    Str sep_s = to_tagged_str(sep);
    for (size_t k = 0; k < items.size(); ++k) {
      if (k) acc = concat_tagged(acc, sep_s);
      Value it = attr.is_none() ? items[k] : attr_path(in, items[k], to_str(attr), loc);
      acc = concat_tagged(acc, to_tagged_str(it));
    }
    return Value::string(std::move(acc));
  }
  if (name == "replace") {
    return Value::string(py_replace(to_str(v), to_str(a.get(0, "old")), to_str(a.get(1, "new")),
                                    need_int(in, a.get(2, "count", Value::integer(-1)), loc, "replace")));
  }
  if (name == "unique") {
    std::vector<Value> out;
    for (const auto& x : iterate(in, v, loc)) {
      bool seen = false;
      for (const auto& y : out) {
        if (x.is_string() && y.is_string()) seen |= ascii_map(x.str(), [](int c) { return std::tolower(c); }) == ascii_map(y.str(), [](int c) { return std::tolower(c); });
        else seen |= equals(x, y);
      }
      if (!seen) out.push_back(x);
    }
    return Value::list(std::move(out));
  }
  if (name == "sort") {
    return sort_values(in, iterate(in, v, loc), truthy(a.get(0, "reverse", Value::boolean(false))),
                       a.get(2, "attribute", Value::none()), loc);
  }
  if (name == "min" || name == "max" || name == "sum") {
    std::vector<Value> items = iterate(in, v, loc);
    if (name == "sum") {
      Value acc = a.get(1, "start", Value::integer(0));
      bool fl = acc.kind == K::Float;
      double f = acc.as_double();
      int64_t i = acc.kind == K::Int ? acc.i : 0;
      for (const auto& x : items) {
        if (!x.is_number()) interp_fail(in, loc, "sum expects numbers");
        fl |= x.kind == K::Float;
        f += x.as_double();
        i += x.kind == K::Float ? 0 : (x.kind == K::Bool ? x.b : x.i);
      }
      return fl ? Value::floating(f) : Value::integer(i);
    }
    if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
    Value sorted = sort_values(in, items, name == "max", Value::none(), loc);
    return sorted.l->items.front();
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    bool attr_mode = name == "selectattr" || name == "rejectattr";
    bool want = name == "select" || name == "selectattr";
    size_t off = attr_mode ? 1 : 0;
    std::string attr = attr_mode ? to_str(a.get(0, "attribute")) : "";
    Value test = off < a.pos.size() ? a.pos[off] : Value::none();
    CallArgs targs;
    for (size_t k = off + 1; k < a.pos.size(); ++k) targs.pos.push_back(a.pos[k]);
    std::vector<Value> out;
    for (const auto& x : iterate(in, v, loc)) {
      Value subject = attr_mode ? attr_path(in, x, attr, loc) : x;
      bool r = test.is_none() ? truthy(subject) : apply_test(in, need_str(in, test, loc, name.c_str()), subject, targs, loc);
      if (r == want) out.push_back(x);
    }
    return Value::list(std::move(out));
  }
  if (name == "map") {
    std::vector<Value> out;
    Value attribute = a.get(99, "attribute", Value::none());
    if (!attribute.is_none()) {
      Value dflt = a.get(99, "default");
      for (const auto& x : iterate(in, v, loc)) {
        Value r = attr_path(in, x, to_str(attribute), loc);
        out.push_back(r.is_undefined() && !dflt.is_undefined() ? dflt : r);
      }
      return Value::list(std::move(out));
    }
    if (a.pos.empty()) interp_fail(in, loc, "map requires a filter name or attribute=");
    std::string fname = need_str(in, a.pos[0], loc, "map");
    CallArgs fargs;
    fargs.pos.assign(a.pos.begin() + 1, a.pos.end());
    fargs.kw = a.kw;
    for (const auto& x : iterate(in, v, loc)) {
      CallArgs copy = fargs;
      out.push_back(apply_filter(in, fname, x, copy, loc));
    }
    return Value::list(std::move(out));
  }
  if (name == "dictsort") {
    if (v.kind != K::Dict) interp_fail(in, loc, "dictsort expects a mapping");
    std::vector<Value> items;
    for (const auto& [k, x] : v.d->items) items.push_back(Value::list({Value::string(k), x}, true));
    std::stable_sort(items.begin(), items.end(), [](const Value& p, const Value& q) {
      return ascii_map(p.l->items[0].str(), [](int c) { return std::tolower(c); }) < ascii_map(q.l->items[0].str(), [](int c) { return std::tolower(c); });
    });
    return Value::list(std::move(items));
  }
  interp_fail(in, loc, "unsupported Jinja filter `" + name + "`");
}

}  // namespace llmtune::tok::jinja
