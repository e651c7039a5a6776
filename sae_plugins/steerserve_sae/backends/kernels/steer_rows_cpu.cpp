// The steering step at one layer as a single native CPU op (see sae_plugins/steerserve_sae/backends/native_cpu.py).
//
// It does what the PyTorch reference backend (torch_reference.py) does, reading everything
// from the runtime's fixed buffers: this layer's routing [6, max_rows] and its live counts
// [6] = (rows with an add vector, rows to encode, feature-table width in use, gate probes in
// use, rows with projected vector edits, vector-table width in use). Nothing branches on request data in Python; a step with nothing planned here returns
// after reading 4 ints. Gates (sae_plugins/steerserve_sae/gating.py): a row's gate probes here write its
// gate_state columns from the stream as it arrived, before any edit; every encoded entry's
// coefficient is multiplied by the gate_state column it names (the last column is all ones).
// Direction vectors (sae_plugins/steerserve_sae/steering/vector_math.py): each projected entry's coefficient
// min(offset + gain * (x . dir), upper) is taken from the stream as it arrived, before the
// encoded edits, and applied after them (times its gate), before the add vectors.
// The reference costs ~20 eager kernels (~100 us for one row on a small SAE); here the
// encode is one matmul (register-tiled for a few float32 rows, else ATen's addmm) and the
// rest (top-k threshold, touched-feature coefficients, decode, write-back) is one pass per row.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace {

// Rows of a layer's routing buffer (step_plan.py: STEER_ROWS, ...).
constexpr int64_t kSteerRows = 0, kSteerSlots = 1, kEncodeRows = 2, kEncodeSlots = 3, kVectorRows = 4,
                  kVectorSlots = 5, kRoutingRows = 6;

void check_rows(const int64_t* rows, int64_t n, int64_t num_tokens) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rows[i] >= 0 && rows[i] < num_tokens, "steerserve: routed row ", rows[i],
                " outside the forward's ", num_tokens, " rows");
  }
}

// hidden[row] += add_table[slot], rounded to hidden's dtype first, as index_add_ does.
template <typename scalar_t>
void add_rows(at::Tensor& hidden, const int64_t* rows, const int64_t* slots, int64_t n,
              const at::Tensor& add_table) {
  const int64_t d = hidden.size(1), stride = hidden.stride(0);
  scalar_t* h = hidden.data_ptr<scalar_t>();
  const float* table = add_table.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    scalar_t* row = h + rows[i] * stride;
    const float* v = table + slots[i] * d;
    for (int64_t j = 0; j < d; ++j) {
      row[j] = static_cast<scalar_t>(static_cast<float>(row[j]) +
                                     static_cast<float>(static_cast<scalar_t>(v[j])));
    }
  }
}

// TopK keeps exactly k features per row; among pre-activations tied with the k-th largest the
// lowest feature indices win (sae_plugins/steerserve_sae/activations.py). So feature i, pre-activation a, is
// kept iff #{j : p_j > a} + #{j < i : p_j == a} < k. One counting pass per touched feature
// (vectorised compares, early exit) beats selecting the k-th value (a copy and an nth_element
// over all d_sae) while a row touches few features; with many, one selection serves them all.
constexpr int64_t kMaxCountedFeatures = 8;

inline bool reaches_top_k(const float* p, int64_t n, int64_t id, float a, int64_t k) {
  int64_t ahead = 0;
  for (int64_t j0 = 0; j0 < n; j0 += 2048) {
    const int64_t j1 = std::min(n, j0 + 2048);
    int32_t count = 0;
    for (int64_t j = j0; j < j1; ++j) count += (p[j] > a) | ((p[j] == a) & (j < id));
    ahead += count;
    if (ahead >= k) return false;
  }
  return true;
}

// With the row's k-th largest value kth and `above` = #{j : p_j > kth}: a feature above kth is
// kept, one below is not, and one equal to it is kept iff fewer than k - above tied features
// have a lower index.
inline bool kept_given_kth(const float* p, int64_t id, float a, float kth, int64_t above, int64_t k) {
  if (a != kth) return a > kth;
  int64_t lower_ties = 0;
  for (int64_t j = 0; j < id; ++j) lower_ties += p[j] == kth;
  return lower_ties < k - above;
}

