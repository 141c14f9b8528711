// Checksums of bank files: XXH64 (a fast non-cryptographic 64-bit hash) over chunks hashed in parallel.
// They catch torn writes and bit rot, not deliberate tampering.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rela {

// XXH64 of `bytes` bytes at `data` (the reference algorithm, so values can be checked elsewhere).
uint64_t xxh64(const void* data, size_t bytes, uint64_t seed);

// Checksum of a large range: XXH64 of the per-chunk XXH64s (chunk i seeded with i), the chunks hashed
// on `threads` threads. The value does not depend on `threads`.
uint64_t chunked_checksum(const void* data, size_t bytes, int threads);

}  // namespace rela
