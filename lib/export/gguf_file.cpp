// GGUF v3 container: metadata values, the reader (header + metadata + tensor infos; data read on
// demand) and the writer (formats.md §7.1). Little-endian only; nested arrays are neither written
// nor accepted, as in ggml's own reader.
#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/ranges.h>

#include "core/core.h"
#include "export/export.h"

namespace llmtune::exporter {

namespace {

using Scalar = std::variant<uint64_t, int64_t, double, bool, std::string>;

bool is_unsigned(GgufValueType t) {
  return t == GgufValueType::UINT8 || t == GgufValueType::UINT16 || t == GgufValueType::UINT32 || t == GgufValueType::UINT64;
}
bool is_signed(GgufValueType t) {
  return t == GgufValueType::INT8 || t == GgufValueType::INT16 || t == GgufValueType::INT32 || t == GgufValueType::INT64;
}
int scalar_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8: case GgufValueType::INT8: case GgufValueType::BOOL: return 1;
    case GgufValueType::UINT16: case GgufValueType::INT16: return 2;
    case GgufValueType::UINT32: case GgufValueType::INT32: case GgufValueType::FLOAT32: return 4;
    case GgufValueType::UINT64: case GgufValueType::INT64: case GgufValueType::FLOAT64: return 8;
    default: return 0;
  }
}

// ---- writing --------------------------------------------------------------------------------

struct Out {
  std::string buf;
  void raw(const void* p, size_t n) { buf.append(static_cast<const char*>(p), n); }
  template <class T> void le(T v) {  // the machine is little-endian (checked in write())
    raw(&v, sizeof(T));
  }
  void str(const std::string& s) { le<uint64_t>(s.size()); raw(s.data(), s.size()); }
  void scalar(GgufValueType t, const Scalar& v) {
    switch (t) {
      case GgufValueType::UINT8: le<uint8_t>(uint8_t(std::get<uint64_t>(v))); break;
      case GgufValueType::INT8: le<int8_t>(int8_t(std::get<int64_t>(v))); break;
      case GgufValueType::UINT16: le<uint16_t>(uint16_t(std::get<uint64_t>(v))); break;
      case GgufValueType::INT16: le<int16_t>(int16_t(std::get<int64_t>(v))); break;
      case GgufValueType::UINT32: le<uint32_t>(uint32_t(std::get<uint64_t>(v))); break;
      case GgufValueType::INT32: le<int32_t>(int32_t(std::get<int64_t>(v))); break;
      case GgufValueType::UINT64: le<uint64_t>(std::get<uint64_t>(v)); break;
      case GgufValueType::INT64: le<int64_t>(std::get<int64_t>(v)); break;
      case GgufValueType::FLOAT32: le<float>(float(std::get<double>(v))); break;
      case GgufValueType::FLOAT64: le<double>(std::get<double>(v)); break;
      case GgufValueType::BOOL: le<uint8_t>(std::get<bool>(v) ? 1 : 0); break;
      case GgufValueType::STRING: str(std::get<std::string>(v)); break;
      default: fail("GGUF writer: nested arrays are not supported");
    }
  }
};

// ---- reading --------------------------------------------------------------------------------

