/*
 * vg_gates_body.h -- one body for the float and double twins of vg_gates.h.
 *
 * Included twice by vg_gates.h with VG_T the scalar type and VG_SFX the name
 * suffix (the activation functions of the same suffix come from
 * vg_activations.h).  Do not include it directly.
 */

/* The pre-activation of gate column q of a row: (W_ih u + b_ih) + (W_hh h + b_hh), summed in the
   reference's order.  pre_x may be NULL (no inputs: W_ih u is absent). */
#define VG_GATE_PRE(q) \
    ((pre_x ? pre_x[q] + bias_ih[q] : bias_ih[q]) + (pre_h[q] + bias_hh[q]))

/* Forward of hidden unit j of one row: state_prev (N) -> state_out (N), cache (C) filled. */
VG_HOST_DEVICE static inline void VG_SFX(vg_cell_forward_unit)(
    int cell, int activation, long n, long j, const VG_T *pre_h, const VG_T *bias_hh, const VG_T *pre_x,
    const VG_T *bias_ih, const VG_T *state_prev, VG_T *state_out, VG_T *cache)
{
    VG_SFX(vg_pair) p;
    if (cell == VG_CELL_LSTM) {
        VG_T *gates = cache, *derivative = cache + 4 * n, *extra = cache + 8 * n;
        VG_SFX(vg_pair) i = VG_SFX(vg_activation)(VG_SIGMOID, VG_GATE_PRE(j));
        VG_SFX(vg_pair) f = VG_SFX(vg_activation)(VG_SIGMOID, VG_GATE_PRE(n + j));
        VG_SFX(vg_pair) g = VG_SFX(vg_activation)(VG_TANH, VG_GATE_PRE(2 * n + j));
        VG_SFX(vg_pair) o = VG_SFX(vg_activation)(VG_SIGMOID, VG_GATE_PRE(3 * n + j));
        VG_T c = f.value * state_prev[n + j] + i.value * g.value;
        VG_SFX(vg_pair) tc = VG_SFX(vg_activation)(VG_TANH, c);
        gates[j] = i.value;
        gates[n + j] = f.value;
        gates[2 * n + j] = g.value;
        gates[3 * n + j] = o.value;
        derivative[j] = i.derivative;
        derivative[n + j] = f.derivative;
        derivative[2 * n + j] = g.derivative;
        derivative[3 * n + j] = o.derivative;
        extra[j] = tc.value;
        extra[n + j] = tc.derivative;
        state_out[j] = o.value * tc.value;
        state_out[n + j] = c;
    } else if (cell == VG_CELL_GRU) {
        VG_T *gates = cache, *derivative = cache + 3 * n, *extra = cache + 6 * n;
        VG_SFX(vg_pair) r = VG_SFX(vg_activation)(VG_SIGMOID, VG_GATE_PRE(j));
        VG_SFX(vg_pair) z = VG_SFX(vg_activation)(VG_SIGMOID, VG_GATE_PRE(n + j));
        VG_T hidden_n = pre_h[2 * n + j] + bias_hh[2 * n + j];
        VG_T input_n = pre_x ? pre_x[2 * n + j] + bias_ih[2 * n + j] : bias_ih[2 * n + j];
        VG_SFX(vg_pair) cand = VG_SFX(vg_activation)(VG_TANH, input_n + r.value * hidden_n);
        gates[j] = r.value;
        gates[n + j] = z.value;
        gates[2 * n + j] = cand.value;
        derivative[j] = r.derivative;
        derivative[n + j] = z.derivative;
        derivative[2 * n + j] = cand.derivative;
        extra[j] = hidden_n;
        state_out[j] = ((VG_T)1 - z.value) * cand.value + z.value * state_prev[j];
    } else {
        p = VG_SFX(vg_activation)(activation, VG_GATE_PRE(j));
        cache[j] = p.value;
        cache[n + j] = p.derivative;
        state_out[j] = p.value;
    }
}

/* Backward of hidden unit j of one row: the cotangent g (N) at s_t -> g_hh (G n), the cotangent at
   W_hh h + b_hh, and the part of the cotangent at s_{t-1} (N) that does not pass through W_hh
   (lstm [0 | c part], gru g z, rnn 0); the caller adds g_hh W_hh to its h part.  g_prev may alias g,
   g_hh the cache's derivatives: each unit reads its own columns before writing them. */
