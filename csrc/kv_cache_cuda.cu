// CUDA kernels of the layer-skip KV cache: append new tokens' K/V into pages,
// and gather a layer's pages into contiguous tensors. See kv_cache.h.
#ifndef ADALLAVA_WITH_CUDA  // the header declares the launchers only for CUDA builds
#define ADALLAVA_WITH_CUDA
#endif
#include "kv_cache.h"

namespace adallava {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// One block per (batch row, head, token); the block's threads copy the head_dim elements.
template <typename Word>
__global__ void kv_append_kernel(Word* __restrict__ k_pages, Word* __restrict__ v_pages,
                                 const Word* __restrict__ key, const Word* __restrict__ value,
                                 const int32_t* __restrict__ block_tables,
                                 const int32_t* __restrict__ starts, int64_t batch, int64_t heads,
                                 int64_t tokens, int64_t head_dim, int64_t page_size,
                                 int64_t table_width, int64_t ks0, int64_t ks1, int64_t ks2,
                                 int64_t ks3, int64_t vs0, int64_t vs1, int64_t vs2, int64_t vs3) {
  for (int64_t item = blockIdx.x; item < batch * heads * tokens; item += gridDim.x) {
    const int64_t r = item / tokens;
    const int64_t t = item % tokens;
    const int64_t b = r / heads;
    const int64_t h = r % heads;
    const int64_t position = starts[b] + t;
    const int64_t page = block_tables[r * table_width + position / page_size];
    const int64_t dst = (page * page_size + position % page_size) * head_dim;
    for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
      k_pages[dst + d] = key[b * ks0 + h * ks1 + t * ks2 + d * ks3];
      v_pages[dst + d] = value[b * vs0 + h * vs1 + t * vs2 + d * vs3];
    }
  }
}

template <typename Word>
__global__ void kv_gather_kernel(const Word* __restrict__ k_pages, const Word* __restrict__ v_pages,
                                 Word* __restrict__ k_out, Word* __restrict__ v_out,
                                 const int32_t* __restrict__ block_tables, int64_t rows,
                                 int64_t length, int64_t head_dim, int64_t page_size,
                                 int64_t table_width) {
  for (int64_t item = blockIdx.x; item < rows * length; item += gridDim.x) {
    const int64_t r = item / length;
    const int64_t position = item % length;
    const int64_t page = block_tables[r * table_width + position / page_size];
    const int64_t src = (page * page_size + position % page_size) * head_dim;
    const int64_t dst = item * head_dim;
    for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
      k_out[dst + d] = k_pages[src + d];
      v_out[dst + d] = v_pages[src + d];
    }
  }
}

// Enough blocks to fill a large GPU; the kernels loop over the rest.
unsigned int grid_for(int64_t items) {
  const int64_t cap = 65535;
  return static_cast<unsigned int>(items < cap ? items : cap);
}

}  // namespace

cudaError_t launch_kv_append(void* k_pages, void* v_pages, const void* key, const void* value,
                             const int32_t* block_tables, const int32_t* starts, int64_t batch,
                             int64_t heads, int64_t tokens, int64_t head_dim, int64_t page_size,
                             int64_t table_width, const int64_t key_strides[4],
                             const int64_t value_strides[4], int element_size, cudaStream_t stream) {
  const int64_t items = batch * heads * tokens;
  if (items == 0) return cudaSuccess;
  const unsigned int grid = grid_for(items);
#define ADALLAVA_APPEND(Word)                                                                    \
  kv_append_kernel<Word><<<grid, kThreads, 0, stream>>>(                                         \
      static_cast<Word*>(k_pages), static_cast<Word*>(v_pages), static_cast<const Word*>(key),   \
      static_cast<const Word*>(value), block_tables, starts, batch, heads, tokens, head_dim,     \
      page_size, table_width, key_strides[0], key_strides[1], key_strides[2], key_strides[3],    \
      value_strides[0], value_strides[1], value_strides[2], value_strides[3])
  if (element_size == 2) {
    ADALLAVA_APPEND(uint16_t);
  } else if (element_size == 4) {
    ADALLAVA_APPEND(uint32_t);
  } else {
    return cudaErrorInvalidValue;
  }
#undef ADALLAVA_APPEND
  return cudaGetLastError();
}

cudaError_t launch_kv_gather(const void* k_pages, const void* v_pages, void* k_out, void* v_out,
                             const int32_t* block_tables, int64_t rows, int64_t length,
                             int64_t head_dim, int64_t page_size, int64_t table_width,
                             int element_size, cudaStream_t stream) {
  if (rows * length == 0) return cudaSuccess;
  const unsigned int grid = grid_for(rows * length);
#define ADALLAVA_GATHER(Word)                                                                       \
  kv_gather_kernel<Word><<<grid, kThreads, 0, stream>>>(                                            \
      static_cast<const Word*>(k_pages), static_cast<const Word*>(v_pages), static_cast<Word*>(k_out), \
      static_cast<Word*>(v_out), block_tables, rows, length, head_dim, page_size, table_width)
  if (element_size == 2) {
    ADALLAVA_GATHER(uint16_t);
  } else if (element_size == 4) {
    ADALLAVA_GATHER(uint32_t);
  } else {
    return cudaErrorInvalidValue;
  }
#undef ADALLAVA_GATHER
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace adallava
