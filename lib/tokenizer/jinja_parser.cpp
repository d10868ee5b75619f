// Jinja parser: token stream -> statement/expression tree, following jinja2/parser.py's grammar and
// operator precedence (cond-expr < or < and < not < compare < +,- < ~ < *,/,//,% < ** < unary <
// postfix/filters/tests). Statements outside the supported set fail with their line and column.
#include "tokenizer/jinja_impl.h"

namespace llmtune::tok::jinja {
namespace {

class Parser {
 public:
  Parser(std::vector<Token> toks, std::string name) : t_(std::move(toks)), name_(std::move(name)) {}

  std::shared_ptr<Program> run() {
    auto prog = std::make_shared<Program>();
    prog->name = name_;
    std::string end;
    prog->body = subparse({}, end);
    prog->has_generation = has_generation_;
    return prog;
  }

 private:
  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  Token next() { return t_[i_ < t_.size() - 1 ? i_++ : i_]; }
  bool is_op(const char* op) const { return cur().kind == TK::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().kind == TK::Name && cur().text == n; }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    ++i_;
    return true;
  }
  bool skip_name(const char* n) {
    if (!is_name(n)) return false;
    ++i_;
    return true;
  }
  [[noreturn]] void fail(const Loc& loc, const std::string& msg) const { fail_at(name_, loc, msg); }
  static std::string describe(const Token& t) {
    switch (t.kind) {
      case TK::Eof: return "end of template";
      case TK::BlockEnd: return "`%}`";
      case TK::VarEnd: return "`}}`";
      case TK::String: return "string literal";
      default: return "`" + t.text + "`";
    }
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) fail(cur().loc, fmt::format("expected `{}`, got {}", op, describe(cur())));
  }
  std::string expect_name() {
    if (cur().kind != TK::Name) fail(cur().loc, fmt::format("expected a name, got {}", describe(cur())));
    return next().text;
  }
  void expect_block_end() {
    if (cur().kind != TK::BlockEnd) fail(cur().loc, fmt::format("expected `%}}`, got {}", describe(cur())));
    ++i_;
  }

  // Parses statements until a block tag whose name is in `ends`; leaves `end` = that name and the
  // position after it (the caller parses the rest of the tag).
  Body subparse(const std::vector<std::string>& ends, std::string& end) {
    Body body;
    while (true) {
      const Token& tk = cur();
      if (tk.kind == TK::Eof) {
        if (!ends.empty()) fail(tk.loc, fmt::format("unexpected end of template: missing `{{% {} %}}`", ends.front()));
        return body;
      }
      if (tk.kind == TK::Data) {
        auto s = std::make_unique<Stmt>();
        s->kind = SK::Text;
        s->loc = tk.loc;
        s->text = tk.text;
        body.push_back(std::move(s));
        ++i_;
      } else if (tk.kind == TK::VarBegin) {
        ++i_;
        auto s = std::make_unique<Stmt>();
        s->kind = SK::Print;
        s->loc = tk.loc;
        s->expr = parse_tuple(true);
        if (cur().kind != TK::VarEnd) fail(cur().loc, fmt::format("expected `}}}}`, got {}", describe(cur())));
        ++i_;
        body.push_back(std::move(s));
      } else if (tk.kind == TK::BlockBegin) {
        ++i_;
        const Token& nt = cur();
        if (nt.kind != TK::Name) fail(nt.loc, "expected a statement name after `{%`");
        for (const auto& e : ends) {
          if (nt.text == e) {
            end = e;
            ++i_;
            return body;
          }
        }
        body.push_back(parse_statement());
      } else {
        fail(tk.loc, "unexpected " + describe(tk));
      }
    }
  }

