// Jinja values with Python semantics: truthiness, str()/repr() printing (None, True, 1.0, lists as
// ['a', 1]), equality, json.dumps-compatible serialization (ensure_ascii, indent, separators), and
// provenance-preserving string slicing/concatenation. Integers are int64 (Python's are unbounded).
#include <algorithm>
#include <charconv>
#include <cmath>
#include "tokenizer/jinja_impl.h"

namespace llmtune::tok::jinja {

const Value* DictData::find(std::string_view key) const {
  for (const auto& kv : items)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

Value Value::undefined(std::string hint) {
  Value v;
  if (!hint.empty()) v.s = std::make_shared<Str>(Str{std::move(hint), {}});
  return v;
}
Value Value::none() {
  Value v;
  v.kind = Kind::None;
  return v;
}
Value Value::boolean(bool x) {
  Value v;
  v.kind = Kind::Bool;
  v.b = x;
  return v;
}
Value Value::integer(int64_t x) {
  Value v;
  v.kind = Kind::Int;
  v.i = x;
  return v;
}
Value Value::floating(double x) {
  Value v;
  v.kind = Kind::Float;
  v.f = x;
  return v;
}
Value Value::string(std::string x) { return string(Str{std::move(x), {}}); }
Value Value::string(Str x) {
  Value v;
  v.kind = Kind::String;
  v.s = std::make_shared<Str>(std::move(x));
  return v;
}
Value Value::list(std::vector<Value> items, bool tuple) {
  Value v;
  v.kind = Kind::List;
  v.l = std::make_shared<ListData>(ListData{std::move(items), tuple});
  return v;
}
Value Value::dict(std::vector<std::pair<std::string, Value>> items) {
  Value v;
  v.kind = Kind::Dict;
  v.d = std::make_shared<DictData>(DictData{std::move(items)});
  return v;
}
Value Value::func(std::string name, std::function<Value(Interp&, CallArgs&, const Loc&)> fn) {
  Value v;
  v.kind = Kind::Func;
  v.fn = std::make_shared<Callable>(Callable{std::move(name), std::move(fn)});
  return v;
}

Value Value::from_json(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null: return none();
    case Json::value_t::boolean: return boolean(j.get<bool>());
    case Json::value_t::number_integer: return integer(j.get<int64_t>());
    case Json::value_t::number_unsigned: return integer(int64_t(j.get<uint64_t>()));
    case Json::value_t::number_float: return floating(j.get<double>());
    case Json::value_t::string: return string(j.get<std::string>());
    case Json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& x : j) items.push_back(from_json(x));
      return list(std::move(items));
    }
    case Json::value_t::object: {
      std::vector<std::pair<std::string, Value>> items;
      items.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it) items.emplace_back(it.key(), from_json(it.value()));
      return dict(std::move(items));
    }
    default: return undefined();
  }
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined:
    case Value::Kind::None: return false;
    case Value::Kind::Bool: return v.b;
    case Value::Kind::Int: return v.i != 0;
    case Value::Kind::Float: return v.f != 0.0;
    case Value::Kind::String: return !v.s->text.empty();
    case Value::Kind::List: return !v.l->items.empty();
    case Value::Kind::Dict: return !v.d->items.empty();
    default: return true;
  }
}

// Python's repr(float): shortest round-trip digits; scientific when exp < -4 or >= 16.
std::string float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  size_t e = s.find('e');
  std::string mant = s.substr(0, e);
  int exp = std::stoi(s.substr(e + 1));
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp < -4 || exp >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  } else if (exp < 0) {
    out = "0." + std::string(size_t(-exp - 1), '0') + digits;
  } else {
    if (digits.size() <= size_t(exp) + 1) {
      out = digits + std::string(size_t(exp) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, size_t(exp) + 1) + "." + digits.substr(size_t(exp) + 1);
    }
  }
  return neg ? "-" + out : out;
}

static std::string py_str_repr(const std::string& s) {
  bool has_sq = s.find('\'') != std::string::npos, has_dq = s.find('"') != std::string::npos;
  char q = (has_sq && !has_dq) ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == (unsigned char)q) out += std::string("\\") + char(q);
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += char(c);
  }
  return out + q;
}

