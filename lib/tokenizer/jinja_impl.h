// Internal to chat templates: a small Jinja2 interpreter (values, AST, lexer, parser, evaluator).
// Covers what HF chat templates use, with transformers' settings (trim_blocks, lstrip_blocks,
// loopcontrols, immutable sandbox). Strings carry provenance segments so the renderer can say where
// each message's content ended up in the output.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#include "tokenizer/chat_template.h"

namespace llmtune::tok::jinja {

struct Loc {
  int line = 1, col = 1;
};

// ---- values ----------------------------------------------------------------------------------
enum class SegKind : uint8_t { Content, Generation, Turn };
// A tagged byte range of a string: where message `msg`'s content (or a generation block, or the
// loop iteration over message `msg`) sits inside it.
struct Seg {
  size_t start, end;
  SegKind kind;
  int msg;
};
struct Str {
  std::string text;
  std::vector<Seg> segs;
};

struct Value;
struct ListData {
  std::vector<Value> items;
  bool tuple = false;
};
struct DictData {
  std::vector<std::pair<std::string, Value>> items;
  const Value* find(std::string_view key) const;
};
struct NsData {
  std::vector<std::pair<std::string, Value>> attrs;
};
struct Interp;
struct CallArgs;
struct Callable {
  std::string name;
  std::function<Value(Interp&, CallArgs&, const Loc&)> fn;
};

struct Value {
  enum class Kind : uint8_t { Undefined, None, Bool, Int, Float, String, List, Dict, Func, Namespace };
  Kind kind = Kind::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::shared_ptr<const Str> s;  // String text, or for Undefined the hint naming what was missing
  std::shared_ptr<const ListData> l;
  std::shared_ptr<const DictData> d;
  std::shared_ptr<const Callable> fn;
  std::shared_ptr<NsData> ns;

  static Value undefined(std::string hint = {});
  static Value none();
  static Value boolean(bool v);
  static Value integer(int64_t v);
  static Value floating(double v);
  static Value string(std::string v);
  static Value string(Str v);
  static Value list(std::vector<Value> items, bool tuple = false);
  static Value dict(std::vector<std::pair<std::string, Value>> items);
  static Value func(std::string name, std::function<Value(Interp&, CallArgs&, const Loc&)> fn);
  static Value from_json(const Json& j);

