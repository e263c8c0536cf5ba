// Operations of the layer-skip KV cache, registered as torch.ops.adallava.*:
//
//   kv_append(k_pages!, v_pages!, key, value, block_tables, starts) -> ()
//     key [rows, tokens, d] with block_tables [rows, W] and starts [rows], or
//     key [batch, heads, tokens, d] with block_tables [batch, heads, W] and starts [batch]
//   kv_gather(k_pages, v_pages, block_tables, length) -> (Tensor, Tensor)
//
// The pools are [num_pages, page_size, head_dim]; page p holds page_size
// positions of one (layer, KV head) slice, K in k_pages[p] and V in v_pages[p].
// A row of block_tables lists the pages of one (sequence, layer, KV head),
// in position order. The Python face (adallava_kernels/kv_cache/pool.py) owns the
// page bookkeeping; these ops move the data. CPU always; CUDA when built with it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <cstring>

#include "check.h"
#include "kv_cache.h"

#ifdef ADALLAVA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// An importable module, so that `import adallava_kernels._C` loads the library
// and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace adallava {
namespace {

void check_pools(const at::Tensor& k_pages, const at::Tensor& v_pages) {
  ADALLAVA_CHECK(k_pages.dim() == 3, "k_pages must be 3-D [num_pages, page_size, head_dim], got ",
                 k_pages.sizes());
  ADALLAVA_CHECK(v_pages.sizes() == k_pages.sizes(), "v_pages must have the shape of k_pages ",
                 k_pages.sizes(), ", got ", v_pages.sizes());
  ADALLAVA_CHECK(v_pages.scalar_type() == k_pages.scalar_type(), "v_pages must have the dtype of k_pages (",
                 k_pages.scalar_type(), "), got ", v_pages.scalar_type());
  ADALLAVA_CHECK(v_pages.device() == k_pages.device(), "v_pages must be on the device of k_pages (",
                 k_pages.device(), "), got ", v_pages.device());
  ADALLAVA_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous(), "k_pages and v_pages must be contiguous");
  const auto size = k_pages.element_size();
  ADALLAVA_CHECK(size == 2 || size == 4, "k_pages must hold 2- or 4-byte elements (fp16, bf16, fp32), got ",
                 k_pages.scalar_type());
}

