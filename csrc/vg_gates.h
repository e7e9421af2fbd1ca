/*
 * vg_gates.h -- the math of vgcore's recurrent cells (rnn, lstm, gru), written once.
 *
 * Header-only, C99 and CUDA C++ alike, beside vg_activations.h whose
 * sigmoid / tanh / phi it uses: the CPU kernels (vgcore/_ext/_recurrent.pyx)
 * include it directly, the CuPy mirror through a kernel preamble.  The step
 * is torch's (docs/ARCHITECTURE.md, "Recurrent models"), gate blocks in torch's order:
 *
 *   rnn:  h' = phi(a),  a = W_ih u + b_ih + W_hh h + b_hh                      (G = 1)
 *   lstm: i, f, g, o = sig, sig, tanh, sig of a;  c' = f c + i g;  h' = o tanh(c')   (G = 4)
 *   gru:  r, z = sig of a's first two blocks;  n = tanh(x_n + r (W_hn h + b_hn));
 *         h' = (1 - z) n + z h                                                  (G = 3)
 *
 * Layouts, per sample (one row):
 *   state   N = n (rnn, gru) or 2 n (lstm: [h | c]);
 *   pre_h   G n: W_hh h without its bias (the kernels' GEMM writes it);
 *   pre_x   G n: W_ih u without its bias, or absent (NULL: no inputs);
 *   cache   C = 2 G n + E: [gates (G n) | derivatives (G n) | extra (E)], the gates'
 *           values after their nonlinearities and their derivatives with respect to
 *           their pre-activations (what saturation counts); extra: lstm [tanh c' |
 *           tanh'(c')] (E = 2 n), gru W_hn h + b_hn (E = n), rnn none.
 * The unit functions below compute column j of one row; the host block loops
 * run them over (rows, n).  The per-unit arithmetic follows the NumPy
 * reference (vgcore/reference/recurrent.py) operation for operation.
 */
#ifndef VG_GATES_H
#define VG_GATES_H

#include "vg_activations.h"

/* Cell codes; Python's twin is vgcore._recurrent.CELL_CODES. */
enum { VG_CELL_RNN = 0, VG_CELL_LSTM = 1, VG_CELL_GRU = 2 };

/* Gate blocks G and extra cache columns E per hidden unit. */
VG_HOST_DEVICE static inline int vg_cell_gates(int cell)
{
    return cell == VG_CELL_LSTM ? 4 : (cell == VG_CELL_GRU ? 3 : 1);
}

VG_HOST_DEVICE static inline int vg_cell_extra(int cell)
{
    return cell == VG_CELL_LSTM ? 2 : (cell == VG_CELL_GRU ? 1 : 0);
}

/* ---- double twin ------------------------------------------------------ */
#define VG_T double
#define VG_SFX(name) name##_d
#include "vg_gates_body.h"
#undef VG_T
#undef VG_SFX

/* ---- float twin ------------------------------------------------------- */
#define VG_T float
#define VG_SFX(name) name##_f
#include "vg_gates_body.h"
#undef VG_T
#undef VG_SFX

#endif /* VG_GATES_H */