// The gate tables of this layer (see slot_tables.py), and the forward's per-row gate state.
struct Gates {
  const int64_t* edit_gates;  // [slots, F]: gate column of each table entry
  const int64_t* probe_ids;   // [slots, F]: per gate column, the feature probed here (-1: none)
  const float* bounds;        // [slots, F, 2]: (above, below)
  float* state;               // [max_rows, F + 1]
  int64_t columns;            // F + 1
  int64_t width;              // gate columns probed at this layer (live count)
};

// delta[e] = sum_f gate * (offset + gain * f_i(x_e)) * W_dec[i] over the row's slot's table
// entries, after the row's gate probes here have written its gate_state columns.
template <typename dec_t>
void touched_feature_deltas(const at::Tensor& pre, const int64_t* rows, const int64_t* slots, int64_t width,
                            const at::Tensor& feature_ids, const at::Tensor& coefficients, const Gates& gates,
                            const at::Tensor& W_dec, const c10::optional<at::Tensor>& threshold,
                            int64_t k, at::Tensor& delta) {
  const int64_t num_rows = pre.size(0), d_sae = pre.size(1), d = delta.size(1);
  const int64_t table_width = feature_ids.size(1);
  const float* pre_data = pre.data_ptr<float>();
  const int64_t* ids = feature_ids.data_ptr<int64_t>();
  const float* coef = coefficients.data_ptr<float>();
  const dec_t* dec = W_dec.data_ptr<dec_t>();
  const float* thr = threshold.has_value() ? threshold->data_ptr<float>() : nullptr;
  float* out = delta.data_ptr<float>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t e = begin; e < end; ++e) {
      const float* p = pre_data + e * d_sae;
      const int64_t entry = slots[e] * table_width;
      int64_t positive = 0;  // touched features with a > 0: only they can be active
      for (int64_t f = 0; f < width; ++f) {
        const int64_t id = ids[entry + f];
        TORCH_CHECK(id >= 0 && id < d_sae, "steerserve: feature id ", id, " out of range");
        positive += p[id] > 0.0f;
      }
      for (int64_t c = 0; c < gates.width; ++c) {
        const int64_t id = gates.probe_ids[entry + c];
        TORCH_CHECK(id >= -1 && id < d_sae, "steerserve: gate feature id ", id, " out of range");
        positive += id >= 0 && p[id] > 0.0f;
      }
      float kth = -std::numeric_limits<float>::infinity();
      int64_t above = 0;  // pre-activations strictly above kth
      const bool select_kth = k > 0 && positive > kMaxCountedFeatures;
      if (select_kth) {  // the row's k-th largest pre-activation
        scratch.assign(p, p + d_sae);
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
        kth = scratch[k - 1];
        for (int64_t j = 0; j < d_sae; ++j) above += p[j] > kth;
      }
      auto activation = [&](int64_t id) {
        const float a = p[id];
        if (!(a > 0.0f)) return 0.0f;  // every activation ends in a ReLU
        if (k > 0) {
          return (select_kth ? kept_given_kth(p, id, a, kth, above, k) : reaches_top_k(p, d_sae, id, a, k)) ? a : 0.0f;
        }
        return thr != nullptr && !(a > thr[id]) ? 0.0f : a;
      };
      float* state = gates.state + rows[e] * gates.columns;
      for (int64_t c = 0; c < gates.width; ++c) {
        const int64_t id = gates.probe_ids[entry + c];
        if (id < 0) continue;  // this gate reads another layer
        const float a = activation(id);
        state[c] = a > gates.bounds[2 * (entry + c)] && a < gates.bounds[2 * (entry + c) + 1] ? 1.0f : 0.0f;
      }
      float* row_delta = out + e * d;
      for (int64_t f = 0; f < width; ++f) {
        const float offset = coef[2 * (entry + f)], gain = coef[2 * (entry + f) + 1];
        if (offset == 0.0f && gain == 0.0f) continue;  // padding entry
        const int64_t column = gates.edit_gates[entry + f];
        TORCH_CHECK(column >= 0 && column < gates.columns, "steerserve: gate column ", column, " out of range");
        const float gate = state[column];
        if (gate == 0.0f) continue;
        const int64_t id = ids[entry + f];
        const float c = gate * (offset + gain * (gain == 0.0f ? 0.0f : activation(id)));
        const dec_t* direction = dec + id * d;
        for (int64_t j = 0; j < d; ++j) row_delta[j] += c * static_cast<float>(direction[j]);
      }
    }
  });
}