struct In {
  std::ifstream f;
  fs::path path;
  uint64_t size = 0;
  uint64_t pos() { return uint64_t(f.tellg()); }
  void need(uint64_t n, const char* what) {
    if (pos() + n > size)
      fail("{}: truncated GGUF file: {} needs {} bytes at offset {} but the file has {} bytes", path.string(), what, n,
           pos(), size);
  }
  void raw(void* p, uint64_t n, const char* what) {
    need(n, what);
    f.read(static_cast<char*>(p), std::streamsize(n));
  }
  template <class T> T le(const char* what) {
    T v;
    raw(&v, sizeof(T), what);
    return v;
  }
  std::string str(const char* what) {
    const uint64_t n = le<uint64_t>(what);
    need(n, what);
    std::string s(size_t(n), '\0');
    raw(s.data(), n, what);
    return s;
  }
  Scalar scalar(GgufValueType t, const std::string& key) {
    const char* w = "metadata value";
    switch (t) {
      case GgufValueType::UINT8: return uint64_t(le<uint8_t>(w));
      case GgufValueType::INT8: return int64_t(le<int8_t>(w));
      case GgufValueType::UINT16: return uint64_t(le<uint16_t>(w));
      case GgufValueType::INT16: return int64_t(le<int16_t>(w));
      case GgufValueType::UINT32: return uint64_t(le<uint32_t>(w));
      case GgufValueType::INT32: return int64_t(le<int32_t>(w));
      case GgufValueType::UINT64: return le<uint64_t>(w);
      case GgufValueType::INT64: return le<int64_t>(w);
      case GgufValueType::FLOAT32: return double(le<float>(w));
      case GgufValueType::FLOAT64: return le<double>(w);
      case GgufValueType::BOOL: {
        const uint8_t b = le<uint8_t>(w);
        if (b > 1) fail("{}: metadata key '{}': bool value {} is not 0 or 1", path.string(), key, b);
        return b == 1;
      }
      case GgufValueType::STRING: return str(w);
      default: fail("{}: metadata key '{}': unknown or nested value type {}", path.string(), key, uint32_t(t));
    }
  }
};

std::string scalar_display(const Scalar& s, GgufValueType t) {
  if (auto* u = std::get_if<uint64_t>(&s)) return std::to_string(*u);
  if (auto* i = std::get_if<int64_t>(&s)) return std::to_string(*i);
  if (auto* d = std::get_if<double>(&s)) return fmt::format("{:.9g}", *d);
  if (auto* b = std::get_if<bool>(&s)) return *b ? "true" : "false";
  std::string str = std::get<std::string>(s), esc;
  for (char c : str) {
    if (c == '\n') esc += "\\n";
    else if (c == '"') esc += "\\\"";
    else esc += c;
  }
  return "\"" + esc + "\"";
}

}  // namespace

const char* gguf_value_type_name(GgufValueType t) {
  static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "str", "arr", "u64", "i64", "f64"};
  return uint32_t(t) < 13 ? names[uint32_t(t)] : "?";
}

// ---- GgufValue ------------------------------------------------------------------------------

GgufValue GgufValue::u32(uint32_t v) { GgufValue g; g.type = GgufValueType::UINT32; g.scalar = uint64_t(v); return g; }
GgufValue GgufValue::i32(int32_t v) { GgufValue g; g.type = GgufValueType::INT32; g.scalar = int64_t(v); return g; }
GgufValue GgufValue::f32(float v) { GgufValue g; g.type = GgufValueType::FLOAT32; g.scalar = double(v); return g; }
GgufValue GgufValue::boolean(bool v) { GgufValue g; g.type = GgufValueType::BOOL; g.scalar = v; return g; }
GgufValue GgufValue::str(std::string v) { GgufValue g; g.type = GgufValueType::STRING; g.scalar = std::move(v); return g; }
GgufValue GgufValue::str_array(std::vector<std::string> v) {
  GgufValue g;
  g.type = GgufValueType::ARRAY;
  g.elem_type = GgufValueType::STRING;
  for (auto& s : v) g.array.emplace_back(std::move(s));
  return g;
}
GgufValue GgufValue::f32_array(const std::vector<float>& v) {
  GgufValue g;
  g.type = GgufValueType::ARRAY;
  g.elem_type = GgufValueType::FLOAT32;
  for (float x : v) g.array.emplace_back(double(x));
  return g;
}
GgufValue GgufValue::i32_array(const std::vector<int32_t>& v) {
  GgufValue g;
  g.type = GgufValueType::ARRAY;
  g.elem_type = GgufValueType::INT32;
  for (int32_t x : v) g.array.emplace_back(int64_t(x));
  return g;
}

int64_t GgufValue::as_int() const {
  if (auto* u = std::get_if<uint64_t>(&scalar); u && type != GgufValueType::ARRAY && is_unsigned(type)) return int64_t(*u);
  if (auto* i = std::get_if<int64_t>(&scalar); i && type != GgufValueType::ARRAY && is_signed(type)) return *i;
  fail("GGUF value of type {} is not an integer", gguf_value_type_name(type));
}
double GgufValue::as_float() const {
  if (type == GgufValueType::FLOAT32 || type == GgufValueType::FLOAT64) return std::get<double>(scalar);
  return double(as_int());
}
const std::string& GgufValue::as_string() const {
  if (type != GgufValueType::STRING) fail("GGUF value of type {} is not a string", gguf_value_type_name(type));
  return std::get<std::string>(scalar);
}
bool GgufValue::as_bool() const {
  if (type != GgufValueType::BOOL) fail("GGUF value of type {} is not a bool", gguf_value_type_name(type));
  return std::get<bool>(scalar);
}