std::string repr(const Value& v) {
  if (v.kind == Value::Kind::String) return py_str_repr(v.s->text);
  return to_str(v);
}

std::string to_str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "";
    case Value::Kind::None: return "None";
    case Value::Kind::Bool: return v.b ? "True" : "False";
    case Value::Kind::Int: return std::to_string(v.i);
    case Value::Kind::Float: return float_repr(v.f);
    case Value::Kind::String: return v.s->text;
    case Value::Kind::List: {
      std::string out = v.l->tuple ? "(" : "[";
      for (size_t k = 0; k < v.l->items.size(); ++k) out += (k ? ", " : "") + repr(v.l->items[k]);
      if (v.l->tuple && v.l->items.size() == 1) out += ",";
      return out + (v.l->tuple ? ")" : "]");
    }
    case Value::Kind::Dict: {
      std::string out = "{";
      for (size_t k = 0; k < v.d->items.size(); ++k)
        out += (k ? ", " : "") + py_str_repr(v.d->items[k].first) + ": " + repr(v.d->items[k].second);
      return out + "}";
    }
    case Value::Kind::Func: return "<function " + v.fn->name + ">";
    case Value::Kind::Namespace: {
      std::string out = "<Namespace {";
      for (size_t k = 0; k < v.ns->attrs.size(); ++k)
        out += (k ? ", " : "") + py_str_repr(v.ns->attrs[k].first) + ": " + repr(v.ns->attrs[k].second);
      return out + "}>";
    }
  }
  return "";
}

Str to_tagged_str(const Value& v) {
  if (v.kind == Value::Kind::String) return *v.s;
  return Str{to_str(v), {}};
}

std::string type_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "Undefined";
    case Value::Kind::None: return "NoneType";
    case Value::Kind::Bool: return "bool";
    case Value::Kind::Int: return "int";
    case Value::Kind::Float: return "float";
    case Value::Kind::String: return "str";
    case Value::Kind::List: return v.l->tuple ? "tuple" : "list";
    case Value::Kind::Dict: return "dict";
    case Value::Kind::Func: return "function";
    case Value::Kind::Namespace: return "Namespace";
  }
  return "?";
}

bool equals(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Value::Kind::Float || b.kind == Value::Kind::Float) return a.as_double() == b.as_double();
    return (a.kind == Value::Kind::Bool ? int64_t(a.b) : a.i) == (b.kind == Value::Kind::Bool ? int64_t(b.b) : b.i);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::Undefined:
    case Value::Kind::None: return true;
    case Value::Kind::String: return a.s->text == b.s->text;
    case Value::Kind::List: {
      if (a.l->items.size() != b.l->items.size()) return false;
      for (size_t k = 0; k < a.l->items.size(); ++k)
        if (!equals(a.l->items[k], b.l->items[k])) return false;
      return true;
    }
    case Value::Kind::Dict: {
      if (a.d->items.size() != b.d->items.size()) return false;
      for (const auto& kv : a.d->items) {
        const Value* o = b.d->find(kv.first);
        if (!o || !equals(kv.second, *o)) return false;
      }
      return true;
    }
    case Value::Kind::Func: return a.fn == b.fn;
    case Value::Kind::Namespace: return a.ns == b.ns;
    default: return false;
  }
}

Json to_json(const Value& v, const Loc& loc) {
  switch (v.kind) {
    case Value::Kind::None: return nullptr;
    case Value::Kind::Bool: return v.b;
    case Value::Kind::Int: return v.i;
    case Value::Kind::Float: return v.f;
    case Value::Kind::String: return v.s->text;
    case Value::Kind::List: {
      Json j = Json::array();
      for (const auto& x : v.l->items) j.push_back(to_json(x, loc));
      return j;
    }
    case Value::Kind::Dict: {
      Json j = Json::object();
      for (const auto& kv : v.d->items) j[kv.first] = to_json(kv.second, loc);
      return j;
    }
    default: throw Error("Object of type " + type_name(v) + " is not JSON serializable");
  }
}