  std::unique_ptr<Stmt> parse_statement() {
    Token nt = next();
    auto s = std::make_unique<Stmt>();
    s->loc = nt.loc;
    const std::string& w = nt.text;
    std::string end;
    if (w == "if") {
      s->kind = SK::If;
      s->conds.push_back(parse_tuple(true));
      expect_block_end();
      while (true) {
        s->bodies.push_back(subparse({"elif", "else", "endif"}, end));
        if (end == "elif") {
          s->conds.push_back(parse_tuple(true));
          expect_block_end();
        } else if (end == "else") {
          expect_block_end();
          s->bodies.push_back(subparse({"endif"}, end));
          expect_block_end();
          break;
        } else {
          expect_block_end();
          break;
        }
      }
    } else if (w == "for") {
      s->kind = SK::For;
      s->target = parse_assign_target(false);
      if (!skip_name("in")) fail(cur().loc, "expected `in` in for loop");
      s->expr = parse_tuple(false);  // no cond-expr: `if` is the loop filter
      if (skip_name("if")) s->cond = parse_tuple(true);
      if (is_name("recursive")) fail(cur().loc, "unsupported Jinja construct `recursive` loop");
      expect_block_end();
      s->bodies.push_back(subparse({"endfor", "else"}, end));
      if (end == "else") {
        expect_block_end();
        s->bodies.push_back(subparse({"endfor"}, end));
      }
      expect_block_end();
    } else if (w == "set") {
      s->target = parse_assign_target(true);
      if (skip_op("=")) {
        s->kind = SK::Set;
        s->expr = parse_tuple(true);
        expect_block_end();
      } else {
        s->kind = SK::SetBlock;
        if (skip_op("|")) s->expr = parse_filter_chain(nullptr);
        expect_block_end();
        s->bodies.push_back(subparse({"endset"}, end));
        expect_block_end();
      }
    } else if (w == "macro") {
      s->kind = SK::Macro;
      s->text = expect_name();
      expect_op("(");
      while (!skip_op(")")) {
        if (!s->params.empty()) expect_op(",");
        if (skip_op(")")) break;
        s->params.push_back(expect_name());
        s->defaults.push_back(skip_op("=") ? parse_expression(true) : nullptr);
      }
      expect_block_end();
      s->bodies.push_back(subparse({"endmacro"}, end));
      if (cur().kind == TK::Name) ++i_;  // optional `{% endmacro name %}`
      expect_block_end();
    } else if (w == "break" || w == "continue") {
      s->kind = w == "break" ? SK::Break : SK::Continue;
      expect_block_end();
    } else if (w == "generation") {
      s->kind = SK::Generation;
      has_generation_ = true;
      expect_block_end();
      s->bodies.push_back(subparse({"endgeneration"}, end));
      expect_block_end();
    } else if (w == "filter") {
      s->kind = SK::FilterBlock;
      s->expr = parse_filter_chain(nullptr);
      expect_block_end();
      s->bodies.push_back(subparse({"endfilter"}, end));
      expect_block_end();
    } else {
      fail(nt.loc, fmt::format("unsupported Jinja statement `{}`", w));
    }
    return s;
  }

