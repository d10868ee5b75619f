// safetensors read/write (formats.md §1). The reader mmaps the file and validates it the way
// the reference Rust reader does; tensors are zero-copy views when the data is aligned for the
// dtype. The mapping is MAP_PRIVATE read+write (copy-on-write): an in-place op on a loaded
// weight gets private pages instead of a SIGSEGV, and the file on disk is never modified.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <numeric>
#include <set>

#include "core/core.h"
#include "io/io.h"
#include "io/io_impl.h"

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; big-endian hosts unsupported");

namespace llmtune::io {
namespace {

constexpr uint64_t kMaxHeaderSize = 100'000'000;  // MAX_HEADER_SIZE of the reference reader

struct DtypeSpec {
  const char* name;
  int bits;
  int rank;  // position in the reference `Dtype` enum: the writer sorts by it, widest first
  std::optional<torch::ScalarType> torch_type;
};

// In the reference enum's order (increasing alignment). F4/F6 have no LibTorch equivalent with
// the same shape semantics: files holding them validate, but load() refuses them.
const std::vector<DtypeSpec>& dtype_table() {
  static const std::vector<DtypeSpec> t = {
      {"BOOL", 8, 0, torch::kBool},
      {"F4", 4, 1, std::nullopt},
      {"F6_E2M3", 6, 2, std::nullopt},
      {"F6_E3M2", 6, 3, std::nullopt},
      {"U8", 8, 4, torch::kUInt8},
      {"I8", 8, 5, torch::kInt8},
      {"F8_E5M2", 8, 6, at::ScalarType::Float8_e5m2},
      {"F8_E4M3", 8, 7, at::ScalarType::Float8_e4m3fn},
      {"F8_E8M0", 8, 8, at::ScalarType::Float8_e8m0fnu},
      {"F8_E4M3FNUZ", 8, 9, at::ScalarType::Float8_e4m3fnuz},
      {"F8_E5M2FNUZ", 8, 10, at::ScalarType::Float8_e5m2fnuz},
      {"I16", 16, 11, torch::kInt16},
      {"U16", 16, 12, torch::kUInt16},
      {"F16", 16, 13, torch::kFloat16},
      {"BF16", 16, 14, torch::kBFloat16},
      {"I32", 32, 15, torch::kInt32},
      {"U32", 32, 16, torch::kUInt32},
      {"F32", 32, 17, torch::kFloat32},
      {"C64", 64, 18, torch::kComplexFloat},
      {"F64", 64, 19, torch::kFloat64},
      {"I64", 64, 20, torch::kInt64},
      {"U64", 64, 21, torch::kUInt64},
  };
  return t;
}

const DtypeSpec* find_dtype(const std::string& s) {
  for (const auto& d : dtype_table())
    if (s == d.name) return &d;
  return nullptr;
}

const DtypeSpec& spec_of(torch::ScalarType t) {
  for (const auto& d : dtype_table())
    if (d.torch_type && *d.torch_type == t) return d;
  fail("tensors of dtype {} cannot be stored in safetensors", c10::toString(t));
}

std::string shape_str(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// Reads a non-negative JSON integer; anything else (negative, float, string) is a format error.
bool as_u64(const nlohmann::json& j, uint64_t& out) {
  if (j.is_number_unsigned()) {
    out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<int64_t>() >= 0) {
    out = static_cast<uint64_t>(j.get<int64_t>());
    return true;
  }
  return false;
}

}  // namespace

std::string dtype_to_safetensors(torch::ScalarType t) { return spec_of(t).name; }

torch::ScalarType dtype_from_safetensors(const std::string& s) {
  const DtypeSpec* d = find_dtype(s);
  if (!d) {
    std::vector<std::string> names;
    for (const auto& e : dtype_table()) names.emplace_back(e.name);
    auto m = closest_match(s, names);
    fail("unknown safetensors dtype \"{}\"{}", s, m ? fmt::format(" (did you mean \"{}\"?)", *m) : "");
  }
  if (!d->torch_type) fail("safetensors dtype {} ({}-bit) has no LibTorch equivalent and cannot be loaded", s, d->bits);
  return *d->torch_type;
}

// ---------------------------------------------------------------------------------------------
// Reader

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  const std::string file = path.string();

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    fail("cannot open {}: {}", file, std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail("cannot stat {}: {}", file, std::strerror(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail("{} is a directory, expected a .safetensors file", file);
  }
  const size_t size = static_cast<size_t>(st.st_size);
  f->file_size_ = size;
  if (size < 8) {
    ::close(fd);
    fail(
        "{} is too small to be a safetensors file ({} bytes; the 8-byte header length alone is missing); "
        "re-download or re-save the checkpoint",
        file, size);
  }
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (addr == MAP_FAILED) addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);  // strict overcommit
  int map_err = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (addr == MAP_FAILED) fail("cannot memory-map {}: {}", file, std::strerror(map_err));
  f->mapping_ = std::shared_ptr<void>(addr, [size](void* p) { ::munmap(p, size); });
  const auto* base = static_cast<const uint8_t*>(addr);

  uint64_t n = 0;
  std::memcpy(&n, base, 8);
  if (n > kMaxHeaderSize)
    fail("{}: header too large ({} bytes, the limit is {}); this is not a safetensors file or it is corrupt", file, n,
         kMaxHeaderSize);
  if (n > size - 8)
    fail(
        "{} is truncated: the header needs {} bytes but the file has only {} after the length field; "
        "re-download or re-save the checkpoint",
        file, n, size - 8);
  std::string_view header(reinterpret_cast<const char*>(base + 8), n);
  if (header.empty() || header[0] != '{')
    fail("{}: the JSON header must start with '{{' (found {}); this is not a safetensors file", file,
         header.empty() ? std::string("an empty header") : fmt::format("byte 0x{:02x}", uint8_t(header[0])));
  nlohmann::json j = detail::parse_json_strict(header, file + " (safetensors header)");
  if (!j.is_object()) fail("{}: the header is not a JSON object", file);

  std::vector<const TensorInfo*> order;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) fail("{}: __metadata__ must be an object of string to string", file);
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          fail("{}: __metadata__ value for \"{}\" must be a string (found {})", file, m.key(), m.value().type_name());
        f->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) fail("{}: tensor `{}`: entry must be an object with dtype, shape, data_offsets", file, key);
    TensorInfo ti;
    ti.name = key;
    if (!v.contains("dtype") || !v["dtype"].is_string()) fail("{}: tensor `{}` has no string \"dtype\"", file, key);
    ti.dtype = v["dtype"].get<std::string>();
    const DtypeSpec* d = find_dtype(ti.dtype);
    if (!d) fail("{}: tensor `{}` has unknown dtype \"{}\"", file, key, ti.dtype);
    if (!v.contains("shape") || !v["shape"].is_array()) fail("{}: tensor `{}` has no \"shape\" array", file, key);
    for (const auto& s : v["shape"]) {
      uint64_t x;
      if (!as_u64(s, x) || x > uint64_t(INT64_MAX))
        fail("{}: tensor `{}` has an invalid shape entry {}", file, key, s.dump());
      ti.shape.push_back(static_cast<int64_t>(x));
    }
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2 ||
        !as_u64(v["data_offsets"][0], ti.begin) || !as_u64(v["data_offsets"][1], ti.end))
      fail("{}: tensor `{}` needs \"data_offsets\": [BEGIN, END] with non-negative integers", file, key);
    if (ti.end < ti.begin)
      fail("{}: tensor `{}` has data_offsets [{}, {}] with END before BEGIN", file, key, ti.begin, ti.end);
    uint64_t numel = 1, nbits = 0;
    for (int64_t s : ti.shape)
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(s), &numel))
        fail("{}: tensor `{}` shape {} overflows", file, key, shape_str(ti.shape));
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d->bits), &nbits))
      fail("{}: tensor `{}` shape {} overflows", file, key, shape_str(ti.shape));
    if (nbits % 8 != 0)
      fail("{}: tensor `{}` ({} {}) does not fill a whole number of bytes", file, key, ti.dtype, shape_str(ti.shape));
    if (ti.end - ti.begin != nbits / 8)
      fail(
          "{}: tensor `{}` is {} with shape {}, which needs {} bytes, but data_offsets [{}, {}] span {} bytes; "
          "the file is corrupt",
          file, key, ti.dtype, shape_str(ti.shape), nbits / 8, ti.begin, ti.end, ti.end - ti.begin);
    f->tensors_.emplace(key, std::move(ti));
  }
  for (const auto& [name, ti] : f->tensors_) order.push_back(&ti);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  // Offsets must tile the buffer: no gaps (hidden data) and no overlaps (aliasing).
  uint64_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* t : order) {
    if (t->begin < expected)
      fail("{}: tensors `{}` [{}, {}) and `{}` [{}, {}) overlap in the data buffer; the file is corrupt", file,
           prev->name, prev->begin, prev->end, t->name, t->begin, t->end);
    if (t->begin > expected)
      fail(
          "{}: tensor `{}` starts at byte {} of the data buffer but the previous tensor{} ends at {}: bytes [{}, {}) "
          "are not covered by any tensor; the file is corrupt",
          file, t->name, t->begin, prev ? fmt::format(" `{}`", prev->name) : std::string(" (none)"), expected, expected,
          t->begin);
    expected = t->end;
    prev = t;
  }
  const uint64_t buffer = size - 8 - n;
  if (expected > buffer) {
    for (const TensorInfo* t : order)
      if (t->end > buffer)
        fail(
            "{} is truncated: tensor `{}` needs bytes [{}, {}) of the data buffer but the file has only {}; "
            "re-download or re-save the checkpoint",
            file, t->name, t->begin, t->end, buffer);
  }
  if (expected < buffer)
    fail(
        "{}: {} trailing bytes after the end of the last tensor{} (the data buffer should be {} bytes, the file "
        "holds {}); the file is corrupt or not a safetensors file",
        file, buffer - expected, prev ? fmt::format(" `{}`", prev->name) : std::string(""), expected, buffer);
  f->data_ = base + 8 + n;
  return f;
}

