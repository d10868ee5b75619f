// Batching on synthetic token data: packing boundaries, position ids, efficiency, length grouping,
// deterministic shuffling, exact resume, rank sharding, and the cache file round trip.
#include <catch2/catch.hpp>

#include <filesystem>
#include <set>

#include "core/core.h"
#include "data/data.h"

using namespace llmtune;
using data::BatchOptions;
using data::BatchSource;
using data::TokenizedDataset;

namespace {

// Example i has length lengths[i]; token values encode (example, position) so any mix-up is visible;
// the first third of each example is untrained (a "prompt").
std::shared_ptr<TokenizedDataset> synthetic(const std::vector<int64_t>& lengths) {
  auto d = std::make_shared<TokenizedDataset>();
  for (size_t i = 0; i < lengths.size(); ++i) {
    std::vector<int32_t> ids;
    std::vector<uint8_t> tr;
    for (int64_t k = 0; k < lengths[i]; ++k) {
      ids.push_back(static_cast<int32_t>(1000 * i + k + 1));
      tr.push_back(k >= lengths[i] / 3 ? 1 : 0);
    }
    d->add(ids, tr, static_cast<uint16_t>(i % 3));
  }
  return d;
}

std::vector<int64_t> random_lengths(size_t n, int64_t lo, int64_t hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> v;
  for (size_t i = 0; i < n; ++i) v.push_back(lo + static_cast<int64_t>(data::uniform_below(hi - lo + 1, rng)));
  return v;
}

bool same(const data::Batch& a, const data::Batch& b) {
  return a.input_ids.equal(b.input_ids) && a.labels.equal(b.labels) && a.attention_mask.equal(b.attention_mask) &&
         a.position_ids.equal(b.position_ids) && a.segment_ids.equal(b.segment_ids) &&
         a.num_target_tokens == b.num_target_tokens && a.num_tokens == b.num_tokens;
}

}  // namespace

TEST_CASE("permutation: mt19937_64 is the standard engine; Fisher-Yates is deterministic", "[data][shuffle]") {
  // The C++ standard fixes this value ([rand.predef]): the 10000th output of a default-constructed mt19937_64.
  std::mt19937_64 e;
  e.discard(9999);
  CHECK(e() == 9981545732273789042ull);
  auto p = data::permutation(1000, 7);
  CHECK(p == data::permutation(1000, 7));
  CHECK(p != data::permutation(1000, 8));
  std::vector<int64_t> sorted(p);
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 1000; ++i) REQUIRE(sorted[i] == i);
  // Unbiased: each position of a 3-permutation is roughly uniform over many seeds.
  std::vector<int> first(3, 0);
  for (uint64_t s = 0; s < 3000; ++s) ++first[data::permutation(3, s)[0]];
  for (int c : first) CHECK(std::abs(c - 1000) < 120);
}

TEST_CASE("packing: block-diagonal segments, restarting positions, efficiency", "[data][packing]") {
  auto d = synthetic(random_lengths(300, 5, 120, 1));
  BatchOptions o;
  o.batch_size = 4;
  o.sequence_len = 128;
  o.sample_packing = true;
  o.seed = 3;
  BatchSource src(d, o);
  std::multiset<int64_t> seen;
  int64_t real = 0, rows = 0;
  while (auto b = src.next()) {
    auto ids = b->input_ids, seg = b->segment_ids, pos = b->position_ids, lab = b->labels, mask = b->attention_mask;
    REQUIRE(ids.size(1) == 128);
    int64_t targets = 0;
    for (int64_t r = 0; r < ids.size(0); ++r) {
      ++rows;
      int64_t prev_seg = 0, start = 0;
      for (int64_t t = 0; t < 128; ++t) {
        int64_t s = seg[r][t].item<int64_t>();
        int64_t id = ids[r][t].item<int64_t>();
        if (s == 0) {  // padding: only at the end of the row
          CHECK(mask[r][t].item<int64_t>() == 0);
          CHECK(lab[r][t].item<int64_t>() == -100);
          CHECK(id == 0);
          prev_seg = -1;
          continue;
        }
        REQUIRE(prev_seg != -1);
        if (s != prev_seg) {
          REQUIRE(s == prev_seg + 1);
          start = t;
          seen.insert((id - 1) / 1000);
        }
        prev_seg = s;
        // Same example inside a segment: token values decode to (example, position).
        int64_t ex = (id - 1) / 1000, k = (id - 1) % 1000;
        CHECK(k == t - start);
        CHECK(pos[r][t].item<int64_t>() == k);
        int64_t l = lab[r][t].item<int64_t>();
        int64_t len = d->length(ex);
        bool trained = k >= len / 3 && k > 0;
        CHECK(l == (trained ? id : -100));
        targets += trained;
        ++real;
      }
    }
    CHECK(b->num_target_tokens == targets);
  }
  // Every example exactly once per epoch.
  CHECK(seen.size() == d->size());
  for (size_t i = 0; i < d->size(); ++i) CHECK(seen.count(static_cast<int64_t>(i)) == 1);
  auto st = src.packing_stats();
  CHECK(st.real_tokens == real);
  CHECK(st.rows == rows);
  CHECK(st.efficiency() == Approx(double(real) / double(rows * 128)));
  // First-fit-decreasing needs no more rows than greedy in-order packing, and the lower bound holds.
  int64_t greedy_rows = 0, fill = 128;
  for (size_t i = 0; i < d->size(); ++i) {
    if (fill + d->length(i) > 128) ++greedy_rows, fill = 0;
    fill += d->length(i);
  }
  CHECK(st.rows <= greedy_rows);
  CHECK(st.rows >= (d->num_tokens() + 127) / 128);
  CHECK(st.efficiency() > 0.9);
}

