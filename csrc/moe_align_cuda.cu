// fastcap._C: CUDA implementation of moe_align (schema and CPU twin in moe_align.cpp).
//
// Same output as the CPU version, bit for bit: pairs sorted by expert, increasing pair id inside
// each expert (stable, so everything downstream is deterministic). Three launches, no host sync:
//   1. count:   one CTA per tile of kTile pairs; shared-memory histogram -> tile_cnt (tiles, E).
//   2. offsets: one CTA; per-expert totals, padded segment offsets, expert id of every used block,
//               num_tokens_post_pad, and tile_cnt rewritten as the absolute first slot of each
//               (tile, expert).
//   3. scatter: one CTA per tile; walks its pairs in order, 256 at a time, ranking equal experts
//               inside a warp with __match_any_sync and across warps with per-warp counts, so the
//               order is exactly increasing pair id.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace fastcap {

int64_t moe_align_max_padded(int64_t num_pairs, int64_t num_experts, int64_t block_m);
void moe_align_check(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m);

namespace {

constexpr int kThreads = 256;  // threads per CTA in the count and scatter kernels
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 2048;  // pairs per CTA: few enough CTAs that the offsets pass stays short
constexpr int kMaxExperts = 1024;  // scatter needs (kWarps + 1) * E ints of shared memory

template <typename id_t>
__global__ void count_kernel(const id_t* __restrict__ ids,  // (P,) flat topk_ids
                             int32_t* __restrict__ tile_cnt,  // (tiles, E) out: pairs per expert
                             int64_t num_pairs, int num_experts) {
  extern __shared__ int32_t cnt[];  // (E,)
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t end = min(start + kTile, num_pairs);
  for (int64_t p = start + threadIdx.x; p < end; p += blockDim.x) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts && "moe_align: expert id out of range");
    atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    tile_cnt[static_cast<int64_t>(blockIdx.x) * num_experts + e] = cnt[e];
  }
}

__global__ void offsets_kernel(int32_t* __restrict__ tile_cnt,  // (tiles, E) in: counts; out:
                                                                 //   first slot of (tile, expert)
                               int32_t* __restrict__ expert_ids,  // (max_padded / block_m,)
                               int32_t* __restrict__ total,        // (1,) num_tokens_post_pad
                               int num_tiles, int num_experts, int block_m) {
  extern __shared__ int32_t smem[];
  int32_t* count = smem;                // (E,) pairs per expert
  int32_t* offset = smem + num_experts;  // (E,) first slot of each expert's segment
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int32_t run = 0;  // exclusive scan over tiles, within the expert
    for (int t = 0; t < num_tiles; ++t) {
      const int32_t c = tile_cnt[static_cast<int64_t>(t) * num_experts + e];
      tile_cnt[static_cast<int64_t>(t) * num_experts + e] = run;
      run += c;
    }
    count[e] = run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // E <= kMaxExperts: a sequential scan is a few microseconds, cheaper than a second launch.
    int32_t off = 0;
    for (int e = 0; e < num_experts; ++e) {
      offset[e] = off;
      off += (count[e] + block_m - 1) / block_m * block_m;
    }
    *total = off;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const int32_t off = offset[e];
    for (int t = 0; t < num_tiles; ++t) tile_cnt[static_cast<int64_t>(t) * num_experts + e] += off;
    const int32_t padded = (count[e] + block_m - 1) / block_m * block_m;
    for (int32_t b = off / block_m; b < (off + padded) / block_m; ++b) expert_ids[b] = e;
  }
}

template <typename id_t>
__global__ void scatter_kernel(const id_t* __restrict__ ids,  // (P,) flat topk_ids
                               const int32_t* __restrict__ tile_off,  // (tiles, E) first slots
                               int32_t* __restrict__ sorted,  // (max_padded,) out: pair ids
                               int64_t num_pairs, int num_experts) {
  extern __shared__ int32_t smem[];
  int32_t* cursor = smem;                   // (E,) next free slot of each expert for this tile
  int32_t* warp_cnt = smem + num_experts;  // (kWarps, E) pairs per expert in each warp's chunk
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    cursor[e] = tile_off[static_cast<int64_t>(blockIdx.x) * num_experts + e];
    for (int w = 0; w < kWarps; ++w) warp_cnt[w * num_experts + e] = 0;
  }
  __syncthreads();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t end = min(start + kTile, num_pairs);
  for (int64_t base = start; base < end; base += kThreads) {
    const int64_t p = base + threadIdx.x;
    const bool valid = p < end;
    const int e = valid ? static_cast<int>(ids[p]) : -1;
    // Lanes holding the same expert; the lowest one publishes the warp's count.
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (valid && rank == 0) warp_cnt[warp * num_experts + e] = __popc(same);
    __syncthreads();
    if (valid) {
      int32_t pos = cursor[e] + rank;
      for (int w = 0; w < warp; ++w) pos += warp_cnt[w * num_experts + e];
      sorted[pos] = static_cast<int32_t>(p);
    }
    __syncthreads();
    for (int x = threadIdx.x; x < num_experts; x += blockDim.x) {
      int32_t s = 0;
      for (int w = 0; w < kWarps; ++w) {
        s += warp_cnt[w * num_experts + x];
        warp_cnt[w * num_experts + x] = 0;
      }
      cursor[x] += s;
    }
    __syncthreads();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& topk_ids,
                                                               int64_t num_experts,
                                                               int64_t block_m) {
  moe_align_check(topk_ids, num_experts, block_m);
  TORCH_CHECK(topk_ids.is_cuda(), "moe_align_cuda: topk_ids must be a CUDA tensor");
  TORCH_CHECK(num_experts <= kMaxExperts, "moe_align (CUDA): num_experts must be <= ",
              kMaxExperts, ", got ", num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t num_pairs = ids.numel();
  const int64_t max_padded = moe_align_max_padded(num_pairs, num_experts, block_m);
  const auto opts = ids.options().dtype(at::kInt);
  at::Tensor sorted = at::full({max_padded}, num_pairs, opts);
  at::Tensor expert_ids = at::full({max_padded / block_m}, -1, opts);
  at::Tensor total = at::zeros({1}, opts);
  if (num_pairs == 0) return {sorted, expert_ids, total};

  const int num_tiles = static_cast<int>((num_pairs + kTile - 1) / kTile);
  const int E = static_cast<int>(num_experts);
  at::Tensor tile_cnt = at::empty({num_tiles, E}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_align_cuda", [&] {
    count_kernel<index_t><<<num_tiles, kThreads, E * sizeof(int32_t), stream>>>(
        ids.data_ptr<index_t>(), tile_cnt.data_ptr<int32_t>(), num_pairs, E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    offsets_kernel<<<1, 1024, 2 * E * sizeof(int32_t), stream>>>(
        tile_cnt.data_ptr<int32_t>(), expert_ids.data_ptr<int32_t>(), total.data_ptr<int32_t>(),
        num_tiles, E, static_cast<int>(block_m));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scatter_kernel<index_t><<<num_tiles, kThreads, (kWarps + 1) * E * sizeof(int32_t), stream>>>(
        ids.data_ptr<index_t>(), tile_cnt.data_ptr<int32_t>(), sorted.data_ptr<int32_t>(),
        num_pairs, E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sorted, expert_ids, total};
}

}  // namespace fastcap

TORCH_LIBRARY_IMPL(fastcap, CUDA, m) { m.impl("moe_align", &fastcap::moe_align_cuda); }