// The vector tables of this layer (see slot_tables.py).
struct Vectors {
  const float* pool;     // [pool_rows, d]: directions
  int64_t pool_rows;
  const int64_t* ids;    // [slots, V]: pool row of each entry
  const float* rules;    // [slots, V, 3]: (offset, gain, upper)
  const int64_t* gates;  // [slots, V]: gate column of each entry
  int64_t table_width;   // V
  int64_t width;         // entries in use at this layer (live count)
};

// coef[e, v] = min(offset + gain * (x_e . dir), upper), x_e = hidden + residual as float.
template <typename hidden_t>
std::vector<float> vector_coefficients(const at::Tensor& hidden, const at::Tensor& residual, const int64_t* rows,
                                       const int64_t* slots, int64_t n, const Vectors& vec) {
  const int64_t d = hidden.size(1), width = vec.width;
  const hidden_t* hid = hidden.data_ptr<hidden_t>();
  const hidden_t* res = residual.data_ptr<hidden_t>();
  std::vector<float> coef(n * width, 0.0f);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(d);
    for (int64_t e = begin; e < end; ++e) {
      const hidden_t* hr = hid + rows[e] * hidden.stride(0);
      const hidden_t* rr = res + rows[e] * residual.stride(0);
      for (int64_t j = 0; j < d; ++j) x[j] = static_cast<float>(hr[j]) + static_cast<float>(rr[j]);
      for (int64_t v = 0; v < width; ++v) {
        const int64_t entry = slots[e] * vec.table_width + v;
        const float* rule = vec.rules + 3 * entry;
        const int64_t id = vec.ids[entry];
        TORCH_CHECK(id >= 0 && id < vec.pool_rows, "steerserve: vector pool row ", id, " out of range");
        const float* dir = vec.pool + id * d;
        float p = 0.0f;
        for (int64_t j = 0; j < d; ++j) p += x[j] * dir[j];
        coef[e * width + v] = std::min(rule[0] + rule[1] * p, rule[2]);  // padding (0, 0, 0) gives 0
      }
    }
  });
  return coef;
}

// hidden[row] = round(hidden[row] + sum_v gate * coef * dir), after the encoded edits wrote the gates.
template <typename hidden_t>
void apply_vectors(at::Tensor& hidden, const int64_t* rows, const int64_t* slots, int64_t n,
                   const std::vector<float>& coef, const Vectors& vec, const Gates& gates) {
  const int64_t d = hidden.size(1), width = vec.width;
  hidden_t* hid = hidden.data_ptr<hidden_t>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> delta(d);
    for (int64_t e = begin; e < end; ++e) {
      std::fill(delta.begin(), delta.end(), 0.0f);
      const float* state = gates.state + rows[e] * gates.columns;
      for (int64_t v = 0; v < width; ++v) {
        const int64_t entry = slots[e] * vec.table_width + v;
        const int64_t column = vec.gates[entry];
        TORCH_CHECK(column >= 0 && column < gates.columns, "steerserve: gate column ", column, " out of range");
        const float c = coef[e * width + v] * state[column];
        if (c == 0.0f) continue;
        const float* dir = vec.pool + vec.ids[entry] * d;
        for (int64_t j = 0; j < d; ++j) delta[j] += c * dir[j];
      }
      hidden_t* hr = hid + rows[e] * hidden.stride(0);
      for (int64_t j = 0; j < d; ++j) hr[j] = static_cast<hidden_t>(static_cast<float>(hr[j]) + delta[j]);
    }
  });
}

// Float32 encodes of a cache-resident encoder are a GEMV (a decode step's few rows) that BLAS
// serves badly: one row against a 1024 x 128 encoder took 15 us in addmm. The runtime packs
// such an encoder into panels [d_sae / 16, d_model, 16] (16 features' weights for each input
// dim, contiguous), so a tile of R rows x 16 features keeps its accumulators in vector
// registers and streams its panel sequentially.