TEST_CASE("length grouping pads less than random batches, and covers every example", "[data][batching]") {
  auto d = synthetic(random_lengths(2000, 4, 200, 2));
  BatchOptions o;
  o.batch_size = 8;
  o.sequence_len = 256;
  BatchSource grouped(d, o);
  o.group_by_length = false;
  BatchSource random(d, o);
  int64_t pg = grouped.padding_tokens(), pr = random.padding_tokens();
  CHECK(pg * 3 < pr);
  std::set<int64_t> seen;
  int64_t padding = 0;
  while (auto b = grouped.next()) {
    padding += b->input_ids.numel() - b->num_tokens;
    CHECK(b->attention_mask.sum().item<int64_t>() == b->num_tokens);
    CHECK(b->labels.ne(-100).sum().item<int64_t>() == b->num_target_tokens);
  }
  CHECK(padding == pg);
  for (int64_t i = 0; i < grouped.batches_per_epoch(); ++i)
    for (auto& row : grouped.plan(i)) seen.insert(row[0]);
  CHECK(seen.size() == d->size());
}

TEST_CASE("batch stream: deterministic, different per epoch, resumes exactly from saved state", "[data][resume]") {
  auto d = synthetic(random_lengths(157, 3, 60, 5));
  for (bool packing : {false, true}) {
    BatchOptions o;
    o.batch_size = 3;
    o.sequence_len = 64;
    o.sample_packing = packing;
    o.seed = 11;
    BatchSource a(d, o), b(d, o);
    const int64_t per_epoch = a.batches_per_epoch();
    REQUIRE(per_epoch > 5);
    // Same seed, same stream; next epoch differs from the first.
    auto first = a.next();
    auto same_first = b.next();
    CHECK(same(*first, *same_first));
    BatchSource c(d, o);
    c.set_epoch(1);
    CHECK_FALSE(same(*c.next(), *first));

    // Run a through 1.5 epochs, saving the state mid-way; a fresh source restored from it continues identically.
    std::vector<data::Batch> tail;
    nlohmann::json saved;
    int64_t consumed = 1, epoch = 0;
    const int64_t stop_at = per_epoch / 2 + 1;
    while (consumed < per_epoch + per_epoch / 2) {
      if (consumed == stop_at) saved = nlohmann::json::parse(a.state().dump());  // through text, like a checkpoint
      auto x = a.next();
      if (!x) {
        a.set_epoch(++epoch);
        continue;
      }
      if (consumed >= stop_at) tail.push_back(*x);
      ++consumed;
    }
    CHECK(saved["epoch"] == 0);
    CHECK(saved["index"] == stop_at);
    CHECK(saved["seed"] == 11);
    BatchSource r(d, o);
    r.load_state(saved);
    size_t k = 0;
    int64_t e = saved["epoch"].get<int64_t>();
    while (k < tail.size()) {
      auto x = r.next();
      if (!x) {
        r.set_epoch(++e);
        continue;
      }
      REQUIRE(same(*x, tail[k]));
      ++k;
    }
    CHECK(r.batch_state() == a.batch_state());
  }
}

TEST_CASE("rank sharding: disjoint, equal counts, union is the epoch", "[data][batching]") {
  auto d = synthetic(random_lengths(101, 3, 40, 9));
  BatchOptions o;
  o.batch_size = 2;
  o.sequence_len = 64;
  o.world_size = 1;
  BatchSource all(d, o);
  int64_t total = all.batches_per_epoch();
  std::set<int64_t> seen;
  int64_t per = -1;
  for (int rank = 0; rank < 3; ++rank) {
    o.world_size = 3;
    o.rank = rank;
    BatchSource s(d, o);
    if (per < 0) per = s.batches_per_epoch();
    CHECK(s.batches_per_epoch() == per);
    for (int64_t i = 0; i < per; ++i)
      for (auto& row : s.plan(i))
        for (int64_t ex : row) CHECK(seen.insert(ex).second);
  }
  CHECK(per == total / 3);
}

TEST_CASE("cache file: round trip, and damaged files are rejected", "[data][cache]") {
  auto d = synthetic({5, 9, 1, 30});
  auto dir = std::filesystem::temp_directory_path() / fmt::format("llmtune-data-test-{}", ::getpid());
  auto file = dir / "x.llmtds";
  data::save_cache(file, *d, {{"key", "abc"}, {"n", 4}});
  nlohmann::json meta;
  auto back = data::load_cache(file, &meta);
  REQUIRE(back);
  CHECK(back->tokens == d->tokens);
  CHECK(back->trained == d->trained);
  CHECK(back->offsets == d->offsets);
  CHECK(back->source == d->source);
  CHECK(meta["key"] == "abc");
  // Truncate the file: load must refuse it (the pipeline then rebuilds).
  std::filesystem::resize_file(file, std::filesystem::file_size(file) - 3);
  CHECK_FALSE(data::load_cache(file));
  std::filesystem::remove_all(dir);
}