  bool is_undefined() const { return kind == Kind::Undefined; }
  bool is_none() const { return kind == Kind::None; }
  bool is_string() const { return kind == Kind::String; }
  bool is_number() const { return kind == Kind::Int || kind == Kind::Float || kind == Kind::Bool; }
  const std::string& str() const { return s->text; }  // String only
  double as_double() const { return kind == Kind::Float ? f : double(kind == Kind::Bool ? b : i); }
};

// Python semantics helpers.
bool truthy(const Value& v);
std::string to_str(const Value& v);   // str(v): what {{ v }} prints
std::string repr(const Value& v);     // repr(v): used inside list/dict printing
Str to_tagged_str(const Value& v);    // like to_str but keeps provenance of strings
bool equals(const Value& a, const Value& b);
std::string type_name(const Value& v);  // Python-ish type name for messages
Json to_json(const Value& v, const Loc& loc);
std::string json_dumps(const Value& v, int indent, bool ensure_ascii, const std::string& item_sep,
                       const std::string& key_sep, bool sort_keys, const Loc& loc);
std::string float_repr(double v);
// UTF-8 helpers (Python indexes strings by code point).
std::vector<size_t> utf8_offsets(std::string_view s);  // byte offset of each code point + end
Str substr_tagged(const Str& s, size_t byte_begin, size_t byte_end);
Str concat_tagged(const Str& a, const Str& b);

// ---- AST -------------------------------------------------------------------------------------
enum class EK {
  Literal, Name, List, Tuple, Dict, Attr, Subscript, Slice, Call, Filter, Test, Not, Neg, Pos,
  Binary, And, Or, Compare, Cond, Concat
};
struct Expr {
  EK kind;
  Loc loc;
  Value lit;         // Literal
  std::string name;  // Name, Attr name, Filter/Test name, Binary operator
  std::vector<std::unique_ptr<Expr>> args;  // operands / call target+args / slice parts (may be null)
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
  std::vector<std::string> ops;  // Compare operators
  bool negated = false;          // `is not`
};
using ExprP = std::unique_ptr<Expr>;

enum class SK { Text, Print, If, For, Set, SetBlock, Macro, Break, Continue, Generation, FilterBlock };
struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;
struct Stmt {
  SK kind;
  Loc loc;
  std::string text;                 // Text; Macro name
  ExprP expr;                       // Print expr, For iterable, Set value, FilterBlock filter
  ExprP target;                     // For/Set target (Name, Tuple, Attr)
  ExprP cond;                       // For `if` filter
  std::vector<ExprP> conds;         // If/elif conditions
  std::vector<Body> bodies;         // If: one per cond (+ else); For: body (+ else); others: body
  std::vector<std::string> params;  // Macro parameters
  std::vector<ExprP> defaults;      // Macro defaults (null = required)
};

struct Program {
  std::string name;  // template name used in error messages
  Body body;
  bool has_generation = false;
};

// Token stream of the template (data + expression tokens inside tags).
enum class TK { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };
struct Token {
  TK kind;
  std::string text;  // data / name / decoded string / operator
  int64_t ival = 0;
  double fval = 0;
  Loc loc;
};
std::vector<Token> lex_template(const std::string& source, const std::string& name);
std::shared_ptr<Program> parse_template(const std::string& source, const std::string& name);

[[noreturn]] void fail_at(const std::string& tmpl, const Loc& loc, const std::string& msg);

// ---- evaluation ------------------------------------------------------------------------------
struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  // Fetches argument `idx`/`name` (positional first), or `dflt` when absent.
  Value get(size_t idx, std::string_view name, Value dflt = Value::undefined()) const;
};

struct Out {
  std::string text;
  std::vector<Seg> segs;
  void write(std::string_view s) { text.append(s); }
  void write(const Str& s);
};

struct Frame {
  std::vector<std::pair<std::string, Value>> vars;
  Frame* parent = nullptr;
  Value* find(std::string_view name);
  void set(const std::string& name, Value v);
};

struct Interp {
  const Program& prog;
  Frame root;  // template globals (the render variables); top-level `set` goes here too
  std::vector<std::pair<const DictData*, int>> message_dicts;
  int64_t now_unix = -1;
  enum class Ctrl { None, Break, Continue } ctrl = Ctrl::None;
  int depth = 0;  // macro recursion guard
  explicit Interp(const Program& p) : prog(p) {}
  int message_index(const Value& v) const;
};

struct RenderResult {
  std::string text;
  std::vector<Seg> segs;
};
// Renders `prog` with global variables `vars`; `message_dicts` maps message dict identity to index.
RenderResult render_program(const Program& prog, std::vector<std::pair<std::string, Value>> vars,
                            std::vector<std::pair<const DictData*, int>> message_dicts,
                            int64_t now_unix);

// Builtin filters/tests/methods (jinja_builtins.cpp).
Value apply_filter(Interp& in, const std::string& name, const Value& v, CallArgs& args, const Loc& loc);
bool apply_test(Interp& in, const std::string& name, const Value& v, CallArgs& args, const Loc& loc);
Value get_attr(Interp& in, const Value& obj, const std::string& name, const Loc& loc);
Value get_item(Interp& in, const Value& obj, const Value& key, const Loc& loc);
Value call_value(Interp& in, const Value& f, CallArgs& args, const Loc& loc);
std::vector<Value> iterate(Interp& in, const Value& v, const Loc& loc);
[[noreturn]] void interp_fail(Interp& in, const Loc& loc, const std::string& msg);
Value make_global(Interp& in, const std::string& name);
bool is_known_filter(const std::string& name);  // checked at parse time
bool is_known_test(const std::string& name);  // raise_exception, range, namespace...

}  // namespace llmtune::tok::jinja
