// paged_attention.h — decode attention that reads K/V straight from KV pages (no torch).
//
// One query token per row attends over the first context_lens[row] tokens of its sequence,
// whose K/V live in pages addressed through a page table. Reading the pages in place saves
// the gather copy a dense attention call needs: decode attention is bound by memory traffic,
// and the gather read every page once more and wrote it once.
#pragma once

#include <cstdint>

#include "core/status.h"

namespace ekv {

// Everything the kernel reads and writes, as raw pointers with element strides (float32
// elements, not bytes). The innermost (head_dim) stride of every tensor must be 1.
struct PagedDecodeArgs {
  float* out = nullptr;          // row r, head h at out + out_row_of(r)*out_token_stride + h*out_head_stride
  const float* query = nullptr;  // same addressing with q_token_stride / q_head_stride
  std::int64_t q_token_stride = 0;
  std::int64_t q_head_stride = 0;
  std::int64_t out_token_stride = 0;
  std::int64_t out_head_stride = 0;
  // Optional: row r's query and output are token row_tokens[r] (null: token r).
  const std::int64_t* row_tokens = nullptr;
  std::int64_t num_tokens = 0;  // bound on row_tokens (and on rows when row_tokens is null)

  const float* key_cache = nullptr;  // page p, token t, kv head g at p*page_stride + t*token_stride + g*head_stride
  const float* value_cache = nullptr;
  std::int64_t k_page_stride = 0, k_token_stride = 0, k_head_stride = 0;
  std::int64_t v_page_stride = 0, v_token_stride = 0, v_head_stride = 0;
  std::int64_t num_pages = 0;  // valid page ids are [0, num_pages)
  std::int64_t page_tokens = 0;

  const void* page_table = nullptr;  // [rows, max_pages] row-major with row stride table_row_stride
  int table_index_bytes = 8;         // 4 (int32) or 8 (int64)
  std::int64_t table_row_stride = 0;
  std::int64_t max_pages = 0;
  const void* context_lens = nullptr;  // [rows], each in [1, max_pages * page_tokens]
  int lens_index_bytes = 8;

  std::int64_t rows = 0;
  std::int64_t heads = 0;  // query heads; heads % kv_heads == 0 (grouped-query attention)
  std::int64_t kv_heads = 0;
  std::int64_t head_dim = 0;
  float scale = 1.0f;
  int threads = 1;  // worker threads including the caller (>= 1)
};

// Validates every argument (shapes, strides, page ids, lengths) before touching the output,
// then computes softmax(q k^T * scale) v per row and head in one pass over the pages
// (online softmax, float32 accumulation). Work is split over (row, kv head) pairs.
Status paged_decode_attention(const PagedDecodeArgs& args);

}  // namespace ekv
