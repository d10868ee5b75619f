// The BPE model of tokenizer.json: merges one pre-token at a time, lowest merge rank first
// (leftmost on ties), with a linked list of symbols and a binary heap so long words cost
// O(n log n). Results are cached per word (sharded, bounded) since text repeats words a lot.
#include <algorithm>
#include <queue>

#include "core/core.h"
#include "tokenizer/tokenizer_impl.h"

namespace llmtune::tok::detail {

namespace {
uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}
}  // namespace

void BpeModel::set_merges(const std::vector<std::pair<std::string, std::string>>& merges, const std::string& where) {
  merges_.clear();
  merges_.reserve(merges.size() * 2);
  const size_t prefix_len = continuing_subword_prefix.size();
  for (size_t r = 0; r < merges.size(); ++r) {
    const auto& [a, b] = merges[r];
    auto ia = vocab.find(a), ib = vocab.find(b);
    if (ia == vocab.end() || ib == vocab.end())
      fail(
          "{}: model.merges[{}] = \"{} {}\" uses a token that is not in model.vocab; the file is "
          "inconsistent (re-export it with the tokenizers library)",
          where, r, a, b);
    // With a continuing-subword prefix, "a" + "##b" merges to "ab".
    std::string merged = a;
    if (prefix_len && b.compare(0, prefix_len, continuing_subword_prefix) == 0)
      merged += b.substr(prefix_len);
    else
      merged += b;
    auto im = vocab.find(merged);
    if (im == vocab.end())
      fail("{}: model.merges[{}] = \"{} {}\" produces \"{}\", which is not in model.vocab", where, r, a, b, merged);
    merges_.try_emplace(pair_key(ia->second, ib->second), MergeInfo{static_cast<int32_t>(r), im->second});
  }
}

void BpeModel::finalize() {
  byte_ids_.fill(-1);
  all_bytes_ = true;
  for (int b = 0; b < 256; ++b) {
    const auto name = fmt::format("<0x{:02X}>", b);
    auto it = vocab.find(name);
    if (it != vocab.end())
      byte_ids_[b] = it->second;
    else
      all_bytes_ = false;
  }
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  const bool cacheable = word.size() <= kMaxCachedBytes;
  Shard* shard = nullptr;
  if (cacheable) {
    shard = &cache_[std::hash<std::string_view>{}(word) % kShards];
    std::shared_lock lock(shard->mu);
    auto it = shard->map.find(word);
    if (it != shard->map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t before = out.size();
  tokenize_uncached(word, out);
  if (cacheable) {
    std::unique_lock lock(shard->mu);
    if (shard->map.size() < kShardCapacity)
      shard->map.try_emplace(std::string(word), out.begin() + static_cast<std::ptrdiff_t>(before), out.end());
  }
}

void BpeModel::tokenize_uncached(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  thread_local std::vector<Symbol> sym;
  sym.clear();
  auto add = [&](int32_t id) {
    const auto n = static_cast<int32_t>(sym.size());
    sym.push_back(Symbol{id, n - 1, n + 1, true});
  };

  // Initial symbols: one per character; missing characters go to <0xHH> byte pieces, else unk.
  int32_t pending_unk = -1;  // an unk waiting to be fused with the next one
  std::string piece;
  size_t i = 0;
  while (i < word.size()) {
    const size_t start = i;
    utf8_next(word, i);
    const bool first = start == 0, last = i == word.size();
    piece.assign(word.substr(start, i - start));
    if (!first && !continuing_subword_prefix.empty()) piece = continuing_subword_prefix + piece;
    if (last && !end_of_word_suffix.empty()) piece += end_of_word_suffix;
    auto it = vocab.find(piece);
    if (it != vocab.end()) {
      if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
      add(it->second);
      continue;
    }
    if (byte_fallback) {
      bool ok = true;
      for (size_t k = start; k < i; ++k) ok = ok && byte_ids_[static_cast<unsigned char>(word[k])] >= 0;
      if (ok) {
        // As in the reference, a pending unk is not flushed before byte pieces.
        for (size_t k = start; k < i; ++k) add(byte_ids_[static_cast<unsigned char>(word[k])]);
        continue;
      }
    }
    if (unk_id) {
      if (pending_unk >= 0 && !fuse_unk) add(pending_unk);
      pending_unk = *unk_id;
    }
    // no unk token: the character is dropped, as the reference does
  }
  if (pending_unk >= 0) add(pending_unk);
  if (sym.empty()) return;
  sym.back().next = -1;

  struct Cand {
    int32_t rank, pos, new_id;
    bool operator<(const Cand& o) const {  // max-heap on "better": lower rank, then lower pos
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  thread_local std::vector<Cand> heap_storage;
  heap_storage.clear();
  std::priority_queue<Cand, std::vector<Cand>> heap(std::less<Cand>(), std::move(heap_storage));
  auto lookup = [&](int32_t a, int32_t b) -> const MergeInfo* {
    auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t k = 0; k + 1 < sym.size(); ++k)
    if (const auto* m = lookup(sym[k].id, sym[k + 1].id)) heap.push(Cand{m->rank, static_cast<int32_t>(k), m->new_id});

  while (!heap.empty()) {
    const Cand top = heap.top();
    heap.pop();
    Symbol& s = sym[top.pos];
    if (!s.alive || s.next < 0) continue;
    Symbol& right = sym[s.next];
    const auto* m = lookup(s.id, right.id);
    if (!m || m->new_id != top.new_id) continue;  // stale entry
    s.id = top.new_id;
    right.alive = false;
    s.next = right.next;
    if (s.next >= 0) sym[s.next].prev = top.pos;
    if (s.prev >= 0)
      if (const auto* pm = lookup(sym[s.prev].id, s.id)) heap.push(Cand{pm->rank, s.prev, pm->new_id});
    if (s.next >= 0)
      if (const auto* nm = lookup(s.id, sym[s.next].id)) heap.push(Cand{nm->rank, top.pos, nm->new_id});
  }
  for (const auto& s : sym)
    if (s.alive) out.push_back(s.id);
}

}  // namespace llmtune::tok::detail