VG_HOST_DEVICE static inline void VG_SFX(vg_cell_backward_unit)(
    int cell, long n, long j, const VG_T *g, const VG_T *cache, const VG_T *state_prev, VG_T *g_hh,
    VG_T *g_prev)
{
    if (cell == VG_CELL_LSTM) {
        const VG_T *gates = cache, *derivative = cache + 4 * n, *extra = cache + 8 * n;
        VG_T i = gates[j], f = gates[n + j], cand = gates[2 * n + j], o = gates[3 * n + j];
        VG_T di = derivative[j], df = derivative[n + j], dcand = derivative[2 * n + j];
        VG_T d_o = derivative[3 * n + j];
        VG_T g_h = g[j], g_c = g[n + j];
        VG_T g_c_total = g_c + g_h * o * extra[n + j];
        g_hh[j] = g_c_total * cand * di;
        g_hh[n + j] = g_c_total * state_prev[n + j] * df;
        g_hh[2 * n + j] = g_c_total * i * dcand;
        g_hh[3 * n + j] = g_h * extra[j] * d_o;
        g_prev[j] = (VG_T)0;
        g_prev[n + j] = g_c_total * f;
    } else if (cell == VG_CELL_GRU) {
        const VG_T *gates = cache, *derivative = cache + 3 * n, *extra = cache + 6 * n;
        VG_T r = gates[j], z = gates[n + j], cand = gates[2 * n + j];
        VG_T dr = derivative[j], dz = derivative[n + j], dcand = derivative[2 * n + j];
        VG_T g_h = g[j];
        VG_T g_a_n = g_h * ((VG_T)1 - z) * dcand;
        g_hh[j] = g_a_n * extra[j] * dr;
        g_hh[n + j] = g_h * (state_prev[j] - cand) * dz;
        g_hh[2 * n + j] = g_a_n * r;
        g_prev[j] = g_h * z;
    } else {
        VG_T g_h = g[j];
        g_hh[j] = g_h * cache[n + j];
        g_prev[j] = (VG_T)0;
    }
}

/* JVP of hidden unit j of one row: t_a (G n) = W_hh t_h (the tangent of W_hh h), t_prev (N) the
   tangent at s_{t-1} -> t_out (N) at s_t.  t_out may alias t_prev. */
VG_HOST_DEVICE static inline void VG_SFX(vg_cell_jvp_unit)(
    int cell, long n, long j, const VG_T *t_a, const VG_T *t_prev, const VG_T *cache,
    const VG_T *state_prev, VG_T *t_out)
{
    if (cell == VG_CELL_LSTM) {
        const VG_T *gates = cache, *derivative = cache + 4 * n, *extra = cache + 8 * n;
        VG_T i = gates[j], f = gates[n + j], cand = gates[2 * n + j], o = gates[3 * n + j];
        VG_T ti = derivative[j] * t_a[j];
        VG_T tf = derivative[n + j] * t_a[n + j];
        VG_T tcand = derivative[2 * n + j] * t_a[2 * n + j];
        VG_T to = derivative[3 * n + j] * t_a[3 * n + j];
        VG_T t_c = tf * state_prev[n + j] + f * t_prev[n + j] + ti * cand + i * tcand;
        t_out[j] = to * extra[j] + o * extra[n + j] * t_c;
        t_out[n + j] = t_c;
    } else if (cell == VG_CELL_GRU) {
        const VG_T *gates = cache, *derivative = cache + 3 * n, *extra = cache + 6 * n;
        VG_T r = gates[j], z = gates[n + j], cand = gates[2 * n + j];
        VG_T tr = derivative[j] * t_a[j];
        VG_T tz = derivative[n + j] * t_a[n + j];
        VG_T tcand = derivative[2 * n + j] * (tr * extra[j] + r * t_a[2 * n + j]);
        t_out[j] = (state_prev[j] - cand) * tz + ((VG_T)1 - z) * tcand + z * t_prev[j];
    } else {
        t_out[j] = cache[n + j] * t_a[j];
    }
}

