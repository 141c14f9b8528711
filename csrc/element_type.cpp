#include "element_type.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

namespace rela {

size_t element_size(ElementType type) {
  switch (type) {
    case ElementType::Float32: return 4;
    case ElementType::Float16: return 2;
    case ElementType::BFloat16: return 2;
  }
  TORCH_CHECK(false, "element type: unknown code ", static_cast<uint32_t>(type));
}

const char* element_name(ElementType type) {
  switch (type) {
    case ElementType::Float32: return "float32";
    case ElementType::Float16: return "float16";
    case ElementType::BFloat16: return "bfloat16";
  }
  return "unknown";
}

bool is_storage_type(ElementType type) {
  return type == ElementType::Float32 || type == ElementType::Float16;
}

namespace {

template <typename Src>
float to_float(Src value) { return static_cast<float>(value); }

template <typename Src, typename Dst>
void convert_typed(const Src* src, int64_t rows, int64_t dim, Dst* dst, const int64_t* dst_rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const Src* in = src + r * dim;
    Dst* out = dst + dst_rows[r] * dim;
    if constexpr (std::is_same_v<Src, Dst>) {
      std::memcpy(out, in, sizeof(Dst) * static_cast<size_t>(dim));
    } else {
      for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<Dst>(to_float(in[j]));
    }
  }
}

template <typename Src>
void convert_from(const Src* src, int64_t rows, int64_t dim, void* dst, ElementType dst_type,
                  const int64_t* dst_rows) {
  switch (dst_type) {
    case ElementType::Float32:
      return convert_typed(src, rows, dim, static_cast<float*>(dst), dst_rows);
    case ElementType::Float16:
      return convert_typed(src, rows, dim, static_cast<c10::Half*>(dst), dst_rows);
    default:
      TORCH_CHECK(false, "convert_rows: dst_type must be float32 or float16, got ", element_name(dst_type));
  }
}

}  // namespace

void convert_rows(const void* src, ElementType src_type, int64_t rows, int64_t dim, void* dst,
                  ElementType dst_type, const int64_t* dst_rows) {
  switch (src_type) {
    case ElementType::Float32:
      return convert_from(static_cast<const float*>(src), rows, dim, dst, dst_type, dst_rows);
    case ElementType::Float16:
      return convert_from(static_cast<const c10::Half*>(src), rows, dim, dst, dst_type, dst_rows);
    case ElementType::BFloat16:
      return convert_from(static_cast<const c10::BFloat16*>(src), rows, dim, dst, dst_type, dst_rows);
  }
  TORCH_CHECK(false, "convert_rows: unknown src_type code ", static_cast<uint32_t>(src_type));
}

}  // namespace rela