static void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  for (size_t k = 0; k < s.size(); ++k) {
    unsigned char c = s[k];
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          out += fmt::format("\\u{:04x}", c);
        } else if (c >= 0x80 && ensure_ascii) {
          // decode one UTF-8 code point and write \uXXXX (surrogate pairs above the BMP)
          uint32_t cp = 0;
          int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
          cp = extra == 3 ? (c & 0x07) : extra == 2 ? (c & 0x0F) : extra == 1 ? (c & 0x1F) : c;
          for (int m = 0; m < extra && k + 1 < s.size(); ++m) cp = (cp << 6) | (s[++k] & 0x3F);
          if (cp >= 0x10000) {
            cp -= 0x10000;
            out += fmt::format("\\u{:04x}\\u{:04x}", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
          } else {
            out += fmt::format("\\u{:04x}", cp);
          }
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

static void dumps(std::string& out, const Value& v, int indent, int level, bool ensure_ascii,
                  const std::string& isep, const std::string& ksep, bool sort_keys, const Loc& loc) {
  auto newline = [&](int lvl) {
    out += '\n';
    out.append(size_t(indent) * size_t(lvl), ' ');
  };
  switch (v.kind) {
    case Value::Kind::None: out += "null"; return;
    case Value::Kind::Bool: out += v.b ? "true" : "false"; return;
    case Value::Kind::Int: out += std::to_string(v.i); return;
    case Value::Kind::Float:
      if (std::isnan(v.f)) out += "NaN";
      else if (std::isinf(v.f)) out += v.f > 0 ? "Infinity" : "-Infinity";
      else out += float_repr(v.f);
      return;
    case Value::Kind::String: json_string(out, v.s->text, ensure_ascii); return;
    case Value::Kind::List: {
      if (v.l->items.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.l->items.size(); ++k) {
        if (k) out += isep;
        if (indent >= 0) newline(level + 1);
        dumps(out, v.l->items[k], indent, level + 1, ensure_ascii, isep, ksep, sort_keys, loc);
      }
      if (indent >= 0) newline(level);
      out += ']';
      return;
    }
    case Value::Kind::Dict: {
      if (v.d->items.empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : v.d->items) items.push_back(&kv);
      if (sort_keys)
        std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += isep;
        if (indent >= 0) newline(level + 1);
        json_string(out, items[k]->first, ensure_ascii);
        out += ksep;
        dumps(out, items[k]->second, indent, level + 1, ensure_ascii, isep, ksep, sort_keys, loc);
      }
      if (indent >= 0) newline(level);
      out += '}';
      return;
    }
    default: throw Error("Object of type " + type_name(v) + " is not JSON serializable");
  }
}

std::string json_dumps(const Value& v, int indent, bool ensure_ascii, const std::string& item_sep,
                       const std::string& key_sep, bool sort_keys, const Loc& loc) {
  std::string out;
  dumps(out, v, indent, 0, ensure_ascii, item_sep, key_sep, sort_keys, loc);
  return out;
}

std::vector<size_t> utf8_offsets(std::string_view s) {
  std::vector<size_t> offs;
  offs.reserve(s.size() + 1);
  for (size_t k = 0; k < s.size(); ++k)
    if ((static_cast<unsigned char>(s[k]) & 0xC0) != 0x80) offs.push_back(k);
  offs.push_back(s.size());
  return offs;
}

// Substring keeping provenance; segments outside the window collapse to an empty segment at the
// nearest edge, so content that was trimmed to nothing is still located.
Str substr_tagged(const Str& s, size_t b, size_t e) {
  Str out{s.text.substr(b, e - b), {}};
  for (const auto& g : s.segs) {
    size_t ns = std::clamp(g.start, b, e), ne = std::clamp(g.end, b, e);
    out.segs.push_back(Seg{ns - b, ne - b, g.kind, g.msg});
  }
  return out;
}

Str concat_tagged(const Str& a, const Str& b) {
  Str out{a.text + b.text, a.segs};
  for (const auto& g : b.segs) out.segs.push_back(Seg{g.start + a.text.size(), g.end + a.text.size(), g.kind, g.msg});
  return out;
}

void Out::write(const Str& s) {
  for (const auto& g : s.segs) segs.push_back(Seg{g.start + text.size(), g.end + text.size(), g.kind, g.msg});
  text += s.text;
}

}  // namespace llmtune::tok::jinja
