#include "checksum.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace rela {
namespace {

constexpr uint64_t kPrime1 = 11400714785074694791ULL;
constexpr uint64_t kPrime2 = 14029467366897019727ULL;
constexpr uint64_t kPrime3 = 1609587929392839161ULL;
constexpr uint64_t kPrime4 = 9650029242287828579ULL;
constexpr uint64_t kPrime5 = 2870177450012600261ULL;
// Chunks are the unit of parallel work; 4 MiB keeps the per-chunk hash list small for 10 GB banks.
constexpr size_t kChunkBytes = size_t{4} << 20;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// Little-endian loads through memcpy: rows are not 8-byte aligned in general.
inline uint64_t load64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
inline uint32_t load32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

inline uint64_t round(uint64_t acc, uint64_t input) {
  acc += input * kPrime2;
  acc = rotl(acc, 31);
  return acc * kPrime1;
}

inline uint64_t merge_round(uint64_t acc, uint64_t val) {
  acc ^= round(0, val);
  return acc * kPrime1 + kPrime4;
}

}  // namespace

uint64_t xxh64(const void* data, size_t bytes, uint64_t seed) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  const uint8_t* const end = p + bytes;
  uint64_t h;
  if (bytes >= 32) {
    const uint8_t* const limit = end - 32;
    uint64_t v1 = seed + kPrime1 + kPrime2, v2 = seed + kPrime2, v3 = seed, v4 = seed - kPrime1;
    do {
      v1 = round(v1, load64(p));
      v2 = round(v2, load64(p + 8));
      v3 = round(v3, load64(p + 16));
      v4 = round(v4, load64(p + 24));
      p += 32;
    } while (p <= limit);
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = merge_round(h, v1);
    h = merge_round(h, v2);
    h = merge_round(h, v3);
    h = merge_round(h, v4);
  } else {
    h = seed + kPrime5;
  }
  h += static_cast<uint64_t>(bytes);
  while (p + 8 <= end) {
    h ^= round(0, load64(p));
    h = rotl(h, 27) * kPrime1 + kPrime4;
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= static_cast<uint64_t>(load32(p)) * kPrime1;
    h = rotl(h, 23) * kPrime2 + kPrime3;
    p += 4;
  }
  while (p < end) {
    h ^= (*p) * kPrime5;
    h = rotl(h, 11) * kPrime1;
    ++p;
  }
  h ^= h >> 33;
  h *= kPrime2;
  h ^= h >> 29;
  h *= kPrime3;
  h ^= h >> 32;
  return h;
}

uint64_t chunked_checksum(const void* data, size_t bytes, int threads) {
  TORCH_CHECK(threads >= 1, "chunked_checksum: threads must be >= 1, got ", threads);
  const uint8_t* base = static_cast<const uint8_t*>(data);
  const size_t num_chunks = (bytes + kChunkBytes - 1) / kChunkBytes;
  std::vector<uint64_t> chunk_hashes(num_chunks);
  auto hash_chunks = [&](size_t first, size_t step) {
    for (size_t c = first; c < num_chunks; c += step) {
      const size_t begin = c * kChunkBytes;
      chunk_hashes[c] = xxh64(base + begin, std::min(kChunkBytes, bytes - begin), c);
    }
  };
  const size_t workers = std::min<size_t>(static_cast<size_t>(threads), std::max<size_t>(num_chunks, 1));
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (size_t t = 1; t < workers; ++t) pool.emplace_back(hash_chunks, t, workers);
  hash_chunks(0, workers);
  for (auto& worker : pool) worker.join();
  return xxh64(chunk_hashes.data(), chunk_hashes.size() * sizeof(uint64_t), static_cast<uint64_t>(bytes));
}

}  // namespace rela
