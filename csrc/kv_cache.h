// Launchers of the CUDA kernels of the layer-skip KV cache (kv_cache_cuda.cu).
//
// Plain CUDA with raw pointers and no torch headers, so that `nvcc -c` compiles
// the .cu file on a machine whose torch has no CUDA. Elements are moved as raw
// 2- or 4-byte words: the cache copies K/V, it never does arithmetic on them.
#pragma once

#include <cstdint>

#ifdef ADALLAVA_WITH_CUDA
#include <cuda_runtime_api.h>

namespace adallava {
namespace cuda {

// Key/value [batch, heads, tokens, head_dim] (element strides: batch, head, token,
// element) go to positions starts[b] .. starts[b] + tokens - 1 of the pages listed
// in row b * heads + h of block_tables ([batch * heads, table_width]).
cudaError_t launch_kv_append(void* k_pages, void* v_pages, const void* key, const void* value,
                             const int32_t* block_tables, const int32_t* starts, int64_t batch,
                             int64_t heads, int64_t tokens, int64_t head_dim, int64_t page_size,
                             int64_t table_width, const int64_t key_strides[4],
                             const int64_t value_strides[4], int element_size, cudaStream_t stream);

// Positions 0 .. length - 1 of each row's pages, into contiguous [rows, length, head_dim].
cudaError_t launch_kv_gather(const void* k_pages, const void* v_pages, void* k_out, void* v_out,
                             const int32_t* block_tables, int64_t rows, int64_t length,
                             int64_t head_dim, int64_t page_size, int64_t table_width,
                             int element_size, cudaStream_t stream);

}  // namespace cuda
}  // namespace adallava
#endif