SafetensorsFile::~SafetensorsFile() = default;

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<const TensorInfo*> v;
  for (const auto& [k, t] : tensors_) v.push_back(&t);
  std::sort(v.begin(), v.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  std::vector<std::string> out;
  for (auto* t : v) out.push_back(t->name);
  return out;
}

bool SafetensorsFile::contains(const std::string& name) const { return tensors_.count(name) != 0; }

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    std::vector<std::string> names;
    for (const auto& [k, t] : tensors_) names.push_back(k);
    auto m = closest_match(name, names);
    fail("tensor `{}` not found in {}{}", name, path_.string(), m ? fmt::format(" (did you mean `{}`?)", *m) : "");
  }
  return it->second;
}

torch::Tensor SafetensorsFile::load(const std::string& name) const {
  const TensorInfo& ti = info(name);
  const DtypeSpec* d = find_dtype(ti.dtype);
  if (!d->torch_type)
    fail("{}: tensor `{}` has dtype {} which LibTorch cannot represent; convert the checkpoint to BF16/F16/F32",
         path_.string(), name, ti.dtype);
  auto opts = torch::TensorOptions().dtype(*d->torch_type).device(torch::kCPU);
  const size_t nbytes = ti.end - ti.begin;
  if (nbytes == 0) return torch::empty(ti.shape, opts);
  const uint8_t* p = data_ + ti.begin;
  const size_t elem = static_cast<size_t>(d->bits / 8);
  if (reinterpret_cast<uintptr_t>(p) % elem == 0) {
    std::shared_ptr<void> keep = mapping_;  // the tensor's deleter owns a reference to the mapping
    return torch::from_blob(
        const_cast<uint8_t*>(p), ti.shape, [keep](void*) mutable { keep.reset(); }, opts);
  }
  torch::Tensor t = torch::empty(ti.shape, opts);
  std::memcpy(t.data_ptr(), p, nbytes);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Writer

void safetensors_save(const fs::path& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  struct Entry {
    std::string name;
    torch::Tensor t;
    const DtypeSpec* spec;
  };
  std::vector<Entry> entries;
  entries.reserve(tensors.size());
  std::set<std::string> seen;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__")
      fail("cannot write {}: \"__metadata__\" is reserved and cannot name a tensor", path.string());
    if (!seen.insert(name).second) fail("cannot write {}: tensor `{}` is given twice", path.string(), name);
    if (!tensor.defined()) fail("cannot write {}: tensor `{}` is undefined", path.string(), name);
    const DtypeSpec* spec = nullptr;
    try {
      spec = &spec_of(tensor.scalar_type());
    } catch (const Error& e) {
      fail("cannot write {}: tensor `{}`: {}", path.string(), name, e.what());
    }
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    entries.push_back({name, std::move(t), spec});
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    if (a.spec->rank != b.spec->rank) return a.spec->rank > b.spec->rank;
    return a.name < b.name;
  });

  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool mfirst = true;
    for (const auto& [k, v] : metadata) {
      if (!mfirst) header += ",";
      header += detail::json_quote(k) + ":" + detail::json_quote(v);
      mfirst = false;
    }
    header += "}";
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& e : entries) {
    uint64_t nbytes = static_cast<uint64_t>(e.t.nbytes());
    if (!first) header += ",";
    first = false;
    header += fmt::format("{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}", detail::json_quote(e.name),
                          e.spec->name, fmt::join(e.t.sizes(), ","), offset, offset + nbytes);
    offset += nbytes;
  }
  header += "}";
  // Pad so the data buffer starts 8-byte aligned in the file (every tensor then starts at a
  // multiple of its element size, which lets readers map it without copying).
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxHeaderSize)
    fail("cannot write {}: the header would be {} bytes, above the safetensors limit of {}", path.string(),
         header.size(), kMaxHeaderSize);

  detail::AtomicFile out(path);
  uint64_t n = header.size();
  out.write(&n, 8);
  out.write(header);
  for (const auto& e : entries)
    if (e.t.nbytes() > 0) out.write(e.t.data_ptr(), e.t.nbytes());
  out.commit();
}

}  // namespace llmtune::io
