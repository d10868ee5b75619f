// Jinja evaluator: executes statements into an output buffer and evaluates expressions with
// Python/Jinja semantics. Scoping follows Jinja: each for-loop iteration and each macro call gets a
// fresh scope (so `set` inside a loop does not leak — hence namespace()), `if` does not.
// Each iteration over a message dict is recorded as a Turn segment for span reporting.
#include <cmath>
#include <optional>
#include "tokenizer/jinja_impl.h"

namespace llmtune::tok::jinja {

Value* Frame::find(std::string_view name) {
  for (Frame* f = this; f; f = f->parent)
    for (auto& kv : f->vars)
      if (kv.first == name) return &kv.second;
  return nullptr;
}
void Frame::set(const std::string& name, Value v) {
  for (auto& kv : vars)
    if (kv.first == name) {
      kv.second = std::move(v);
      return;
    }
  vars.emplace_back(name, std::move(v));
}

int Interp::message_index(const Value& v) const {
  if (v.kind != Value::Kind::Dict) return -1;
  for (const auto& [p, idx] : message_dicts)
    if (p == v.d.get()) return idx;
  return -1;
}

void interp_fail(Interp& in, const Loc& loc, const std::string& msg) { fail_at(in.prog.name, loc, msg); }

namespace {

[[noreturn]] void undefined_error(Interp& in, const Value& v, const Loc& loc) {
  std::string hint = v.s ? v.s->text : "a value";
  interp_fail(in, loc, hint.find(' ') == std::string::npos ? "'" + hint + "' is undefined" : hint);
}

int64_t py_floordiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

class Exec {
 public:
  explicit Exec(Interp& in) : in_(in) {}

  void body(const Body& b, Frame& f, Out& out) {
    for (const auto& s : b) {
      stmt(*s, f, out);
      if (in_.ctrl != Interp::Ctrl::None) return;
    }
  }

