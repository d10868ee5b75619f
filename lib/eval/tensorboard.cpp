// TensorBoard event files written by hand: TFRecord framing (u64 length, masked CRC32C of the
// length, payload, masked CRC32C of the payload) around protobuf-encoded tensorflow.Event
// messages. Only the fields TensorBoard reads for scalars (simple_value) and the text plugin
// (a DT_STRING tensor with plugin metadata "text") are encoded. Debian ships no C/C++ TFRecord
// or TensorBoard library, and pulling libprotobuf + .proto files in for five messages is heavier.
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>

#include "core/core.h"
#include "eval/eval.h"

namespace llmtune::eval {
namespace {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), byte-wise table.
const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

// Protobuf wire format (https://protobuf.dev/programming-guides/encoding/).
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_key(std::string& out, int field, int wire) { put_varint(out, (static_cast<uint64_t>(field) << 3) | wire); }
void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}
void put_double(std::string& out, int field, double v) {
  put_key(out, field, 1);
  char b[8];
  std::memcpy(b, &v, 8);  // little-endian hosts only (x86-64, aarch64)
  out.append(b, 8);
}
void put_float(std::string& out, int field, float v) {
  put_key(out, field, 5);
  char b[4];
  std::memcpy(b, &v, 4);
  out.append(b, 4);
}
void put_int(std::string& out, int field, int64_t v) {
  put_key(out, field, 0);
  put_varint(out, static_cast<uint64_t>(v));
}

double now_wall() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// tensorflow.Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5.
std::string event(double wall_time, int64_t step, const std::string* summary, const std::string* file_version) {
  std::string e;
  put_double(e, 1, wall_time < 0 ? now_wall() : wall_time);
  put_int(e, 2, step);
  if (file_version) put_bytes(e, 3, *file_version);
  if (summary) put_bytes(e, 5, *summary);
  return e;
}

}  // namespace

uint32_t crc32c(const void* data, size_t size, uint32_t crc) {
  const auto& t = crc_table();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = t[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;  // TFRecord's mask
}

TensorBoardWriter::TensorBoardWriter(const fs::path& logdir) {
  std::error_code ec;
  fs::create_directories(logdir, ec);
  if (ec) fail("cannot create the TensorBoard directory {}: {}", logdir.string(), ec.message());
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  const auto secs = static_cast<int64_t>(now_wall());
  path_ = logdir / fmt::format("events.out.tfevents.{}.{}", secs, host);
  for (int i = 1; fs::exists(path_); ++i)  // two writers in the same second
    path_ = logdir / fmt::format("events.out.tfevents.{}.{}.{}", secs, host, i);
  out_.open(path_, std::ios::binary | std::ios::trunc);
  if (!out_) fail("cannot write {}; check that the output directory is writable", path_.string());
  const std::string version = "brain.Event:2";
  write_record(event(-1, 0, nullptr, &version));
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  if (out_.is_open()) out_.flush();
}

void TensorBoardWriter::write_record(const std::string& payload) {
  char header[8];
  const uint64_t len = payload.size();
  std::memcpy(header, &len, 8);
  const uint32_t len_crc = masked_crc32c(header, 8), data_crc = masked_crc32c(payload.data(), payload.size());
  out_.write(header, 8);
  out_.write(reinterpret_cast<const char*>(&len_crc), 4);
  out_.write(payload.data(), static_cast<std::streamsize>(payload.size()));
  out_.write(reinterpret_cast<const char*>(&data_crc), 4);
  if (!out_) fail("cannot append to {}; check free space", path_.string());
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step, double wall_time) {
  // Summary.Value: tag = 1, simple_value = 2 (float). Summary: repeated value = 1.
  std::string v;
  put_bytes(v, 1, tag);
  put_float(v, 2, static_cast<float>(value));
  std::string summary;
  put_bytes(summary, 1, v);
  write_record(event(wall_time, step, &summary, nullptr));
}

void TensorBoardWriter::add_text(const std::string& tag, const std::string& text, int64_t step, double wall_time) {
  // TensorProto: dtype = 1 (DT_STRING = 7), tensor_shape = 2 (empty: a scalar), string_val = 8.
  std::string tensor;
  put_int(tensor, 1, 7);
  put_bytes(tensor, 2, "");
  put_bytes(tensor, 8, text);
  // SummaryMetadata: plugin_data = 1 -> PluginData {plugin_name = 1 "text", content = 2 (TextPluginData, empty)}.
  std::string plugin;
  put_bytes(plugin, 1, "text");
  put_bytes(plugin, 2, "");
  std::string metadata;
  put_bytes(metadata, 1, plugin);
  // Summary.Value: tag = 1, tensor = 8, metadata = 9.
  std::string v;
  put_bytes(v, 1, tag);
  put_bytes(v, 8, tensor);
  put_bytes(v, 9, metadata);
  std::string summary;
  put_bytes(summary, 1, v);
  write_record(event(wall_time, step, &summary, nullptr));
}

void TensorBoardWriter::flush() {
  out_.flush();
  if (!out_) fail("cannot write {}; check free space", path_.string());
}

}  // namespace llmtune::eval