// 16 floats as one value (GCC/Clang vector extension): the compiler keeps it in one AVX-512
// register, or two AVX2 / four SSE registers, so the tile's accumulators never hit memory.
typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// R rows x B panels of 16 features: R * B independent accumulator chains, so even one row
// (B = 8) keeps the FMA units busy instead of waiting on a single chain's latency.
template <int R, int B>
void encode_panels(const float* x, int64_t d, const float* panels, const float* b, int64_t d_sae,
                   int64_t block, float* pre) {
  f32x16 acc[R][B] = {};
  const float* panel = panels + block * d * 16;
  for (int64_t j = 0; j < d; ++j) {
    for (int q = 0; q < B; ++q) {
      const f32x16 w = load16(panel + (q * d + j) * 16);
      for (int r = 0; r < R; ++r) acc[r][q] += x[r * d + j] * w;
    }
  }
  for (int q = 0; q < B; ++q) {
    const f32x16 bias = load16(b + (block + q) * 16);
    for (int r = 0; r < R; ++r) {
      const f32x16 out = acc[r][q] + bias;
      std::memcpy(pre + r * d_sae + (block + q) * 16, &out, sizeof out);
    }
  }
}

template <int R>
void encode_row_tile(const float* x, int64_t d, const float* panels, const float* b, int64_t d_sae,
                     int64_t block_begin, int64_t block_end, float* pre) {
  constexpr int B = R >= 8 ? 1 : 8 / R;
  int64_t block = block_begin;
  for (; block + B <= block_end; block += B) encode_panels<R, B>(x, d, panels, b, d_sae, block, pre);
  for (; block < block_end; ++block) encode_panels<R, 1>(x, d, panels, b, d_sae, block, pre);
}

using TileFn = void (*)(const float*, int64_t, const float*, const float*, int64_t, int64_t, int64_t, float*);
constexpr TileFn kTiles[8] = {encode_row_tile<1>, encode_row_tile<2>, encode_row_tile<3>, encode_row_tile<4>,
                              encode_row_tile<5>, encode_row_tile<6>, encode_row_tile<7>, encode_row_tile<8>};

// pre [rows, d_sae] = x [rows, d] @ W_enc.T + b_enc, from the packed panels.
void tiled_float_encode(const float* x, int64_t rows, int64_t d, const at::Tensor& panels, const at::Tensor& b_enc,
                        float* pre) {
  const int64_t blocks = panels.size(0), d_sae = blocks * 16;
  const float* P = panels.data_ptr<float>();
  const float* b = b_enc.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(1, 16 * d * rows));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const int64_t r = std::min<int64_t>(8, rows - r0);
      kTiles[r - 1](x + r0 * d, d, P, b, d_sae, begin, end, pre + r0 * d_sae);
    }
  });
}

