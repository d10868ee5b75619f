// Platform-stable randomness and hashing for the data pipeline. std::shuffle and the std distributions
// are implementation-defined, so permutations here use their own Fisher–Yates over std::mt19937_64 (whose
// output sequence the standard fixes) and rejection sampling for unbiased bounded integers.
#include <cstring>

#include "core/core.h"
#include "data/data.h"

namespace llmtune::data {

uint64_t uniform_below(uint64_t n, std::mt19937_64& rng) {
  if (n <= 1) return 0;
  // Reject the top partial bucket so every residue is equally likely.
  uint64_t limit = UINT64_MAX - (UINT64_MAX % n + 1) % n;
  uint64_t x;
  do {
    x = rng();
  } while (x > limit);
  return x % n;
}

std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    int64_t j = static_cast<int64_t>(uniform_below(static_cast<uint64_t>(i) + 1, rng));
    std::swap(p[i], p[j]);
  }
  return p;
}

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A simple word-at-a-time hash lane (not cryptographic; cache keys only need to change when inputs do).
uint64_t hash_lane(std::string_view s, uint64_t seed) {
  uint64_t h = splitmix64(seed ^ s.size());
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);  // little-endian hosts only (x86-64, aarch64)
    h = (h ^ splitmix64(w + seed)) * 0x9FB21C651E98DF25ull;
    h ^= h >> 32;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, s.data() + i, s.size() - i);
  h = (h ^ splitmix64(tail ^ (s.size() - i))) * 0x9FB21C651E98DF25ull;
  return splitmix64(h);
}
}  // namespace

uint64_t derive_seed(uint64_t seed, uint64_t a, uint64_t b) {
  return splitmix64(splitmix64(splitmix64(seed) ^ a) ^ (b * 0xD6E8FEB86659FD93ull));
}

std::string hash_hex(std::string_view bytes) {
  return fmt::format("{:016x}{:016x}", hash_lane(bytes, 0x243F6A8885A308D3ull), hash_lane(bytes, 0x13198A2E03707344ull));
}

}  // namespace llmtune::data
