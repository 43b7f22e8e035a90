// Multi-scale deformable attention, forward, CPU (float32 / float64). Same maths as Deformable DETR's CUDA kernel
// (and mmcv's): bilinear sampling with zero padding at h = y * H - 0.5, w = x * W - 0.5, weighted sum over levels and
// points. Layout: value (B, S, M, D), spatial_shapes (L, 2) int64 (H, W), level_start_index (L,), sampling_loc
// (B, Q, M, L, P, 2) in [0, 1] (x, y), attn_weight (B, Q, M, L, P). Output (B, Q, M * D).
#include <torch/extension.h>

template <typename scalar_t>
static scalar_t bilinear(const scalar_t* v, int64_t H, int64_t W, int64_t stride, scalar_t h, scalar_t w) {
  const int64_t h_low = static_cast<int64_t>(std::floor(h)), w_low = static_cast<int64_t>(std::floor(w));
  const int64_t h_high = h_low + 1, w_high = w_low + 1;
  const scalar_t lh = h - h_low, lw = w - w_low, hh = 1 - lh, hw = 1 - lw;
  scalar_t v1 = 0, v2 = 0, v3 = 0, v4 = 0;
  if (h_low >= 0 && w_low >= 0) v1 = v[(h_low * W + w_low) * stride];
  if (h_low >= 0 && w_high <= W - 1) v2 = v[(h_low * W + w_high) * stride];
  if (h_high <= H - 1 && w_low >= 0) v3 = v[(h_high * W + w_low) * stride];
  if (h_high <= H - 1 && w_high <= W - 1) v4 = v[(h_high * W + w_high) * stride];
  return hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4;
}

torch::Tensor ms_deform_attn_forward_cpu(const torch::Tensor& value, const torch::Tensor& spatial_shapes,
                                         const torch::Tensor& level_start_index, const torch::Tensor& sampling_loc,
                                         const torch::Tensor& attn_weight) {
  TORCH_CHECK(!value.is_cuda(), "ms_deform_attn_forward_cpu: value must be a CPU tensor");
  TORCH_CHECK(value.dim() == 4 && sampling_loc.dim() == 6 && attn_weight.dim() == 5, "bad input ranks");
  auto val = value.contiguous();
  auto loc = sampling_loc.contiguous().to(value.scalar_type());
  auto w = attn_weight.contiguous().to(value.scalar_type());
  auto shapes = spatial_shapes.to(torch::kLong).contiguous();
  auto starts = level_start_index.to(torch::kLong).contiguous();
  const int64_t B = val.size(0), S = val.size(1), M = val.size(2), D = val.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), P = loc.size(4);
  TORCH_CHECK(shapes.size(0) == L && starts.size(0) == L, "spatial_shapes / level_start_index do not match L");
  auto out = torch::zeros({B, Q, M, D}, val.options());
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const scalar_t* v = val.data_ptr<scalar_t>();
    const scalar_t* lp = loc.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* sh = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Q, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bq = begin; bq < end; ++bq) {
        const int64_t b = bq / Q;
        for (int64_t m = 0; m < M; ++m) {
          scalar_t* om = o + (bq * M + m) * D;
          for (int64_t l = 0; l < L; ++l) {
            const int64_t H = sh[2 * l], W = sh[2 * l + 1];
            const scalar_t* vl = v + ((b * S + st[l]) * M + m) * D;
            for (int64_t p = 0; p < P; ++p) {
              const int64_t idx = (((bq * M + m) * L + l) * P + p);
              const scalar_t x = lp[2 * idx], y = lp[2 * idx + 1], a = wp[idx];
              const scalar_t h = y * H - scalar_t(0.5), ww = x * W - scalar_t(0.5);
              if (h > -1 && ww > -1 && h < H && ww < W) {
                for (int64_t d = 0; d < D; ++d) om[d] += a * bilinear(vl + d, H, W, M * D, h, ww);
              }
            }
          }
        }
      }
    });
  });
  return out.view({B, Q, M * D});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward_cpu, "multi-scale deformable attention forward (CPU)");
}
