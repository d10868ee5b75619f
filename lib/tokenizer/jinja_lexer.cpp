// Jinja template lexer with transformers' settings: trim_blocks (drop the first newline after a
// block/comment tag), lstrip_blocks (drop spaces/tabs before a block/comment tag on its own line),
// `-`/`+` whitespace control, raw blocks, and the expression tokens inside tags. Mirrors the rules
// of jinja2/lexer.py (3.1): only ASCII whitespace is stripped (Python strips Unicode spaces too).
#include <algorithm>
#include <cctype>
#include <cstring>
#include "tokenizer/jinja_impl.h"

namespace llmtune::tok::jinja {

void fail_at(const std::string& tmpl, const Loc& loc, const std::string& msg) {
  throw Error(fmt::format("{} at chat template `{}` line {}, column {}", msg, tmpl, loc.line, loc.col));
}

namespace {

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
bool is_name_start(unsigned char c) { return std::isalpha(c) || c == '_' || c >= 0x80; }
bool is_name_char(unsigned char c) { return std::isalnum(c) || c == '_' || c >= 0x80; }

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

class Lexer {
 public:
  Lexer(const std::string& source, const std::string& name) : name_(name) {
    // Newlines are normalized to \n and one trailing newline dropped (keep_trailing_newline=False).
    src_.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        src_ += '\n';
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
      } else {
        src_ += source[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  std::vector<Token> run() {
    size_t n = src_.size(), pos = 0;
    bool line_starting = true;
    while (pos < n) {
      size_t q = find_tag(pos);
      if (q == std::string::npos) {
        emit_data(src_.substr(pos), pos);
        break;
      }
      char type = src_[q + 1];
      size_t after = q + 2;
      char sign = 0;
      if (after < n && (src_[after] == '-' || src_[after] == '+')) sign = src_[after++];
      size_t raw_body = 0;
      bool raw = type == '%' && match_raw_begin(after, raw_body);
      std::string text = src_.substr(pos, q - pos);
      strip_before(text, sign, type != '{', line_starting);
      emit_data(text, pos);
      if (raw) {
        pos = lex_raw(raw_body, line_starting);
      } else if (type == '#') {
        pos = lex_comment(after, line_starting);
      } else {
        pos = lex_tag(q, after, type == '%', line_starting);
      }
    }
    tokens_.push_back(Token{TK::Eof, "", 0, 0, loc(n)});
    return std::move(tokens_);
  }

 private:
  Loc loc(size_t off) const {
    size_t line = std::upper_bound(line_starts_.begin(), line_starts_.end(), off) - line_starts_.begin();
    return Loc{int(line), int(off - line_starts_[line - 1] + 1)};
  }
  [[noreturn]] void fail(size_t off, const std::string& msg) const { fail_at(name_, loc(off), msg); }

  size_t find_tag(size_t pos) const {
    for (size_t i = src_.find('{', pos); i != std::string::npos; i = src_.find('{', i + 1)) {
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    }
    return std::string::npos;
  }

  void emit_data(const std::string& text, size_t off) {
    if (!text.empty()) tokens_.push_back(Token{TK::Data, text, 0, 0, loc(off)});
  }

  // `-` strips all whitespace before the tag; otherwise lstrip_blocks strips spaces/tabs between
  // the line start and a block/comment tag when nothing else is on that line.
  static void strip_before(std::string& text, char sign, bool lstrip_applies, bool line_starting) {
    if (sign == '-') {
      size_t e = text.size();
      while (e > 0 && is_ws(text[e - 1])) --e;
      text.resize(e);
    } else if (sign != '+' && lstrip_applies) {
      size_t nl = text.rfind('\n');
      size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
      if (l_pos > 0 || line_starting) {
        bool all_ws = l_pos < text.size();
        for (size_t i = l_pos; i < text.size(); ++i)
          if (!is_ws(text[i])) all_ws = false;
        if (all_ws) text.resize(l_pos);
      }
    }
  }

  // After a block end: `+%}` keeps everything, `-%}` eats all following whitespace, `%}` eats one
  // newline (trim_blocks). Returns the new position; sets line_starting like jinja's lexer.
  size_t after_end(size_t p, char sign, bool trim, bool& line_starting) const {
    size_t start = p;
    if (sign == '-') {
      while (p < src_.size() && is_ws(src_[p])) ++p;
    } else if (sign != '+' && trim && p < src_.size() && src_[p] == '\n') {
      ++p;
    }
    line_starting = p > start && src_[p - 1] == '\n';
    return p;
  }

  bool match_raw_begin(size_t p, size_t& body) const {
    while (p < src_.size() && is_ws(src_[p])) ++p;
    if (src_.compare(p, 3, "raw") != 0) return false;
    p += 3;
    if (p < src_.size() && is_name_char(src_[p])) return false;
    while (p < src_.size() && is_ws(src_[p])) ++p;
    if (src_.compare(p, 3, "-%}") == 0) {
      p += 3;
      while (p < src_.size() && is_ws(src_[p])) ++p;
    } else if (src_.compare(p, 2, "%}") == 0) {
      p += 2;  // no trim_blocks newline removal after {% raw %}
    } else {
      return false;
    }
    body = p;
    return true;
  }

  size_t lex_raw(size_t body, bool& line_starting) {
    line_starting = body > 0 && src_[body - 1] == '\n';
    for (size_t q = src_.find("{%", body); q != std::string::npos; q = src_.find("{%", q + 1)) {
      size_t p = q + 2;
      char sign = 0;
      if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) sign = src_[p++];
      while (p < src_.size() && is_ws(src_[p])) ++p;
      if (src_.compare(p, 6, "endraw") != 0) continue;
      p += 6;
      while (p < src_.size() && is_ws(src_[p])) ++p;
      char esign = 0;
      if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) esign = src_[p++];
      if (src_.compare(p, 2, "%}") != 0) continue;
      std::string text = src_.substr(body, q - body);
      strip_before(text, sign, true, line_starting);
      emit_data(text, body);
      return after_end(p + 2, esign, true, line_starting);
    }
    fail(body, "missing end of raw directive");
  }

