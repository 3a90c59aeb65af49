// fastcap._C: routing primitives for the mixture-of-experts FFN (CPU implementation + schema).
//
// moe_align(topk_ids, num_experts, block_m) -> (sorted_token_ids, expert_ids, num_tokens_post_pad)
//
// A counting sort of the T*k (token, choice) pairs by expert. Pair p = t*k + c is the flat index
// into topk_ids (T, k). Each expert's pairs are laid out contiguously, in increasing p (stable, so
// every reduction that follows the order is deterministic), and its segment is padded with the
// sentinel T*k up to a multiple of block_m. Experts follow one another in id order; an expert with
// no pair has an empty segment. Outputs (all int32, on topk_ids' device):
//   sorted_token_ids    (max_padded,)  pair ids, sentinel T*k in padding and past the end
//   expert_ids          (max_padded / block_m,)  expert of each block of block_m slots, -1 past
//                       the last used block (so a grouped GEMM can skip those blocks at once)
//   num_tokens_post_pad (1,)  number of used slots, a multiple of block_m
// where max_padded = T*k + min(E, T*k) * (block_m - 1) rounded up to a multiple of block_m, an
// upper bound known without looking at the ids (so a GPU caller never synchronises to size the
// grid). The CUDA kernel (moe_align_cuda.cu) returns exactly the same tensors.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastcap {

int64_t moe_align_max_padded(int64_t num_pairs, int64_t num_experts, int64_t block_m) {
  const int64_t bound = num_pairs + std::min(num_experts, num_pairs) * (block_m - 1);
  return (bound + block_m - 1) / block_m * block_m;
}

void moe_align_check(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
  TORCH_CHECK(topk_ids.dim() == 2, "moe_align: topk_ids must be (T, k), got ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "moe_align: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "moe_align: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block_m >= 1, "moe_align: block_m must be >= 1, got ", block_m);
  // int32 outputs: every slot index and the sentinel must fit.
  const int64_t num_pairs = topk_ids.numel();
  TORCH_CHECK(moe_align_max_padded(num_pairs, num_experts, block_m) < INT32_MAX,
              "moe_align: T*k = ", num_pairs, " with block_m = ", block_m,
              " overflows int32 slot indices");
}

namespace {

template <typename id_t>
void align_cpu(const id_t* ids, int64_t num_pairs, int64_t num_experts, int64_t block_m,
               int32_t* sorted, int32_t* expert_ids, int32_t* total) {
  std::vector<int64_t> count(num_experts, 0);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    TORCH_CHECK(e >= 0 && e < num_experts, "moe_align: topk_ids holds ", e, " at flat index ", p,
                ", outside [0, ", num_experts, ")");
    ++count[e];
  }
  std::vector<int64_t> cursor(num_experts);
  int64_t off = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    cursor[e] = off;
    const int64_t padded = (count[e] + block_m - 1) / block_m * block_m;
    for (int64_t b = off / block_m; b < (off + padded) / block_m; ++b) {
      expert_ids[b] = static_cast<int32_t>(e);
    }
    off += padded;
  }
  *total = static_cast<int32_t>(off);
  // Increasing p within each expert: the stable order the CUDA kernel reproduces.
  for (int64_t p = 0; p < num_pairs; ++p) {
    sorted[cursor[static_cast<int64_t>(ids[p])]++] = static_cast<int32_t>(p);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& topk_ids,
                                                              int64_t num_experts,
                                                              int64_t block_m) {
  moe_align_check(topk_ids, num_experts, block_m);
  TORCH_CHECK(topk_ids.device().is_cpu(), "moe_align_cpu: topk_ids must be a CPU tensor");
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t num_pairs = ids.numel();
  const int64_t max_padded = moe_align_max_padded(num_pairs, num_experts, block_m);
  const auto opts = ids.options().dtype(at::kInt);
  at::Tensor sorted = at::full({max_padded}, num_pairs, opts);
  at::Tensor expert_ids = at::full({max_padded / block_m}, -1, opts);
  at::Tensor total = at::zeros({1}, opts);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_align_cpu", [&] {
    align_cpu<index_t>(ids.data_ptr<index_t>(), num_pairs, num_experts, block_m,
                       sorted.data_ptr<int32_t>(), expert_ids.data_ptr<int32_t>(),
                       total.data_ptr<int32_t>());
  });
  return {sorted, expert_ids, total};
}

}  // namespace fastcap

// FRAGMENT: other fastcap extensions may add ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(fastcap, m) {
  m.def(
      "moe_align(Tensor topk_ids, int num_experts, int block_m) -> "
      "(Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_pad)");
}

TORCH_LIBRARY_IMPL(fastcap, CPU, m) { m.impl("moe_align", &fastcap::moe_align_cpu); }