  Value eval(const Expr& e, Frame& f) {
    switch (e.kind) {
      case EK::Literal: return e.lit;
      case EK::Name: {
        if (Value* v = f.find(e.name)) return *v;
        Value g = make_global(in_, e.name);
        if (!g.is_undefined()) return g;
        return Value::undefined(e.name);
      }
      case EK::List:
      case EK::Tuple: {
        std::vector<Value> items;
        for (const auto& a : e.args) items.push_back(eval(*a, f));
        return Value::list(std::move(items), e.kind == EK::Tuple);
      }
      case EK::Dict: {
        std::vector<std::pair<std::string, Value>> items;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k], f);
          if (!key.is_string()) interp_fail(in_, e.args[k]->loc, "unsupported dict literal key of type " + type_name(key) + " (only string keys)");
          Value val = eval(*e.args[k + 1], f);
          bool found = false;
          for (auto& kv : items)
            if (kv.first == key.str()) kv.second = val, found = true;
          if (!found) items.emplace_back(key.str(), std::move(val));
        }
        return Value::dict(std::move(items));
      }
      case EK::Attr: return get_attr(in_, eval(*e.args[0], f), e.name, e.loc);
      case EK::Subscript: {
        Value obj = eval(*e.args[0], f);
        if (e.args[1]->kind == EK::Slice) return slice(obj, *e.args[1], f);
        return get_item(in_, obj, eval(*e.args[1], f), e.loc);
      }
      case EK::Slice: interp_fail(in_, e.loc, "slice outside a subscript");
      case EK::Call: {
        Value callee = eval(*e.args[0], f);
        CallArgs args = call_args(e, f, 1);
        return call_value(in_, callee, args, e.loc);
      }
      case EK::Filter: return filter(e, e.args[0] ? eval(*e.args[0], f) : Value::undefined(), f);
      case EK::Test: {
        Value subject = eval(*e.args[0], f);
        CallArgs args = call_args(e, f, 1);
        return Value::boolean(apply_test(in_, e.name, subject, args, e.loc) != e.negated);
      }
      case EK::Not: return Value::boolean(!truthy(eval(*e.args[0], f)));
      case EK::Neg:
      case EK::Pos: {
        Value v = eval(*e.args[0], f);
        if (v.is_undefined()) undefined_error(in_, v, e.loc);
        if (!v.is_number()) interp_fail(in_, e.loc, "bad operand type for unary " + std::string(e.kind == EK::Neg ? "-" : "+") + ": '" + type_name(v) + "'");
        if (e.kind == EK::Pos) return v.kind == Value::Kind::Bool ? Value::integer(v.b) : v;
        if (v.kind == Value::Kind::Float) return Value::floating(-v.f);
        return Value::integer(-(v.kind == Value::Kind::Bool ? int64_t(v.b) : v.i));
      }
      case EK::And: {
        Value l = eval(*e.args[0], f);
        return truthy(l) ? eval(*e.args[1], f) : l;
      }
      case EK::Or: {
        Value l = eval(*e.args[0], f);
        return truthy(l) ? l : eval(*e.args[1], f);
      }
      case EK::Cond: {
        if (truthy(eval(*e.args[1], f))) return eval(*e.args[0], f);
        return e.args[2] ? eval(*e.args[2], f) : Value::undefined("the false branch of an inline if");
      }
      case EK::Concat: {
        Str acc;
        for (const auto& a : e.args) acc = concat_tagged(acc, to_tagged_str(eval(*a, f)));
        return Value::string(std::move(acc));
      }
      case EK::Compare: {
        Value left = eval(*e.args[0], f);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k + 1], f);
          if (!compare(e.ops[k], left, right, e.loc)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case EK::Binary: return binary(e.name, eval(*e.args[0], f), eval(*e.args[1], f), e.loc);
    }
    interp_fail(in_, e.loc, "unsupported expression");
  }

 private:
  CallArgs call_args(const Expr& e, Frame& f, size_t first) {
    CallArgs a;
    for (size_t k = first; k < e.args.size(); ++k) a.pos.push_back(eval(*e.args[k], f));
    for (const auto& [k, v] : e.kwargs) a.kw.emplace_back(k, eval(*v, f));
    return a;
  }

  Value filter(const Expr& e, Value input, Frame& f) {
    CallArgs args = call_args(e, f, 1);
    return apply_filter(in_, e.name, input, args, e.loc);
  }

  // Applies a filter chain parsed with a null input (filter blocks, `set x | f`) to `input`.
  Value filter_chain(const Expr& e, Value input, Frame& f) {
    if (e.args[0]) input = filter_chain(*e.args[0], std::move(input), f);
    return filter(e, std::move(input), f);
  }

  Value slice(const Value& obj, const Expr& sl, Frame& f) {
    auto part = [&](size_t k) -> std::optional<int64_t> {
      if (!sl.args[k]) return std::nullopt;
      Value v = eval(*sl.args[k], f);
      if (v.is_none()) return std::nullopt;
      if (v.kind != Value::Kind::Int) interp_fail(in_, sl.loc, "slice indices must be integers or None");
      return v.i;
    };
    auto start = part(0), stop = part(1), stepv = part(2);
    int64_t step = stepv.value_or(1);
    if (step == 0) interp_fail(in_, sl.loc, "slice step cannot be zero");
    if (obj.is_undefined()) undefined_error(in_, obj, sl.loc);
    std::vector<size_t> offs;
    int64_t n;
    if (obj.is_string()) {
      offs = utf8_offsets(obj.str());
      n = int64_t(offs.size()) - 1;
    } else if (obj.kind == Value::Kind::List) {
      n = int64_t(obj.l->items.size());
    } else {
      interp_fail(in_, sl.loc, "'" + type_name(obj) + "' object is not subscriptable");
    }
    auto adjust = [&](std::optional<int64_t> v, int64_t dflt, bool is_stop) {
      if (!v) return dflt;
      int64_t x = *v;
      if (x < 0) {
        x += n;
        if (x < 0) x = step < 0 ? -1 : 0;
      } else if (x >= n) {
        x = step < 0 ? n - 1 : n;
      }
      (void)is_stop;
      return x;
    };
    int64_t b = adjust(start, step > 0 ? 0 : n - 1, false);
    int64_t e = adjust(stop, step > 0 ? n : -1, true);
    if (obj.is_string()) {
      if (step == 1) {
        if (e <= b) return Value::string(substr_tagged(*obj.s, offs[b < n ? b : n], offs[b < n ? b : n]));
        return Value::string(substr_tagged(*obj.s, offs[b], offs[e]));
      }
      std::string out;
      for (int64_t k = b; step > 0 ? k < e : k > e; k += step) out += obj.str().substr(offs[k], offs[k + 1] - offs[k]);
      return Value::string(std::move(out));
    }
    std::vector<Value> items;
    for (int64_t k = b; step > 0 ? k < e : k > e; k += step) items.push_back(obj.l->items[size_t(k)]);
    return Value::list(std::move(items), obj.l->tuple);
  }

  bool compare(const std::string& op, const Value& a, const Value& b, const Loc& loc) {
    if (op == "==") return equals(a, b);
    if (op == "!=") return !equals(a, b);
    if (op == "in" || op == "not in") {
      bool r;
      if (b.is_string()) {
        if (!a.is_string()) interp_fail(in_, loc, "'in <string>' requires string as left operand, not " + type_name(a));
        r = b.str().find(a.str()) != std::string::npos;
      } else if (b.kind == Value::Kind::List) {
        r = false;
        for (const auto& x : b.l->items)
          if (equals(a, x)) r = true;
      } else if (b.kind == Value::Kind::Dict) {
        r = a.is_string() && b.d->find(a.str()) != nullptr;
      } else if (b.is_undefined()) {
        r = false;
      } else {
        interp_fail(in_, loc, "argument of type '" + type_name(b) + "' is not iterable");
      }
      return op == "in" ? r : !r;
    }
    int c;
    if (a.is_number() && b.is_number()) {
      double x = a.as_double(), y = b.as_double();
      if (a.kind != Value::Kind::Float && b.kind != Value::Kind::Float) {
        int64_t p = a.kind == Value::Kind::Bool ? a.b : a.i, q = b.kind == Value::Kind::Bool ? b.b : b.i;
        c = p < q ? -1 : p > q ? 1 : 0;
      } else {
        c = x < y ? -1 : x > y ? 1 : 0;
      }
    } else if (a.is_string() && b.is_string()) {
      c = a.str().compare(b.str());  // UTF-8 byte order == code point order
      c = c < 0 ? -1 : c > 0 ? 1 : 0;
    } else {
      if (a.is_undefined()) undefined_error(in_, a, loc);
      if (b.is_undefined()) undefined_error(in_, b, loc);
      interp_fail(in_, loc, fmt::format("'{}' not supported between instances of '{}' and '{}'", op, type_name(a), type_name(b)));
    }
    if (op == "<") return c < 0;
    if (op == ">") return c > 0;
    if (op == "<=") return c <= 0;
    return c >= 0;
  }

  Value binary(const std::string& op, const Value& a, const Value& b, const Loc& loc) {
    if (a.is_undefined()) undefined_error(in_, a, loc);
    if (b.is_undefined()) undefined_error(in_, b, loc);
    auto type_err = [&]() -> Value {
      interp_fail(in_, loc, fmt::format("unsupported operand type(s) for {}: '{}' and '{}'", op, type_name(a), type_name(b)));
    };
    if (a.is_number() && b.is_number()) {
      bool fl = a.kind == Value::Kind::Float || b.kind == Value::Kind::Float;
      int64_t x = a.kind == Value::Kind::Bool ? a.b : a.i, y = b.kind == Value::Kind::Bool ? b.b : b.i;
      double dx = a.as_double(), dy = b.as_double();
      if (op == "+") return fl ? Value::floating(dx + dy) : Value::integer(x + y);
      if (op == "-") return fl ? Value::floating(dx - dy) : Value::integer(x - y);
      if (op == "*") return fl ? Value::floating(dx * dy) : Value::integer(x * y);
      if (op == "/") {
        if (dy == 0) interp_fail(in_, loc, "division by zero");
        return Value::floating(dx / dy);
      }
      if (op == "//" || op == "%") {
        if (dy == 0) interp_fail(in_, loc, "integer division or modulo by zero");
        if (!fl) return op == "//" ? Value::integer(py_floordiv(x, y)) : Value::integer(x - py_floordiv(x, y) * y);
        double q = std::floor(dx / dy);
        return op == "//" ? Value::floating(q) : Value::floating(dx - q * dy);
      }
      if (op == "**") {
        if (!fl && y >= 0) {
          int64_t r = 1;
          for (int64_t k = 0; k < y; ++k) r *= x;
          return Value::integer(r);
        }
        return Value::floating(std::pow(dx, dy));
      }
    }
    if (op == "+") {
      if (a.is_string() && b.is_string()) return Value::string(concat_tagged(*a.s, *b.s));
      if (a.kind == Value::Kind::List && b.kind == Value::Kind::List) {
        std::vector<Value> items = a.l->items;
        items.insert(items.end(), b.l->items.begin(), b.l->items.end());
        return Value::list(std::move(items), a.l->tuple);
      }
      return type_err();
    }
    if (op == "*") {
      const Value& seq = a.is_number() ? b : a;
      const Value& cnt = a.is_number() ? a : b;
      if (cnt.kind == Value::Kind::Int && seq.is_string()) {
        std::string out;
        for (int64_t k = 0; k < cnt.i; ++k) out += seq.str();
        return Value::string(std::move(out));
      }
      if (cnt.kind == Value::Kind::Int && seq.kind == Value::Kind::List) {
        std::vector<Value> items;
        for (int64_t k = 0; k < cnt.i; ++k) items.insert(items.end(), seq.l->items.begin(), seq.l->items.end());
        return Value::list(std::move(items));
      }
    }
    if (op == "%" && a.is_string()) interp_fail(in_, loc, "unsupported Jinja construct: printf-style `%` string formatting");
    return type_err();
  }

  void assign(const Expr& target, const Value& v, Frame& f) {
    if (target.kind == EK::Name) {
      f.set(target.name, v);
    } else if (target.kind == EK::Tuple) {
      std::vector<Value> items = iterate(in_, v, target.loc);
      if (items.size() != target.args.size())
        interp_fail(in_, target.loc, fmt::format("cannot unpack {} values into {} names", items.size(), target.args.size()));
      for (size_t k = 0; k < items.size(); ++k) assign(*target.args[k], items[k], f);
    } else if (target.kind == EK::Attr) {
      Value obj = eval(*target.args[0], f);
      if (obj.kind != Value::Kind::Namespace)
        interp_fail(in_, target.loc, "cannot assign attribute on non-namespace object");
      for (auto& kv : obj.ns->attrs)
        if (kv.first == target.name) {
          kv.second = v;
          return;
        }
      obj.ns->attrs.emplace_back(target.name, v);
    } else {
      interp_fail(in_, target.loc, "cannot assign to this expression");
    }
  }

  Value loop_object(const std::vector<Value>& items, size_t k) {
    size_t n = items.size();
    std::vector<std::pair<std::string, Value>> d;
    d.reserve(12);
    d.emplace_back("index", Value::integer(int64_t(k + 1)));
    d.emplace_back("index0", Value::integer(int64_t(k)));
    d.emplace_back("revindex", Value::integer(int64_t(n - k)));
    d.emplace_back("revindex0", Value::integer(int64_t(n - k - 1)));
    d.emplace_back("first", Value::boolean(k == 0));
    d.emplace_back("last", Value::boolean(k + 1 == n));
    d.emplace_back("length", Value::integer(int64_t(n)));
    d.emplace_back("depth", Value::integer(1));
    d.emplace_back("depth0", Value::integer(0));
    d.emplace_back("previtem", k > 0 ? items[k - 1] : Value::undefined("there is no previous item"));
    d.emplace_back("nextitem", k + 1 < n ? items[k + 1] : Value::undefined("there is no next item"));
    d.emplace_back("cycle", Value::func("loop.cycle", [k](Interp& in, CallArgs& a, const Loc& loc) {
      if (a.pos.empty()) interp_fail(in, loc, "no items for cycling given");
      return a.pos[k % a.pos.size()];
    }));
    return Value::dict(std::move(d));
  }

  void stmt(const Stmt& s, Frame& f, Out& out) {
    switch (s.kind) {
      case SK::Text: out.write(s.text); return;
      case SK::Print: {
        Value v = eval(*s.expr, f);
        if (v.is_string()) out.write(*v.s);
        else out.write(to_str(v));
        return;
      }
      case SK::If:
        for (size_t k = 0; k < s.conds.size(); ++k) {
          if (truthy(eval(*s.conds[k], f))) {
            body(s.bodies[k], f, out);
            return;
          }
        }
        if (s.bodies.size() > s.conds.size()) body(s.bodies.back(), f, out);
        return;
      case SK::For: {
        std::vector<Value> items = iterate(in_, eval(*s.expr, f), s.expr->loc);
        if (s.cond) {
          std::vector<Value> kept;
          for (auto& it : items) {
            Frame tmp{{}, &f};
            assign(*s.target, it, tmp);
            if (truthy(eval(*s.cond, tmp))) kept.push_back(std::move(it));
          }
          items = std::move(kept);
        }
        if (items.empty()) {
          if (s.bodies.size() > 1) {
            Frame inner{{}, &f};
            body(s.bodies[1], inner, out);
          }
          return;
        }
        for (size_t k = 0; k < items.size(); ++k) {
          Frame inner{{}, &f};
          assign(*s.target, items[k], inner);
          inner.set("loop", loop_object(items, k));
          size_t start = out.text.size();
          body(s.bodies[0], inner, out);
          int msg = in_.message_index(items[k]);
          if (msg >= 0) out.segs.push_back(Seg{start, out.text.size(), SegKind::Turn, msg});
          if (in_.ctrl == Interp::Ctrl::Break) {
            in_.ctrl = Interp::Ctrl::None;
            break;
          }
          in_.ctrl = Interp::Ctrl::None;
        }
        return;
      }
      case SK::Set: assign(*s.target, eval(*s.expr, f), f); return;
      case SK::SetBlock: {
        Out cap;
        body(s.bodies[0], f, cap);
        Value v = Value::string(Str{std::move(cap.text), std::move(cap.segs)});
        if (s.expr) v = filter_chain(*s.expr, v, f);
        assign(*s.target, v, f);
        return;
      }
      case SK::FilterBlock: {
        Out cap;
        body(s.bodies[0], f, cap);
        Value v = filter_chain(*s.expr, Value::string(Str{std::move(cap.text), std::move(cap.segs)}), f);
        out.write(to_tagged_str(v));
        return;
      }
      case SK::Macro: {
        const Stmt* def = &s;
        Frame* scope = &f;
        f.set(s.text, Value::func(s.text, [def, scope](Interp& in, CallArgs& a, const Loc& loc) {
          if (++in.depth > 64) interp_fail(in, loc, "macro recursion too deep");
          Frame mf{{}, scope};
          if (a.pos.size() > def->params.size())
            interp_fail(in, loc, fmt::format("macro '{}' takes not more than {} argument(s)", def->text, def->params.size()));
          Exec ex(in);
          for (size_t k = 0; k < def->params.size(); ++k) {
            Value v = Value::undefined(def->params[k]);
            if (k < a.pos.size()) {
              v = a.pos[k];
            } else {
              bool found = false;
              for (auto& [kn, kv] : a.kw)
                if (kn == def->params[k]) v = kv, found = true;
              if (!found && def->defaults[k]) v = ex.eval(*def->defaults[k], mf);
            }
            mf.set(def->params[k], v);
          }
          for (auto& [kn, kv] : a.kw) {
            bool known = false;
            for (const auto& p : def->params) known |= p == kn;
            if (!known) interp_fail(in, loc, fmt::format("macro '{}' has no argument named '{}'", def->text, kn));
          }
          Out mo;
          ex.body(def->bodies[0], mf, mo);
          in.ctrl = Interp::Ctrl::None;
          --in.depth;
          return Value::string(Str{std::move(mo.text), std::move(mo.segs)});
        }));
        return;
      }
      case SK::Break: in_.ctrl = Interp::Ctrl::Break; return;
      case SK::Continue: in_.ctrl = Interp::Ctrl::Continue; return;
      case SK::Generation: {
        size_t start = out.text.size();
        body(s.bodies[0], f, out);
        out.segs.push_back(Seg{start, out.text.size(), SegKind::Generation, -1});
        return;
      }
    }
  }

  Interp& in_;
};

}  // namespace

RenderResult render_program(const Program& prog, std::vector<std::pair<std::string, Value>> vars,
                            std::vector<std::pair<const DictData*, int>> message_dicts, int64_t now_unix) {
  Interp in(prog);
  in.root.vars = std::move(vars);
  in.message_dicts = std::move(message_dicts);
  in.now_unix = now_unix;
  Out out;
  Exec(in).body(prog.body, in.root, out);
  return RenderResult{std::move(out.text), std::move(out.segs)};
}

}  // namespace llmtune::tok::jinja