void check_index_tensor(const char* name, const at::Tensor& t, int64_t dim, const at::Tensor& pools) {
  ADALLAVA_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  ADALLAVA_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  ADALLAVA_CHECK(t.device() == pools.device(), name, " must be on the device of the pools (", pools.device(),
                 "), got ", t.device());
  ADALLAVA_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// kv_append takes two forms of the same write. Rows: key [rows, tokens, head_dim],
// block_tables [rows, width], starts [rows]. Batched: key [batch, heads, tokens,
// head_dim], block_tables [batch, heads, width], starts [batch], every head of a
// batch row starting at that row's start (the runtime's step: one start per
// sequence, read on the device). Both reduce to this layout.
struct AppendLayout {
  int64_t batch, heads, tokens, head_dim;
  int64_t key_strides[4], value_strides[4];  // batch, head, token, element
};

AppendLayout check_append(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& block_tables, const at::Tensor& starts) {
  check_pools(k_pages, v_pages);
  const int64_t head_dim = k_pages.size(2);
  const bool batched = key.dim() == 4;
  if (batched) {
    ADALLAVA_CHECK(key.size(3) == head_dim, "key must be [batch, heads, tokens, ", head_dim,
                   "] ([batch, heads, tokens, head_dim]), got ", key.sizes());
  } else {
    ADALLAVA_CHECK(key.dim() == 3 && key.size(2) == head_dim, "key must be [rows, tokens, ", head_dim,
                   "] ([rows, tokens, head_dim]), got ", key.sizes());
  }
  ADALLAVA_CHECK(value.sizes() == key.sizes(), "value must have the shape of key ", key.sizes(), ", got ",
                 value.sizes());
  for (const auto* t : {&key, &value}) {
    const char* name = t == &key ? "key" : "value";
    ADALLAVA_CHECK(t->scalar_type() == k_pages.scalar_type(), name, " must have the dtype of the pools (",
                   k_pages.scalar_type(), "), got ", t->scalar_type());
    ADALLAVA_CHECK(t->device() == k_pages.device(), name, " must be on the device of the pools (",
                   k_pages.device(), "), got ", t->device());
  }
  check_index_tensor("block_tables", block_tables, batched ? 3 : 2, k_pages);
  check_index_tensor("starts", starts, 1, k_pages);
  if (batched) {
    ADALLAVA_CHECK(block_tables.size(0) == key.size(0) && block_tables.size(1) == key.size(1),
                   "block_tables must be [batch, heads, pages] = [", key.size(0), ", ", key.size(1),
                   ", pages] like key, got ", block_tables.sizes());
    ADALLAVA_CHECK(starts.size(0) == key.size(0), "starts must have one entry per batch row (", key.size(0),
                   "), got ", starts.size(0));
    return {key.size(0), key.size(1), key.size(2), head_dim,
            {key.stride(0), key.stride(1), key.stride(2), key.stride(3)},
            {value.stride(0), value.stride(1), value.stride(2), value.stride(3)}};
  }
  ADALLAVA_CHECK(block_tables.size(0) == key.size(0), "block_tables must have one row per key row (",
                 key.size(0), "), got ", block_tables.size(0));
  ADALLAVA_CHECK(starts.size(0) == key.size(0), "starts must have one entry per key row (", key.size(0),
                 "), got ", starts.size(0));
  return {key.size(0), 1, key.size(1), head_dim,
          {key.stride(0), 0, key.stride(1), key.stride(2)},
          {value.stride(0), 0, value.stride(1), value.stride(2)}};
}

void check_gather(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& block_tables,
                  int64_t length) {
  check_pools(k_pages, v_pages);
  check_index_tensor("block_tables", block_tables, 2, k_pages);
  ADALLAVA_CHECK(length >= 0 && length <= block_tables.size(1) * k_pages.size(1), "length ", length,
                 " must be in [0, ", block_tables.size(1) * k_pages.size(1),
                 "]: the positions the pages of a block_tables row hold");
}

// The CPU can afford to check every page index and position before it writes
// anything; a bad call then changes nothing. Row r of the table starts at
// starts[r / heads_per_start] (or 0 without starts).
void check_pages_cpu(const at::Tensor& block_tables, int64_t num_pages, int64_t rows, int64_t width,
                     const int32_t* starts, int64_t heads_per_start, int64_t tokens, int64_t page_size) {
  const int32_t* table = block_tables.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first = starts ? starts[r / heads_per_start] : 0;
    ADALLAVA_CHECK(first >= 0 && first + tokens <= width * page_size, "row ", r, ": positions [", first, ", ",
                   first + tokens, ") do not fit the ", width, " pages of its block_tables row");
    if (tokens == 0) continue;
    for (int64_t p = first / page_size; p <= (first + tokens - 1) / page_size; ++p) {
      const int64_t page = table[r * width + p];
      ADALLAVA_CHECK(page >= 0 && page < num_pages, "block_tables[", r, ", ", p, "] = ", page,
                     " is not a page of the pool [0, ", num_pages, ")");
    }
  }
}