// Encode the routed rows, then hidden[row] = round(h + sum_f coef_f * W_dec[f]): the PyTorch
// path's arithmetic (h = hidden as float, x = h + residual [- b_dec], encoder in its dtype).
template <typename hidden_t>
void encode_and_edit(at::Tensor& hidden, const at::Tensor& residual, const int64_t* rows, const int64_t* slots,
                     int64_t n, int64_t width, const at::Tensor& feature_ids, const at::Tensor& coefficients,
                     const Gates& gates, const at::Tensor& W_enc, const c10::optional<at::Tensor>& panels, const at::Tensor& b_enc,
                     const c10::optional<at::Tensor>& b_dec_in, const at::Tensor& W_dec,
                     const c10::optional<at::Tensor>& threshold, int64_t k) {
  const int64_t d = hidden.size(1), d_sae = W_enc.size(0);
  TORCH_CHECK(residual.stride(1) == 1 && residual.size(1) == d, "steerserve: residual must be [rows, d_model]");
  hidden_t* hid = hidden.data_ptr<hidden_t>();
  const hidden_t* res = residual.data_ptr<hidden_t>();
  const float* b_dec = b_dec_in.has_value() ? b_dec_in->data_ptr<float>() : nullptr;
  auto float_opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor h = at::empty({n, d}, float_opts), x = at::empty({n, d}, float_opts);
  float* hp = h.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  for (int64_t e = 0; e < n; ++e) {
    const hidden_t* hr = hid + rows[e] * hidden.stride(0);
    const hidden_t* rr = res + rows[e] * residual.stride(0);
    for (int64_t j = 0; j < d; ++j) {
      const float v = static_cast<float>(hr[j]);
      hp[e * d + j] = v;
      const float s = v + static_cast<float>(rr[j]);
      xp[e * d + j] = b_dec != nullptr ? s - b_dec[j] : s;
    }
  }
  at::Tensor pre;
  if (panels.has_value()) {
    TORCH_CHECK(panels->is_contiguous() && panels->scalar_type() == at::kFloat && panels->size(0) * 16 == d_sae &&
                    panels->size(1) == d && b_enc.is_contiguous() && b_enc.scalar_type() == at::kFloat,
                "steerserve: encoder panels must be float32 [d_sae / 16, d_model, 16] with a float32 bias");
    pre = at::empty({n, d_sae}, float_opts);
    tiled_float_encode(xp, n, d, *panels, b_enc, pre.data_ptr<float>());
  } else {
    pre = at::addmm(b_enc, x.to(W_enc.scalar_type()), W_enc.t()).to(at::kFloat).contiguous();
  }
  at::Tensor delta = at::zeros({n, d}, float_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(), "steer_rows_decode", [&] {
    touched_feature_deltas<scalar_t>(pre, rows, slots, width, feature_ids, coefficients, gates, W_dec, threshold, k,
                                     delta);
  });
  if (width == 0) return;  // only gate probes here: the stream is unchanged
  const float* dp = delta.data_ptr<float>();
  for (int64_t e = 0; e < n; ++e) {  // rows are distinct: written back with one rounding
    hidden_t* hr = hid + rows[e] * hidden.stride(0);
    for (int64_t j = 0; j < d; ++j) hr[j] = static_cast<hidden_t>(hp[e * d + j] + dp[e * d + j]);
  }
}