  ExprP make(EK k, const Loc& loc) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->loc = loc;
    return e;
  }

  // for/set targets: name, `a, b`, or (set only) `ns.attr`.
  ExprP parse_assign_target(bool allow_attr) {
    Loc loc = cur().loc;
    std::vector<ExprP> items;
    bool paren = skip_op("(");
    do {
      Loc l = cur().loc;
      auto n = make(EK::Name, l);
      n->name = expect_name();
      if (allow_attr && skip_op(".")) {
        auto a = make(EK::Attr, l);
        a->name = expect_name();
        a->args.push_back(std::move(n));
        items.push_back(std::move(a));
      } else {
        items.push_back(std::move(n));
      }
    } while (skip_op(","));
    if (paren) expect_op(")");
    if (items.size() == 1 && !paren) return std::move(items[0]);
    auto t = make(EK::Tuple, loc);
    t->args = std::move(items);
    return t;
  }

  bool tuple_end() const {
    const Token& t = cur();
    if (t.kind == TK::VarEnd || t.kind == TK::BlockEnd || t.kind == TK::Eof) return true;
    if (t.kind == TK::Op && (t.text == ")" || t.text == "]" || t.text == "}" || t.text == "=")) return true;
    return t.kind == TK::Name && (t.text == "in" || t.text == "if");
  }

  // Expression list: `a, b` becomes a tuple.
  ExprP parse_tuple(bool with_cond) {
    Loc loc = cur().loc;
    auto first = parse_expression(with_cond);
    if (!is_op(",")) return first;
    auto t = make(EK::Tuple, loc);
    t->args.push_back(std::move(first));
    while (skip_op(",")) {
      if (tuple_end()) break;
      t->args.push_back(parse_expression(with_cond));
    }
    return t;
  }

  ExprP parse_expression(bool with_cond) { return with_cond ? parse_cond() : parse_or(); }

  ExprP parse_cond() {
    auto e = parse_or();
    while (is_name("if")) {
      Loc loc = next().loc;
      auto c = make(EK::Cond, loc);
      auto test = parse_or();
      ExprP other;
      if (skip_name("else")) other = parse_cond();
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(test));
      c->args.push_back(std::move(other));
      e = std::move(c);
    }
    return e;
  }

  ExprP parse_or() {
    auto e = parse_and();
    while (is_name("or")) {
      auto o = make(EK::Or, next().loc);
      o->args.push_back(std::move(e));
      o->args.push_back(parse_and());
      e = std::move(o);
    }
    return e;
  }
  ExprP parse_and() {
    auto e = parse_not();
    while (is_name("and")) {
      auto o = make(EK::And, next().loc);
      o->args.push_back(std::move(e));
      o->args.push_back(parse_not());
      e = std::move(o);
    }
    return e;
  }
  ExprP parse_not() {
    if (is_name("not")) {
      auto o = make(EK::Not, next().loc);
      o->args.push_back(parse_not());
      return o;
    }
    return parse_compare();
  }
  ExprP parse_compare() {
    Loc loc = cur().loc;
    auto e = parse_math1();
    ExprP cmp;
    while (true) {
      std::string op;
      const Token& t = cur();
      if (t.kind == TK::Op && (t.text == "==" || t.text == "!=" || t.text == "<" || t.text == ">" ||
                               t.text == "<=" || t.text == ">=")) {
        op = t.text;
        ++i_;
      } else if (is_name("in")) {
        op = "in";
        ++i_;
      } else if (is_name("not") && peek().kind == TK::Name && peek().text == "in") {
        op = "not in";
        i_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(EK::Compare, loc);
        cmp->args.push_back(std::move(e));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(e);
  }
  ExprP binary(const std::string& op, ExprP l, ExprP r, const Loc& loc) {
    auto b = make(EK::Binary, loc);
    b->name = op;
    b->args.push_back(std::move(l));
    b->args.push_back(std::move(r));
    return b;
  }
  ExprP parse_math1() {
    auto e = parse_concat();
    while (is_op("+") || is_op("-")) {
      Token t = next();
      e = binary(t.text, std::move(e), parse_concat(), t.loc);
    }
    return e;
  }
  ExprP parse_concat() {
    Loc loc = cur().loc;
    auto e = parse_math2();
    if (!is_op("~")) return e;
    auto c = make(EK::Concat, loc);
    c->args.push_back(std::move(e));
    while (skip_op("~")) c->args.push_back(parse_math2());
    return c;
  }
  ExprP parse_math2() {
    auto e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      Token t = next();
      e = binary(t.text, std::move(e), parse_pow(), t.loc);
    }
    return e;
  }
  ExprP parse_pow() {
    auto e = parse_unary(true);
    while (is_op("**")) {
      Token t = next();
      e = binary("**", std::move(e), parse_unary(true), t.loc);
    }
    return e;
  }
  ExprP parse_unary(bool with_filter) {
    ExprP e;
    if (is_op("-") || is_op("+")) {
      Token t = next();
      e = make(t.text == "-" ? EK::Neg : EK::Pos, t.loc);
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprP parse_primary() {
    Token t = next();
    switch (t.kind) {
      case TK::Name: {
        if (t.text == "true" || t.text == "True" || t.text == "false" || t.text == "False") {
          auto e = make(EK::Literal, t.loc);
          e->lit = Value::boolean(t.text[0] == 't' || t.text[0] == 'T');
          return e;
        }
        if (t.text == "none" || t.text == "None") {
          auto e = make(EK::Literal, t.loc);
          e->lit = Value::none();
          return e;
        }
        auto e = make(EK::Name, t.loc);
        e->name = t.text;
        return e;
      }
      case TK::String: {
        std::string s = t.text;
        while (cur().kind == TK::String) s += next().text;  // adjacent literals concatenate
        auto e = make(EK::Literal, t.loc);
        e->lit = Value::string(std::move(s));
        return e;
      }
      case TK::Int: {
        auto e = make(EK::Literal, t.loc);
        e->lit = Value::integer(t.ival);
        return e;
      }
      case TK::Float: {
        auto e = make(EK::Literal, t.loc);
        e->lit = Value::floating(t.fval);
        return e;
      }
      case TK::Op:
        if (t.text == "(") {
          if (skip_op(")")) {
            auto e = make(EK::Tuple, t.loc);
            return e;
          }
          auto first = parse_expression(true);
          if (skip_op(")")) return first;
          auto tup = make(EK::Tuple, t.loc);
          tup->args.push_back(std::move(first));
          while (skip_op(",")) {
            if (is_op(")")) break;
            tup->args.push_back(parse_expression(true));
          }
          expect_op(")");
          return tup;
        }
        if (t.text == "[") {
          auto e = make(EK::List, t.loc);
          while (!skip_op("]")) {
            if (!e->args.empty()) expect_op(",");
            if (skip_op("]")) break;
            e->args.push_back(parse_expression(true));
          }
          return e;
        }
        if (t.text == "{") {
          auto e = make(EK::Dict, t.loc);
          while (!skip_op("}")) {
            if (!e->args.empty()) expect_op(",");
            if (skip_op("}")) break;
            e->args.push_back(parse_expression(true));
            expect_op(":");
            e->args.push_back(parse_expression(true));
          }
          return e;
        }
        break;
      default:
        break;
    }
    fail(t.loc, "unexpected " + describe(t) + " in expression");
  }

  ExprP parse_postfix(ExprP e) {
    while (true) {
      if (is_op(".")) {
        Token dot = next();
        if (cur().kind == TK::Name) {
          auto a = make(EK::Attr, dot.loc);
          a->name = next().text;
          a->args.push_back(std::move(e));
          e = std::move(a);
        } else if (cur().kind == TK::Int) {
          auto s = make(EK::Subscript, dot.loc);
          auto k = make(EK::Literal, cur().loc);
          k->lit = Value::integer(next().ival);
          s->args.push_back(std::move(e));
          s->args.push_back(std::move(k));
          e = std::move(s);
        } else {
          fail(cur().loc, "expected an attribute name after `.`");
        }
      } else if (is_op("[")) {
        Token lb = next();
        auto s = make(EK::Subscript, lb.loc);
        s->args.push_back(std::move(e));
        s->args.push_back(parse_subscript_arg());
        expect_op("]");
        e = std::move(s);
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprP parse_subscript_arg() {
    Loc loc = cur().loc;
    ExprP parts[3];
    bool slice = false;
    if (!is_op(":")) parts[0] = parse_expression(true);
    if (skip_op(":")) {
      slice = true;
      if (!is_op("]") && !is_op(":")) parts[1] = parse_expression(true);
      if (skip_op(":") && !is_op("]")) parts[2] = parse_expression(true);
    }
    if (!slice) return std::move(parts[0]);
    auto s = make(EK::Slice, loc);
    for (auto& p : parts) s->args.push_back(std::move(p));
    return s;
  }

  // Call arguments into e->args (after the callee at args[0] when `callee` is set) and e->kwargs.
  void parse_call_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!skip_op(")")) {
      if (!first) expect_op(",");
      first = false;
      if (skip_op(")")) break;
      if (is_op("*") || is_op("**")) fail(cur().loc, "unsupported Jinja construct: `*args`/`**kwargs` in a call");
      if (cur().kind == TK::Name && peek().kind == TK::Op && peek().text == "=") {
        std::string k = next().text;
        ++i_;
        e.kwargs.emplace_back(k, parse_expression(true));
      } else {
        if (!e.kwargs.empty()) fail(cur().loc, "positional argument after keyword argument");
        e.args.push_back(parse_expression(true));
      }
    }
  }
  ExprP parse_call(ExprP callee) {
    auto c = make(EK::Call, cur().loc);
    c->args.push_back(std::move(callee));
    parse_call_args(*c);
    return c;
  }

  // `| name(args) | name ...` applied to `input` (null for filter blocks / set blocks).
  ExprP parse_filter_chain(ExprP input) {
    bool first = true;
    while (first || skip_op("|")) {
      first = false;
      Loc loc = cur().loc;
      std::string name = expect_name();
      while (skip_op(".")) name += "." + expect_name();
      if (!is_known_filter(name)) fail(loc, "unsupported Jinja filter `" + name + "`");
      auto f = make(EK::Filter, loc);
      f->name = name;
      f->args.push_back(std::move(input));  // may be null
      if (is_op("(")) parse_call_args(*f);
      input = std::move(f);
    }
    return input;
  }

  ExprP parse_filter_expr(ExprP e) {
    while (true) {
      if (skip_op("|")) {
        e = parse_filter_chain(std::move(e));
        // parse_filter_chain already consumed following `|` filters
      } else if (is_name("is")) {
        Loc loc = next().loc;
        auto t = make(EK::Test, loc);
        t->negated = skip_name("not");
        t->name = expect_name();
        while (skip_op(".")) t->name += "." + expect_name();
        if (!is_known_test(t->name)) fail(loc, "unsupported Jinja test `" + t->name + "`");
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          parse_call_args(*t);
        } else {
          const Token& c = cur();
          bool arg_start = c.kind == TK::String || c.kind == TK::Int || c.kind == TK::Float ||
                           (c.kind == TK::Op && (c.text == "(" || c.text == "[" || c.text == "{" || c.text == "-")) ||
                           (c.kind == TK::Name && c.text != "else" && c.text != "or" && c.text != "and" &&
                            c.text != "if" && c.text != "in" && c.text != "not" && c.text != "is");
          if (arg_start) {
            auto arg = parse_primary();
            t->args.push_back(parse_postfix(std::move(arg)));
          }
        }
        e = std::move(t);
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  std::string name_;
  bool has_generation_ = false;
};

}  // namespace

std::shared_ptr<Program> parse_template(const std::string& source, const std::string& name) {
  return Parser(lex_template(source, name), name).run();
}

}  // namespace llmtune::tok::jinja