#undef VG_GATE_PRE

#ifndef __CUDACC_RTC__ /* host-only: NVRTC (CuPy) compiles device code alone */
/*
 * The CPU kernels' loops over a block of rows, row-major and contiguous:
 * pre_h / pre_x / g_hh / t_a (rows, G n), states and vectors (rows, N), caches (rows, C).
 * Rows of vectors belong to sample r / per_sample (k vectors per sample).
 */
static inline void VG_SFX(vg_cell_forward_block)(int cell, int activation, long rows, long n,
                                                 const VG_T *pre_h, const VG_T *bias_hh,
                                                 const VG_T *pre_x, const VG_T *bias_ih,
                                                 const VG_T *state_prev, VG_T *state_out, VG_T *cache)
{
    long gn = vg_cell_gates(cell) * n, width = cell == VG_CELL_LSTM ? 2 * n : n;
    long columns = 2 * gn + vg_cell_extra(cell) * n, r, j;
    for (r = 0; r < rows; ++r) {
        const VG_T *xr = pre_x ? pre_x + r * gn : (const VG_T *)0;
        for (j = 0; j < n; ++j)
            VG_SFX(vg_cell_forward_unit)(cell, activation, n, j, pre_h + r * gn, bias_hh, xr, bias_ih,
                                         state_prev + r * width, state_out + r * width,
                                         cache + r * columns);
    }
}

/* g_hh rows are g_hh_stride apart: G n for a scratch block, or C with g_hh the derivative section of
   the cache itself (per_sample 1), which the profile keeps for the weight-gradient norms. */
static inline void VG_SFX(vg_cell_backward_block)(int cell, long rows, long n, long per_sample,
                                                  const VG_T *g, const VG_T *cache,
                                                  const VG_T *state_prev, VG_T *g_hh, long g_hh_stride,
                                                  VG_T *g_prev)
{
    long gn = vg_cell_gates(cell) * n, width = cell == VG_CELL_LSTM ? 2 * n : n;
    long columns = 2 * gn + vg_cell_extra(cell) * n, r, j, s;
    for (r = 0; r < rows; ++r) {
        s = r / per_sample;
        for (j = 0; j < n; ++j)
            VG_SFX(vg_cell_backward_unit)(cell, n, j, g + r * width, cache + s * columns,
                                          state_prev + s * width, g_hh + r * g_hh_stride,
                                          g_prev + r * width);
    }
}

static inline void VG_SFX(vg_cell_jvp_block)(int cell, long rows, long n, long per_sample,
                                             const VG_T *t_a, const VG_T *t_prev, const VG_T *cache,
                                             const VG_T *state_prev, VG_T *t_out)
{
    long gn = vg_cell_gates(cell) * n, width = cell == VG_CELL_LSTM ? 2 * n : n;
    long columns = 2 * gn + vg_cell_extra(cell) * n, r, j, s;
    for (r = 0; r < rows; ++r) {
        s = r / per_sample;
        for (j = 0; j < n; ++j)
            VG_SFX(vg_cell_jvp_unit)(cell, n, j, t_a + r * gn, t_prev + r * width, cache + s * columns,
                                     state_prev + s * width, t_out + r * width);
    }
}

/* Adds the count of |derivative| < VG_SATURATION_THRESHOLD of the block's gate units to *saturated
   and flags units (of G n) with a non-zero derivative in alive.  Branch-free. */
static inline void VG_SFX(vg_cell_count_saturated)(int cell, long rows, long n, const VG_T *cache,
                                                   long long *saturated, unsigned char *alive)
{
    long gn = vg_cell_gates(cell) * n, columns = 2 * gn + vg_cell_extra(cell) * n, r, q;
    long long count = 0;
    VG_T threshold = (VG_T)VG_SATURATION_THRESHOLD;
    for (r = 0; r < rows; ++r) {
        const VG_T *d = cache + r * columns + gn;
        for (q = 0; q < gn; ++q) {
            count += (d[q] < threshold) & (d[q] > -threshold);
            alive[q] |= (d[q] != (VG_T)0);
        }
    }
    *saturated += count;
}
#endif /* __CUDACC_RTC__ */