std::string GgufValue::to_display(size_t max_items) const {
  if (type != GgufValueType::ARRAY) return scalar_display(scalar, type);
  std::string s = fmt::format("[{} x {}] [", array.size(), gguf_value_type_name(elem_type));
  for (size_t i = 0; i < array.size() && i < max_items; ++i) s += (i ? ", " : "") + scalar_display(array[i], elem_type);
  if (array.size() > max_items) s += ", ...";
  return s + "]";
}

// ---- tensor infos ---------------------------------------------------------------------------

int64_t GgufTensorInfo::n_elements() const {
  int64_t n = 1;
  for (auto d : ne) n *= d;
  return n;
}
int64_t GgufTensorInfo::n_bytes() const {
  if (ne.empty()) return ggml_type_info(type).bytes;
  return ggml_row_bytes(type, ne[0]) * (n_elements() / std::max<int64_t>(ne[0], 1));
}
std::vector<int64_t> GgufTensorInfo::torch_shape() const { return {ne.rbegin(), ne.rend()}; }

// ---- GgufFile -------------------------------------------------------------------------------

const GgufValue* GgufFile::find(const std::string& key) const {
  for (const auto& [k, v] : metadata)
    if (k == key) return &v;
  return nullptr;
}
const GgufValue& GgufFile::at(const std::string& key) const {
  if (auto* v = find(key)) return *v;
  fail("{}: GGUF metadata key '{}' is missing", path.string(), key);
}
const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}
std::vector<uint8_t> GgufFile::tensor_bytes(const GgufTensorInfo& t) const {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open {}", path.string());
  std::vector<uint8_t> out(size_t(t.n_bytes()));
  f.seekg(std::streamoff(data_offset + t.offset));
  f.read(reinterpret_cast<char*>(out.data()), std::streamsize(out.size()));
  if (size_t(f.gcount()) != out.size())
    fail("{}: tensor '{}' data at offset {} runs past the end of the file", path.string(), t.name, data_offset + t.offset);
  return out;
}
std::vector<float> GgufFile::tensor_f32(const std::string& name) const {
  const auto* t = find_tensor(name);
  if (!t) fail("{}: no tensor named '{}'", path.string(), name);
  return ggml_dequantize(t->type, tensor_bytes(*t), t->n_elements());
}

