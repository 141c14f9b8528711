#include "shard_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace rela {

std::pair<int64_t, int64_t> ShardPlan::shard_range(int64_t num_rows, int64_t rank, int64_t world_size) {
  TORCH_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  TORCH_CHECK(world_size >= 1, "world_size must be >= 1, got ", world_size);
  TORCH_CHECK(0 <= rank && rank < world_size, "rank must be in [0, world_size=", world_size, "), got ", rank);
  // Balanced split: block sizes differ by at most one row. 128-bit products: N * W overflows for huge N.
  const auto bound = [&](int64_t r) {
    return static_cast<int64_t>(static_cast<__int128>(num_rows) * r / world_size);
  };
  return {bound(rank), bound(rank + 1)};
}

ShardPlan::ShardPlan(const uint8_t* done_flags, int64_t num_rows, int64_t rank, int64_t world_size,
                     int64_t batch_size)
    : batch_size_(batch_size) {
  TORCH_CHECK(done_flags != nullptr, "done_flags must not be null");
  TORCH_CHECK(batch_size >= 1, "batch_size must be >= 1, got ", batch_size);
  std::tie(shard_begin_, shard_end_) = shard_range(num_rows, rank, world_size);
  pending_.reserve(static_cast<size_t>(shard_end_ - shard_begin_));
  for (int64_t row = shard_begin_; row < shard_end_; ++row) {
    if (done_flags[row] == 0) pending_.push_back(row);
  }
}

int64_t ShardPlan::fill_batch(int64_t batch, int64_t* indices) const {
  TORCH_CHECK(0 <= batch && batch < num_batches(), "batch must be in [0, ", num_batches(), "), got ", batch);
  const int64_t begin = batch * batch_size_;
  const int64_t valid = std::min(batch_size_, pending_rows() - begin);
  std::copy_n(pending_.begin() + begin, valid, indices);
  std::fill(indices + valid, indices + batch_size_, pending_[begin + valid - 1]);
  return valid;
}

}  // namespace rela
