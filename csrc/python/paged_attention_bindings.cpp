// paged_attention_bindings.cpp — _C.paged_decode_attention and _C.causal_prefill_attention:
// the CPU attention kernels over integer data pointers, shapes and element strides that the
// Python layer reads from its tensors (it checks devices, dtypes and shapes; the kernels check
// values: page ids, lengths, heads).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "kernels/paged_attention.h"
#include "kernels/prefill_attention.h"
#include "python/py_status.h"

namespace py = pybind11;

namespace ekv {
namespace {

// (page, token, head) element strides from a Python tuple of three ints.
void read_strides(const py::tuple& t, std::int64_t& page, std::int64_t& token, std::int64_t& head) {
  page = t[0].cast<std::int64_t>();
  token = t[1].cast<std::int64_t>();
  head = t[2].cast<std::int64_t>();
}

// Runs a kernel with the GIL released (it touches no Python object) and raises its error.
template <typename Args>
void run_kernel(Status (*kernel)(const Args&), const Args& args) {
  Status st;
  {
    py::gil_scoped_release nogil;
    st = kernel(args);
  }
  throw_if_error(st);
}

}  // namespace

void bind_paged_attention(py::module_& m) {
  m.def(
      "paged_decode_attention",
      [](std::uintptr_t out, std::uintptr_t query, std::int64_t q_token_stride, std::int64_t q_head_stride,
         std::int64_t out_token_stride, std::int64_t out_head_stride, std::uintptr_t row_tokens,
         std::int64_t num_tokens, std::uintptr_t key_cache, std::uintptr_t value_cache, py::tuple k_strides,
         py::tuple v_strides, std::int64_t num_pages, std::int64_t page_tokens, std::uintptr_t page_table,
         int table_index_bytes, std::int64_t table_row_stride, std::int64_t max_pages, std::uintptr_t context_lens,
         int lens_index_bytes, std::int64_t rows, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
         double scale, int threads) {
        if (k_strides.size() != 3 || v_strides.size() != 3) {
          throw py::value_error("paged_decode_attention: k_strides and v_strides must be (page, token, head)");
        }
        PagedDecodeArgs a;
        a.out = reinterpret_cast<float*>(out);
        a.query = reinterpret_cast<const float*>(query);
        a.q_token_stride = q_token_stride;
        a.q_head_stride = q_head_stride;
        a.out_token_stride = out_token_stride;
        a.out_head_stride = out_head_stride;
        a.row_tokens = reinterpret_cast<const std::int64_t*>(row_tokens);
        a.num_tokens = num_tokens;
        a.key_cache = reinterpret_cast<const float*>(key_cache);
        a.value_cache = reinterpret_cast<const float*>(value_cache);
        read_strides(k_strides, a.k_page_stride, a.k_token_stride, a.k_head_stride);
        read_strides(v_strides, a.v_page_stride, a.v_token_stride, a.v_head_stride);
        a.num_pages = num_pages;
        a.page_tokens = page_tokens;
        a.page_table = reinterpret_cast<const void*>(page_table);
        a.table_index_bytes = table_index_bytes;
        a.table_row_stride = table_row_stride;
        a.max_pages = max_pages;
        a.context_lens = reinterpret_cast<const void*>(context_lens);
        a.lens_index_bytes = lens_index_bytes;
        a.rows = rows;
        a.heads = heads;
        a.kv_heads = kv_heads;
        a.head_dim = head_dim;
        a.scale = static_cast<float>(scale);
        a.threads = threads;
        run_kernel(paged_decode_attention, a);
      },
      py::arg("out"), py::arg("query"), py::arg("q_token_stride"), py::arg("q_head_stride"),
      py::arg("out_token_stride"), py::arg("out_head_stride"), py::arg("row_tokens"), py::arg("num_tokens"),
      py::arg("key_cache"), py::arg("value_cache"), py::arg("k_strides"), py::arg("v_strides"), py::arg("num_pages"),
      py::arg("page_tokens"), py::arg("page_table"), py::arg("table_index_bytes"), py::arg("table_row_stride"),
      py::arg("max_pages"), py::arg("context_lens"), py::arg("lens_index_bytes"), py::arg("rows"), py::arg("heads"),
      py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("threads"),
      "Decode attention over KV pages in place (see csrc/kernels/paged_attention.h); float32, element strides, "
      "pointers as ints (row_tokens 0 = row r is token r).");
  m.def(
      "causal_prefill_attention",
      [](std::uintptr_t out, std::uintptr_t query, py::tuple q_strides, py::tuple out_strides, std::int64_t queries,
         std::int64_t q_start, std::uintptr_t key, std::uintptr_t value, py::tuple k_strides, py::tuple v_strides,
         std::uintptr_t page_table, int table_index_bytes, std::int64_t table_pages, std::int64_t page_tokens,
         std::int64_t num_pages, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim, double scale,
         int threads, int isa) {
        if (q_strides.size() != 2 || out_strides.size() != 2) {
          throw py::value_error("causal_prefill_attention: q_strides and out_strides must be (token, head)");
        }
        if (k_strides.size() != 3 || v_strides.size() != 3) {
          throw py::value_error("causal_prefill_attention: k_strides and v_strides must be (page, token, head)");
        }
        CausalPrefillArgs a;
        a.out = reinterpret_cast<float*>(out);
        a.query = reinterpret_cast<const float*>(query);
        a.q_token_stride = q_strides[0].cast<std::int64_t>();
        a.q_head_stride = q_strides[1].cast<std::int64_t>();
        a.out_token_stride = out_strides[0].cast<std::int64_t>();
        a.out_head_stride = out_strides[1].cast<std::int64_t>();
        a.queries = queries;
        a.q_start = q_start;
        a.key = reinterpret_cast<const float*>(key);
        a.value = reinterpret_cast<const float*>(value);
        read_strides(k_strides, a.k_page_stride, a.k_token_stride, a.k_head_stride);
        read_strides(v_strides, a.v_page_stride, a.v_token_stride, a.v_head_stride);
        a.page_table = reinterpret_cast<const void*>(page_table);
        a.table_index_bytes = table_index_bytes;
        a.table_pages = table_pages;
        a.page_tokens = page_tokens;
        a.num_pages = num_pages;
        a.heads = heads;
        a.kv_heads = kv_heads;
        a.head_dim = head_dim;
        a.scale = static_cast<float>(scale);
        a.threads = threads;
        a.isa = isa;
        run_kernel(causal_prefill_attention, a);
      },
      py::arg("out"), py::arg("query"), py::arg("q_strides"), py::arg("out_strides"), py::arg("queries"),
      py::arg("q_start"), py::arg("key"), py::arg("value"), py::arg("k_strides"), py::arg("v_strides"),
      py::arg("page_table"), py::arg("table_index_bytes"), py::arg("table_pages"), py::arg("page_tokens"),
      py::arg("num_pages"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"),
      py::arg("threads"), py::arg("isa"),
      "Causal attention of a prompt chunk over its K/V, contiguous or paged (see "
      "csrc/kernels/prefill_attention.h); float32, element strides, pointers as ints (page_table 0 = contiguous).");
  m.def(
      "prefill_isa_levels",
      []() {
        int levels[3];
        const int n = prefill_isa_levels(levels, 3);
        return std::vector<int>(levels, levels + n);
      },
      "Instruction-set levels causal_prefill_attention can run here, best first (4 AVX-512, 3 AVX2, 1 portable).");
}

}  // namespace ekv
