// Element types of bank rows (float32, float16) and of the prior's outputs (also bfloat16), and the
// row conversion the writer thread does between them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rela {

// Values are stored in bank headers: never renumber.
enum class ElementType : uint32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

size_t element_size(ElementType type);
const char* element_name(ElementType type);
// Whether a bank may store rows of this type (bfloat16 is only accepted as the prior's output).
bool is_storage_type(ElementType type);

// Converts `rows` contiguous rows of `dim` elements of `src_type` into rows dst_rows[0..rows) of the
// row-major table at `dst` (`dst_type`). Float16 results are rounded to nearest even, as torch's .to().
void convert_rows(const void* src, ElementType src_type, int64_t rows, int64_t dim, void* dst,
                  ElementType dst_type, const int64_t* dst_rows);

}  // namespace rela