void steer_rows(at::Tensor hidden, const at::Tensor& residual, const at::Tensor& routing,
                const at::Tensor& counts, const at::Tensor& add_table, const at::Tensor& feature_ids,
                const at::Tensor& coefficients, const at::Tensor& edit_gates, const at::Tensor& gate_ids,
                const at::Tensor& gate_bounds, at::Tensor gate_state, const at::Tensor& vector_pool,
                const at::Tensor& vector_ids, const at::Tensor& vector_rules, const at::Tensor& vector_gates,
                const at::Tensor& W_enc,
                const c10::optional<at::Tensor>& panels, const at::Tensor& b_enc,
                const c10::optional<at::Tensor>& b_dec_in, const at::Tensor& W_dec,
                const c10::optional<at::Tensor>& threshold, int64_t k) {
  const int64_t* live = counts.data_ptr<int64_t>();
  const int64_t num_steered = live[0], num_encoded = live[1], width = live[2], gate_width = live[3];
  const int64_t num_vectored = live[4], vector_width = live[5];
  if (num_steered == 0 && num_encoded == 0 && num_vectored == 0) return;
  TORCH_CHECK(hidden.dim() == 2 && hidden.stride(1) == 1, "steerserve: hidden must be [rows, d_model] with unit stride");
  TORCH_CHECK(routing.is_contiguous() && routing.size(0) == kRoutingRows && counts.numel() == kRoutingRows,
              "steerserve: bad routing buffer");
  TORCH_CHECK(add_table.is_contiguous() && feature_ids.is_contiguous() && coefficients.is_contiguous() &&
                  W_dec.is_contiguous() && add_table.scalar_type() == at::kFloat &&
                  coefficients.scalar_type() == at::kFloat && feature_ids.scalar_type() == at::kLong,
              "steerserve: steering tables must be contiguous (float32 add/coefficients, int64 ids)");
  const int64_t max_rows = routing.size(1), num_tokens = hidden.size(0);
  TORCH_CHECK(num_steered <= max_rows && num_encoded <= max_rows && width <= feature_ids.size(1) &&
                  gate_width <= gate_ids.size(1),
              "steerserve: routing counts exceed the buffers");
  TORCH_CHECK(edit_gates.is_contiguous() && gate_ids.is_contiguous() && gate_bounds.is_contiguous() &&
                  gate_state.is_contiguous() && edit_gates.sizes() == feature_ids.sizes() &&
                  gate_ids.sizes() == feature_ids.sizes() && gate_state.scalar_type() == at::kFloat &&
                  gate_bounds.scalar_type() == at::kFloat && gate_state.size(0) == max_rows &&
                  gate_state.size(1) == feature_ids.size(1) + 1,
              "steerserve: gate tables must be contiguous and match the feature table");
  const Gates gates{edit_gates.data_ptr<int64_t>(), gate_ids.data_ptr<int64_t>(), gate_bounds.data_ptr<float>(),
                    gate_state.data_ptr<float>(), gate_state.size(1), gate_width};
  TORCH_CHECK(vector_pool.is_contiguous() && vector_ids.is_contiguous() && vector_rules.is_contiguous() &&
                  vector_gates.is_contiguous() && vector_pool.scalar_type() == at::kFloat &&
                  vector_rules.scalar_type() == at::kFloat && vector_ids.scalar_type() == at::kLong &&
                  vector_gates.sizes() == vector_ids.sizes() && vector_pool.size(1) == hidden.size(1) &&
                  num_vectored <= max_rows && vector_width <= vector_ids.size(1),
              "steerserve: vector tables must be contiguous (float32 pool/rules, int64 ids) and match the stream");
  const Vectors vectors{vector_pool.data_ptr<float>(), vector_pool.size(0), vector_ids.data_ptr<int64_t>(),
                        vector_rules.data_ptr<float>(), vector_gates.data_ptr<int64_t>(), vector_ids.size(1),
                        vector_width};
  const int64_t* route = routing.data_ptr<int64_t>();

  std::vector<float> vector_coef;  // projections of the stream as it arrived, before any edit here
  if (num_vectored > 0) {
    check_rows(route + kVectorRows * max_rows, num_vectored, std::min(num_tokens, max_rows));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "steer_rows_project", [&] {
      vector_coef = vector_coefficients<scalar_t>(hidden, residual, route + kVectorRows * max_rows,
                                                  route + kVectorSlots * max_rows, num_vectored, vectors);
    });
  }
  if (num_encoded > 0) {  // every edit at a layer reads the stream as it arrived there
    const int64_t* rows = route + kEncodeRows * max_rows;
    check_rows(rows, num_encoded, std::min(num_tokens, max_rows));  // gate_state has max_rows rows
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "steer_rows_encode", [&] {
      encode_and_edit<scalar_t>(hidden, residual, rows, route + kEncodeSlots * max_rows, num_encoded, width,
                                feature_ids, coefficients, gates, W_enc, panels, b_enc, b_dec_in, W_dec, threshold, k);
    });
  }
  if (num_vectored > 0) {  // after the encoded edits, which wrote the gates probed here
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "steer_rows_vectors", [&] {
      apply_vectors<scalar_t>(hidden, route + kVectorRows * max_rows, route + kVectorSlots * max_rows, num_vectored,
                              vector_coef, vectors, gates);
    });
  }
  if (num_steered > 0) {
    const int64_t* rows_ptr = route + kSteerRows * max_rows;
    check_rows(rows_ptr, num_steered, num_tokens);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "steer_rows_add", [&] {
      add_rows<scalar_t>(hidden, rows_ptr, route + kSteerSlots * max_rows, num_steered, add_table);
    });
  }
}

}  // namespace

TORCH_LIBRARY(steerserve_cpu, m) {
  m.def(
      "steer_rows(Tensor(a!) hidden, Tensor residual, Tensor routing, Tensor counts, Tensor add_table, "
      "Tensor feature_ids, Tensor coefficients, Tensor edit_gates, Tensor gate_ids, Tensor gate_bounds, "
      "Tensor(b!) gate_state, Tensor vector_pool, Tensor vector_ids, Tensor vector_rules, Tensor vector_gates, "
      "Tensor W_enc, Tensor? encoder_panels, Tensor b_enc, Tensor? b_dec_in, Tensor W_dec, "
      "Tensor? threshold, int k) -> ()");
  m.impl("steer_rows", c10::DispatchKey::CPU, TORCH_FN(steer_rows));
}