  size_t lex_comment(size_t p, bool& line_starting) {
    size_t q = src_.find("#}", p);
    if (q == std::string::npos) fail(p, "missing end of comment tag");
    char sign = (q > p && (src_[q - 1] == '-' || src_[q - 1] == '+')) ? src_[q - 1] : 0;
    return after_end(q + 2, sign, true, line_starting);
  }

  size_t lex_tag(size_t begin, size_t p, bool block, bool& line_starting) {
    tokens_.push_back(Token{block ? TK::BlockBegin : TK::VarBegin, "", 0, 0, loc(begin)});
    std::vector<char> braces;
    size_t n = src_.size();
    while (true) {
      while (p < n && is_ws(src_[p])) ++p;
      if (p >= n) fail(begin, block ? "unexpected end of template: missing `%}`" : "unexpected end of template: missing `}}`");
      if (braces.empty()) {
        const char* close = block ? "%}" : "}}";
        char sign = 0;
        size_t e = p;
        if ((src_[p] == '-' || (block && src_[p] == '+')) && src_.compare(p + 1, 2, close) == 0) sign = src_[e++];
        if (src_.compare(e, 2, close) == 0) {
          tokens_.push_back(Token{block ? TK::BlockEnd : TK::VarEnd, "", 0, 0, loc(p)});
          return after_end(e + 2, sign, block, line_starting);
        }
      }
      p = lex_expr_token(p, braces);
    }
  }