GgufFile gguf_read(const fs::path& path) {
  In in;
  in.path = path;
  in.f.open(path, std::ios::binary);
  if (!in.f) fail("cannot open GGUF file {}", path.string());
  in.size = uint64_t(fs::file_size(path));
  GgufFile g;
  g.path = path;
  char magic[4];
  in.raw(magic, 4, "magic");
  if (std::memcmp(magic, "GGUF", 4) != 0) fail("{}: not a GGUF file (magic bytes are not 'GGUF')", path.string());
  g.version = in.le<uint32_t>("version");
  if ((g.version & 0xFFFF) == 0) fail("{}: GGUF file is big-endian; llmtune reads little-endian files only", path.string());
  if (g.version != 2 && g.version != 3) fail("{}: GGUF version {} is not supported (2 or 3)", path.string(), g.version);
  const uint64_t n_tensors = in.le<uint64_t>("tensor count");
  const uint64_t n_kv = in.le<uint64_t>("metadata count");
  if (n_tensors > in.size / 8 || n_kv > in.size / 8)
    fail("{}: implausible counts ({} tensors, {} metadata keys) for a {}-byte file", path.string(), n_tensors, n_kv, in.size);
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = in.str("metadata key");
    const auto t = GgufValueType(in.le<uint32_t>("value type"));
    GgufValue v;
    v.type = t;
    if (t == GgufValueType::ARRAY) {
      v.elem_type = GgufValueType(in.le<uint32_t>("array type"));
      const uint64_t n = in.le<uint64_t>("array length");
      if (v.elem_type == GgufValueType::ARRAY) fail("{}: metadata key '{}': nested arrays are not supported", path.string(), key);
      const int es = scalar_size(v.elem_type);
      if (es > 0) in.need(n * uint64_t(es), "array data");
      v.array.reserve(size_t(std::min<uint64_t>(n, in.size)));
      for (uint64_t j = 0; j < n; ++j) v.array.push_back(in.scalar(v.elem_type, key));
    } else {
      v.scalar = in.scalar(t, key);
    }
    if (g.find(key)) fail("{}: metadata key '{}' appears twice", path.string(), key);
    g.metadata.emplace_back(std::move(key), std::move(v));
  }
  if (auto* a = g.find("general.alignment")) {
    g.alignment = uint32_t(a->as_int());
    if (g.alignment == 0 || (g.alignment & (g.alignment - 1)) != 0)
      fail("{}: general.alignment {} is not a power of two", path.string(), g.alignment);
  }
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = in.str("tensor name");
    const uint32_t nd = in.le<uint32_t>("tensor n_dims");
    if (nd == 0 || nd > 4) fail("{}: tensor '{}' has {} dimensions (1..4 allowed)", path.string(), t.name, nd);
    for (uint32_t d = 0; d < nd; ++d) t.ne.push_back(int64_t(in.le<uint64_t>("tensor dims")));
    const uint32_t tid = in.le<uint32_t>("tensor type");
    auto type = ggml_type_from_id(tid);
    if (!type) fail("{}: tensor '{}' has ggml type id {}, which llmtune does not read", path.string(), t.name, tid);
    t.type = *type;
    t.offset = in.le<uint64_t>("tensor offset");
    if (t.ne[0] % ggml_type_info(t.type).block != 0)
      fail("{}: tensor '{}': row length {} is not a multiple of the {} block size", path.string(), t.name, t.ne[0],
           ggml_type_info(t.type).name);
    g.tensors.push_back(std::move(t));
  }
  const uint64_t a = g.alignment;
  g.data_offset = (in.pos() + a - 1) / a * a;
  for (const auto& t : g.tensors)
    if (g.data_offset + t.offset + uint64_t(t.n_bytes()) > in.size)
      fail("{}: tensor '{}' ({} bytes at data offset {}) runs past the end of the file", path.string(), t.name,
           t.n_bytes(), t.offset);
  return g;
}

std::string gguf_describe(const GgufFile& g) {
  std::ostringstream o;
  o << fmt::format("GGUF v{}  {}  ({} metadata keys, {} tensors, alignment {})\n", g.version, g.path.string(),
                   g.metadata.size(), g.tensors.size(), g.alignment);
  o << "\nmetadata:\n";
  size_t kw = 0;
  for (const auto& [k, v] : g.metadata) kw = std::max(kw, k.size());
  for (const auto& [k, v] : g.metadata) {
    std::string shown = v.to_display();
    if (shown.size() > 200) shown = shown.substr(0, 200) + fmt::format("... ({} chars)", shown.size());
    o << fmt::format("  {:<{}}  {:<4} {}\n", k, kw, gguf_value_type_name(v.type), shown);
  }
  o << "\ntensors:\n";
  size_t nw = 4;
  for (const auto& t : g.tensors) nw = std::max(nw, t.name.size());
  o << fmt::format("  {:<{}}  {:<6} {:<20} {:>12} {:>12}\n", "name", nw, "type", "shape (torch)", "elements", "bytes");
  int64_t total_bytes = 0, total_elems = 0;
  std::map<std::string, int64_t> counts;
  for (const auto& t : g.tensors) {
    std::string shape;
    for (auto d : t.torch_shape()) shape += (shape.empty() ? "" : "x") + std::to_string(d);
    o << fmt::format("  {:<{}}  {:<6} {:<20} {:>12} {:>12}\n", t.name, nw, ggml_type_info(t.type).name, shape,
                     t.n_elements(), t.n_bytes());
    total_bytes += t.n_bytes();
    total_elems += t.n_elements();
    counts[ggml_type_info(t.type).name]++;
  }
  std::string mix;
  for (const auto& [k, n] : counts) mix += fmt::format("{}{}: {}", mix.empty() ? "" : ", ", k, n);
  o << fmt::format("\n{} tensors, {} elements, {} bytes of tensor data ({:.3f} bits/weight); types: {}\n",
                   g.tensors.size(), total_elems, total_bytes,
                   total_elems ? 8.0 * double(total_bytes) / double(total_elems) : 0.0, mix);
  return o.str();
}

