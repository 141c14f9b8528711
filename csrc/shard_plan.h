// Which rows a rank still has to compute, cut into fixed-size batches.
//
// Rank r owns the contiguous block [r * N / W, (r + 1) * N / W) of the N rows (W ranks): contiguous so
// each rank's writes, and the msync ranges that flush them, stay local in the file. Rows flagged done
// are skipped wherever they are, so a resumed build (with any world size) only computes what is missing.
// Every batch holds exactly batch_size indices, the last one padded by repeating its last valid index,
// so the prior always runs on one static shape (CUDA graphs, torch.compile); the padding is masked.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace rela {

class ShardPlan {
 public:
  // `done_flags`: one byte per row, nonzero = done (a BankFile's flags); read once, here.
  ShardPlan(const uint8_t* done_flags, int64_t num_rows, int64_t rank, int64_t world_size, int64_t batch_size);

  // The block [begin, end) of rows that `rank` owns.
  static std::pair<int64_t, int64_t> shard_range(int64_t num_rows, int64_t rank, int64_t world_size);

  int64_t shard_begin() const { return shard_begin_; }
  int64_t shard_end() const { return shard_end_; }
  int64_t batch_size() const { return batch_size_; }
  int64_t pending_rows() const { return static_cast<int64_t>(pending_.size()); }
  int64_t num_batches() const { return (pending_rows() + batch_size_ - 1) / batch_size_; }

  // Writes batch `batch`'s batch_size indices to `indices`; returns how many are real rows (the rest
  // repeat the last real one).
  int64_t fill_batch(int64_t batch, int64_t* indices) const;

 private:
  int64_t shard_begin_;
  int64_t shard_end_;
  int64_t batch_size_;
  std::vector<int64_t> pending_;
};

}  // namespace rela