  size_t lex_expr_token(size_t p, std::vector<char>& braces) {
    const std::string& s = src_;
    size_t n = s.size();
    unsigned char c = s[p];
    Token t{TK::Op, "", 0, 0, loc(p)};
    if (std::isdigit(c)) {
      size_t e = p;
      auto digits = [&](size_t& i) {
        size_t st = i;
        while (i < n && (std::isdigit((unsigned char)s[i]) || (s[i] == '_' && i + 1 < n && std::isdigit((unsigned char)s[i + 1])))) ++i;
        return i > st;
      };
      digits(e);
      bool is_float = false;
      if (e + 1 < n && s[e] == '.' && std::isdigit((unsigned char)s[e + 1])) {
        ++e;
        digits(e);
        is_float = true;
      }
      if (e < n && (s[e] == 'e' || s[e] == 'E')) {
        size_t x = e + 1;
        if (x < n && (s[x] == '+' || s[x] == '-')) ++x;
        if (x < n && std::isdigit((unsigned char)s[x])) {
          digits(x);
          e = x;
          is_float = true;
        }
      }
      std::string num;
      for (size_t i = p; i < e; ++i)
        if (s[i] != '_') num += s[i];
      if (is_float) {
        t.kind = TK::Float;
        t.fval = std::stod(num);
      } else {
        t.kind = TK::Int;
        try {
          t.ival = std::stoll(num);
        } catch (const std::exception&) {
          fail(p, "integer literal out of range");
        }
      }
      t.text = num;
      tokens_.push_back(t);
      return e;
    }
    if (is_name_start(c)) {
      size_t e = p;
      while (e < n && is_name_char(s[e])) ++e;
      t.kind = TK::Name;
      t.text = s.substr(p, e - p);
      tokens_.push_back(t);
      return e;
    }
    if (c == '\'' || c == '"') {
      t.kind = TK::String;
      size_t e = p + 1;
      std::string out;
      while (true) {
        if (e >= n) fail(p, "unterminated string literal");
        char ch = s[e];
        if (ch == char(c)) break;
        if (ch != '\\') {
          out += ch;
          ++e;
          continue;
        }
        if (e + 1 >= n) fail(p, "unterminated string literal");
        char x = s[e + 1];
        e += 2;
        switch (x) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case 'r': out += '\r'; break;
          case '\\': out += '\\'; break;
          case '\'': out += '\''; break;
          case '"': out += '"'; break;
          case 'a': out += '\a'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'v': out += '\v'; break;
          case '\n': break;  // line continuation
          case 'x': case 'u': case 'U': {
            size_t len = x == 'x' ? 2 : x == 'u' ? 4 : 8;
            if (e + len > n) fail(p, "truncated \\" + std::string(1, x) + " escape in string literal");
            uint32_t cp = 0;
            for (size_t k = 0; k < len; ++k) {
              char h = s[e + k];
              if (!std::isxdigit((unsigned char)h)) fail(p, "bad \\" + std::string(1, x) + " escape in string literal");
              cp = cp * 16 + (std::isdigit((unsigned char)h) ? h - '0' : (std::tolower(h) - 'a' + 10));
            }
            e += len;
            append_utf8(out, cp);
            break;
          }
          default:
            if (x >= '0' && x <= '7') {
              uint32_t cp = x - '0';
              for (int k = 0; k < 2 && e < n && s[e] >= '0' && s[e] <= '7'; ++k) cp = cp * 8 + (s[e++] - '0');
              append_utf8(out, cp);
            } else if (x == 'N') {
              fail(p, "unsupported \\N{...} escape in string literal");
            } else {
              out += '\\';  // Python keeps unknown escapes verbatim
              out += x;
            }
        }
      }
      t.text = out;
      tokens_.push_back(t);
      return e + 1;
    }
    static const char* two[] = {"**", "//", "==", "!=", ">=", "<="};
    for (const char* op : two) {
      if (s.compare(p, 2, op) == 0) {
        t.text = op;
        tokens_.push_back(t);
        return p + 2;
      }
    }
    if (std::strchr("+-/*%~[](){}><=.:|,;", c) && c != 0) {
      if (c == '(' || c == '[' || c == '{') braces.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
      if (c == ')' || c == ']' || c == '}') {
        if (braces.empty()) fail(p, fmt::format("unexpected `{}`", char(c)));
        if (braces.back() != char(c)) fail(p, fmt::format("unexpected `{}`, expected `{}`", char(c), braces.back()));
        braces.pop_back();
      }
      t.text = std::string(1, char(c));
      tokens_.push_back(t);
      return p + 1;
    }
    fail(p, fmt::format("unexpected character `{}`", char(c)));
  }

  std::string name_, src_;
  std::vector<size_t> line_starts_;
  std::vector<Token> tokens_;
};

}  // namespace

std::vector<Token> lex_template(const std::string& source, const std::string& name) {
  return Lexer(source, name).run();
}

}  // namespace llmtune::tok::jinja