void kv_append_cpu(at::Tensor k_pages, at::Tensor v_pages, const at::Tensor& key, const at::Tensor& value,
                   const at::Tensor& block_tables, const at::Tensor& starts) {
  const AppendLayout a = check_append(k_pages, v_pages, key, value, block_tables, starts);
  const int64_t rows = a.batch * a.heads, head_dim = a.head_dim;
  const int64_t page_size = k_pages.size(1), width = block_tables.size(-1);
  const int32_t* start = starts.data_ptr<int32_t>();
  check_pages_cpu(block_tables, k_pages.size(0), rows, width, start, a.heads, a.tokens, page_size);
  const int32_t* table = block_tables.data_ptr<int32_t>();
  const int64_t size = k_pages.element_size();
  auto* k_dst = static_cast<char*>(k_pages.data_ptr());
  auto* v_dst = static_cast<char*>(v_pages.data_ptr());
  const auto* k_src = static_cast<const char*>(key.data_ptr());
  const auto* v_src = static_cast<const char*>(value.data_ptr());
  at::parallel_for(0, rows * a.tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / a.tokens, t = item % a.tokens;
      const int64_t b = r / a.heads, h = r % a.heads;
      const int64_t position = start[b] + t;
      const int64_t page = table[r * width + position / page_size];
      const int64_t dst = (page * page_size + position % page_size) * head_dim * size;
      for (auto [src, strides, out] : {std::make_tuple(k_src, a.key_strides, k_dst),
                                       std::make_tuple(v_src, a.value_strides, v_dst)}) {
        const char* from = src + (b * strides[0] + h * strides[1] + t * strides[2]) * size;
        if (strides[3] == 1) {
          std::memcpy(out + dst, from, head_dim * size);
        } else {
          for (int64_t d = 0; d < head_dim; ++d) {
            std::memcpy(out + dst + d * size, from + d * strides[3] * size, size);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kv_gather_cpu(const at::Tensor& k_pages, const at::Tensor& v_pages,
                                                 const at::Tensor& block_tables, int64_t length) {
  check_gather(k_pages, v_pages, block_tables, length);
  const int64_t rows = block_tables.size(0), head_dim = k_pages.size(2);
  const int64_t page_size = k_pages.size(1), width = block_tables.size(1);
  check_pages_cpu(block_tables, k_pages.size(0), rows, width, nullptr, 1, length, page_size);
  auto k_out = at::empty({rows, length, head_dim}, k_pages.options());
  auto v_out = at::empty({rows, length, head_dim}, v_pages.options());
  const int32_t* table = block_tables.data_ptr<int32_t>();
  const int64_t row_bytes = head_dim * k_pages.element_size();
  const auto* k_src = static_cast<const char*>(k_pages.data_ptr());
  const auto* v_src = static_cast<const char*>(v_pages.data_ptr());
  auto* k_dst = static_cast<char*>(k_out.data_ptr());
  auto* v_dst = static_cast<char*>(v_out.data_ptr());
  at::parallel_for(0, rows * length, 256, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / length, position = item % length;
      const int64_t page = table[r * width + position / page_size];
      const int64_t src = (page * page_size + position % page_size) * row_bytes;
      std::memcpy(k_dst + item * row_bytes, k_src + src, row_bytes);
      std::memcpy(v_dst + item * row_bytes, v_src + src, row_bytes);
    }
  });
  return {k_out, v_out};
}

#ifdef ADALLAVA_WITH_CUDA
// Page indices are not read back on a GPU (that would cost a sync per call):
// the tables come from the Python face, which builds them from pages it owns.
void kv_append_cuda(at::Tensor k_pages, at::Tensor v_pages, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& block_tables, const at::Tensor& starts) {
  const AppendLayout a = check_append(k_pages, v_pages, key, value, block_tables, starts);
  const c10::cuda::CUDAGuard guard(k_pages.device());
  const auto err = cuda::launch_kv_append(
      k_pages.data_ptr(), v_pages.data_ptr(), key.data_ptr(), value.data_ptr(), block_tables.data_ptr<int32_t>(),
      starts.data_ptr<int32_t>(), a.batch, a.heads, a.tokens, a.head_dim, k_pages.size(1), block_tables.size(-1),
      a.key_strides, a.value_strides, static_cast<int>(k_pages.element_size()),
      c10::cuda::getCurrentCUDAStream().stream());
  ADALLAVA_CHECK(err == cudaSuccess, "kv_append: CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> kv_gather_cuda(const at::Tensor& k_pages, const at::Tensor& v_pages,
                                                  const at::Tensor& block_tables, int64_t length) {
  check_gather(k_pages, v_pages, block_tables, length);
  const c10::cuda::CUDAGuard guard(k_pages.device());
  const int64_t rows = block_tables.size(0), head_dim = k_pages.size(2);
  auto k_out = at::empty({rows, length, head_dim}, k_pages.options());
  auto v_out = at::empty({rows, length, head_dim}, v_pages.options());
  const auto err = cuda::launch_kv_gather(
      k_pages.data_ptr(), v_pages.data_ptr(), k_out.data_ptr(), v_out.data_ptr(), block_tables.data_ptr<int32_t>(),
      rows, length, head_dim, k_pages.size(1), block_tables.size(1), static_cast<int>(k_pages.element_size()),
      c10::cuda::getCurrentCUDAStream().stream());
  ADALLAVA_CHECK(err == cudaSuccess, "kv_gather: CUDA launch failed: ", cudaGetErrorString(err));
  return {k_out, v_out};
}
#endif

}  // namespace

TORCH_LIBRARY(adallava, m) {
  m.def("kv_append(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor key, Tensor value, Tensor block_tables, "
        "Tensor starts) -> ()");
  m.def("kv_gather(Tensor k_pages, Tensor v_pages, Tensor block_tables, int length) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adallava, CPU, m) {
  m.impl("kv_append", &kv_append_cpu);
  m.impl("kv_gather", &kv_gather_cpu);
}

#ifdef ADALLAVA_WITH_CUDA
TORCH_LIBRARY_IMPL(adallava, CUDA, m) {
  m.impl("kv_append", &kv_append_cuda);
  m.impl("kv_gather", &kv_gather_cuda);
}
#endif

}  // namespace adallava
