/* vg_openmp.h -- OpenMP is optional: answers 1 thread when built without it. */
#ifndef VG_OPENMP_H
#define VG_OPENMP_H
#ifdef _OPENMP
#include <omp.h>
static inline int vg_max_threads(void) { return omp_get_max_threads(); }
static inline int vg_num_procs(void) { return omp_get_num_procs(); }
static inline int vg_has_openmp(void) { return 1; }
#else
static inline int vg_max_threads(void) { return 1; }
static inline int vg_num_procs(void) { return 1; }
static inline int vg_has_openmp(void) { return 0; }
#endif
#endif