// ---- GgufWriter -----------------------------------------------------------------------------

void GgufWriter::set(const std::string& key, GgufValue v) {
  for (auto& [k, old] : kv_)
    if (k == key) { old = std::move(v); return; }
  kv_.emplace_back(key, std::move(v));
}

void GgufWriter::add_tensor(const std::string& name, const std::vector<int64_t>& torch_shape, GgmlType type,
                            std::vector<uint8_t> data) {
  if (name.size() >= 64) fail("GGUF tensor name '{}' is {} bytes; ggml allows at most 63", name, name.size());
  if (torch_shape.empty() || torch_shape.size() > 4) fail("GGUF tensor '{}' must have 1..4 dimensions", name);
  for (const auto& e : tensors_)
    if (e.info.name == name) fail("GGUF tensor '{}' added twice", name);
  Entry e;
  e.info.name = name;
  e.info.ne.assign(torch_shape.rbegin(), torch_shape.rend());
  e.info.type = type;
  if (int64_t(data.size()) != e.info.n_bytes())
    fail("GGUF tensor '{}': {} bytes of data for {} as {} (expected {})", name, data.size(), fmt::join(torch_shape, "x"),
         ggml_type_info(type).name, e.info.n_bytes());
  e.data = std::move(data);
  tensors_.push_back(std::move(e));
}

void GgufWriter::write(const fs::path& path) const {
  const uint32_t one = 1;
  if (*reinterpret_cast<const uint8_t*>(&one) != 1) fail("GGUF writer supports little-endian machines only");
  Out o;
  o.raw("GGUF", 4);
  o.le<uint32_t>(3);
  o.le<uint64_t>(tensors_.size());
  o.le<uint64_t>(kv_.size());
  for (const auto& [k, v] : kv_) {
    o.str(k);
    o.le<uint32_t>(uint32_t(v.type));
    if (v.type == GgufValueType::ARRAY) {
      o.le<uint32_t>(uint32_t(v.elem_type));
      o.le<uint64_t>(v.array.size());
      for (const auto& e : v.array) o.scalar(v.elem_type, e);
    } else {
      o.scalar(v.type, v.scalar);
    }
  }
  const uint64_t a = alignment;
  uint64_t offset = 0;
  for (const auto& e : tensors_) {
    o.str(e.info.name);
    o.le<uint32_t>(uint32_t(e.info.ne.size()));
    for (auto d : e.info.ne) o.le<uint64_t>(uint64_t(d));
    o.le<uint32_t>(uint32_t(e.info.type));
    o.le<uint64_t>(offset);
    offset += (e.data.size() + a - 1) / a * a;
  }
  auto pad = [&](std::ofstream& f, uint64_t written) {
    static const char zeros[64] = {};
    const uint64_t n = (a - written % a) % a;
    for (uint64_t left = n; left > 0;) {
      const uint64_t k = std::min<uint64_t>(left, sizeof(zeros));
      f.write(zeros, std::streamsize(k));
      left -= k;
    }
    return n;
  };
  fs::path tmp = path;
  tmp += ".tmp";
  if (path.has_parent_path()) fs::create_directories(path.parent_path());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail("cannot write {}", tmp.string());
    f.write(o.buf.data(), std::streamsize(o.buf.size()));
    pad(f, o.buf.size());
    for (const auto& e : tensors_) {
      f.write(reinterpret_cast<const char*>(e.data.data()), std::streamsize(e.data.size()));
      pad(f, e.data.size());
    }
    if (!f) fail("error while writing {} (disk full?)", tmp.string());
  }
  fs::rename(tmp, path);
}

}  // namespace llmtune::exporter
