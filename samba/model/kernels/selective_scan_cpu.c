/*
 * Selective scan of Mamba-1 for CPU tensors: forward and backward, fused.
 *
 * For channel d and state index n the scan runs
 *
 *     h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
 *     y_t = C_t . h_t + D * u_t
 *
 * Each work item is one sequence b and a block of `block` consecutive channels, so the
 * state of the block stays in the L1 cache. No (batch, length, d_inner, d_state) tensor
 * is built unless the caller requests every state. The backward pass rebuilds
 * the states of one chunk of positions at a time from the chunk-start states that the
 * forward pass saved (`checkpoints`), then walks the chunk backwards.
 *
 * Work items write disjoint outputs, and every reduction over channels goes through a
 * per-block buffer that the caller sums, so the results do not depend on the number of
 * threads. REAL is float or double, set on the compiler command line.
 *
 * Layouts (row-major, contiguous):
 *     u, delta, y, grad_y, grad_u, grad_delta   (batch, length, d_inner)
 *     A, grad_A_part[b]                          (d_inner, d_state)
 *     B, C                                       (batch, length, d_state)
 *     D                                          (d_inner)
 *     h0, last_state, grad_last, grad_h0         (batch, d_inner, d_state)
 *     states, grad_states                        (batch, length, d_inner, d_state)
 *     checkpoints                                (batch, n_chunks, d_inner, d_state)
 *     grad_B_part, grad_C_part                   (n_blocks, batch, length, d_state)
 *     grad_D_part                                (batch, d_inner)
 */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef REAL
#error "compile with -DREAL=float or -DREAL=double"
#endif

typedef REAL real;

/* exp(x) for float, inline so that the compiler vectorises the loops that call it.
 * x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts, Cody and Waite), then
 * exp(x) = 2^k exp(r) with the degree-7 Taylor polynomial of exp(r), whose truncation
 * error (|r|^8 / 8! < 6e-9) is below float's rounding error. Results under exp(-87) are
 * clamped to about 1.6e-38 instead of going subnormal or to zero. */
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float k = rintf(x * 1.44269504088896341f);
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.0f / 5040.0f + r * (1.0f / 40320.0f);
    p = 1.0f / 720.0f + r * p;
    p = 1.0f / 120.0f + r * p;
    p = 1.0f / 24.0f + r * p;
    p = 1.0f / 6.0f + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* exp in the precision of real: fast_expf for float, the C library's exp for double. */
#define EXP(x) _Generic((x), float: fast_expf, default: exp)(x)

typedef struct {
    int64_t batch, length, d_inner, d_state, block, chunk;
    const real *u, *delta, *A, *B, *C, *D, *h0;
    real *y, *last_state, *states, *checkpoints;
    /* Backward only. */
    const real *grad_y, *grad_states, *grad_last;
    real *grad_u, *grad_delta, *grad_A_part, *grad_B_part, *grad_C_part, *grad_D_part, *grad_h0;
} ScanArgs;

typedef struct {
    const ScanArgs *args;
    int64_t *next_item; /* shared by all workers of a call */
    int failed;
    void (*run_item)(const ScanArgs *, int64_t, real *);
} Worker;

static int64_t n_blocks_of(const ScanArgs *a) { return (a->d_inner + a->block - 1) / a->block; }

static int64_t n_chunks_of(const ScanArgs *a) { return (a->length + a->chunk - 1) / a->chunk; }

/* A work item runs its block in sub-blocks of SUB_BLOCK channels, one after the other, so that
 * the chunk of states that the backward pass rebuilds stays in the L1 cache. */
#define SUB_BLOCK 8

/* Scratch for the backward pass of one sub-block: chunk + 1 states and chunk decays, and a
 * row of zeros that replaces grad_states when the caller has none. */
static int64_t scratch_size(const ScanArgs *a) { return (2 * a->chunk + 1) * SUB_BLOCK * a->d_state + a->d_state; }

/* The forward pass of sequence b, channels d0 .. d1-1. N is the state size, a compile-time
 * constant in the specialised copies below. */
static inline __attribute__((always_inline)) void forward_range(const ScanArgs *a, int64_t b, int64_t d0, int64_t d1,
                                                               const int64_t N) {
    const int64_t L = a->length, DI = a->d_inner;
    real *h = a->last_state + (b * DI + d0) * N; /* The running state lives in last_state. */

    if (a->h0) memcpy(h, a->h0 + (b * DI + d0) * N, (size_t)((d1 - d0) * N) * sizeof(real));
    else memset(h, 0, (size_t)((d1 - d0) * N) * sizeof(real));

    for (int64_t t = 0; t < L; t++) {
        if (a->checkpoints && t % a->chunk == 0) {
            real *saved = a->checkpoints + ((b * n_chunks_of(a) + t / a->chunk) * DI + d0) * N;
            memcpy(saved, h, (size_t)((d1 - d0) * N) * sizeof(real));
        }
        const int64_t row = (b * L + t) * DI;
        const real *restrict Bt = a->B + (b * L + t) * N;
        const real *restrict Ct = a->C + (b * L + t) * N;
        for (int64_t d = d0; d < d1; d++) {
            const real dt = a->delta[row + d], ut = a->u[row + d], dtu = dt * ut;
            const real *restrict Ad = a->A + d * N;
            real *restrict hd = h + (d - d0) * N;
            real acc = 0;
            for (int64_t n = 0; n < N; n++) {
                hd[n] = EXP(dt * Ad[n]) * hd[n] + dtu * Bt[n];
                acc += Ct[n] * hd[n];
            }
            a->y[row + d] = acc + a->D[d] * ut;
            if (a->states) memcpy(a->states + (row + d) * N, hd, (size_t)N * sizeof(real));
        }
    }
}

/* Rebuild the states h_{t0-1} .. h_{t1-1} and the decays of positions t0 .. t1-1 into scratch. */
static inline __attribute__((always_inline)) void rebuild_chunk(const ScanArgs *a, int64_t b, int64_t d0, int64_t d1,
                                                               int64_t t0, int64_t t1, real *hs, real *decays,
                                                               const int64_t N) {
    const int64_t L = a->length, DI = a->d_inner, width = (d1 - d0) * N;
    const real *start = a->checkpoints + ((b * n_chunks_of(a) + t0 / a->chunk) * DI + d0) * N;
    memcpy(hs, start, (size_t)width * sizeof(real));
    for (int64_t t = t0; t < t1; t++) {
        const int64_t row = (b * L + t) * DI;
        const real *restrict Bt = a->B + (b * L + t) * N;
        const real *restrict prev = hs + (t - t0) * width;
        real *restrict next = hs + (t - t0 + 1) * width;
        real *restrict decay = decays + (t - t0) * width;
        for (int64_t d = d0; d < d1; d++) {
            const real dt = a->delta[row + d], dtu = dt * a->u[row + d];
            const real *restrict Ad = a->A + d * N;
            const int64_t off = (d - d0) * N;
            for (int64_t n = 0; n < N; n++) {
                decay[off + n] = EXP(dt * Ad[n]);
                next[off + n] = decay[off + n] * prev[off + n] + dtu * Bt[n];
            }
        }
    }
}

/* One position and channel of the backward pass, over the state index n. On entry gh is
 * dLoss/dh_t through later positions only; on return it is dLoss/dh_{t-1} through them. */
static inline __attribute__((always_inline)) void backward_step(const int64_t N, real gy, real dt, real ut, const real *restrict Ad,
                                 const real *restrict Bt, const real *restrict Ct, const real *restrict gs,
                                 const real *restrict prev, const real *restrict cur, const real *restrict decay,
                                 real *restrict gh, real *restrict gA, real *restrict gBt, real *restrict gCt,
                                 real *sum_delta, real *sum_u) {
    real s_delta = 0, s_u = 0;
    for (int64_t n = 0; n < N; n++) {
        /* g is dLoss/dh_t: the path through later states, y_t and the states output. */
        const real g = gh[n] + Ct[n] * gy + gs[n];
        const real g_log_decay = g * prev[n] * decay[n]; /* dLoss/d(delta_t A) */
        gCt[n] += gy * cur[n];
        gBt[n] += g * dt * ut;
        gA[n] += g_log_decay * dt;
        s_delta += g_log_decay * Ad[n] + g * ut * Bt[n];
        s_u += g * Bt[n];
        gh[n] = g * decay[n];
    }
    *sum_delta = s_delta;
    *sum_u = s_u;
}

/* The backward pass of sequence b, channels d0 .. d1-1 of block block_index. The sums over
 * channels of the gradients of B and C are stored (first sub-block) or added to the block's rows. */
static inline __attribute__((always_inline)) void backward_range(const ScanArgs *a, int64_t b, int64_t block_index,
                                                                int64_t d0, int64_t d1, int first, real *scratch,
                                                                const int64_t N) {
    const int64_t L = a->length, DI = a->d_inner;
    const int64_t width = (d1 - d0) * N;
    real *hs = scratch;                                   /* (chunk + 1, width) */
    real *decays = scratch + (a->chunk + 1) * SUB_BLOCK * N; /* (chunk, width) */
    real *zeros = decays + a->chunk * SUB_BLOCK * N;         /* (N,) */
    real *restrict gh = a->grad_h0 + (b * DI + d0) * N;  /* dLoss/dh of the next position back */
    real *restrict gA = a->grad_A_part + (b * DI + d0) * N;
    real *restrict gD = a->grad_D_part + b * DI;
    real *gB_rows = a->grad_B_part + (block_index * a->batch + b) * L * N;
    real *gC_rows = a->grad_C_part + (block_index * a->batch + b) * L * N;

    if (a->grad_last) memcpy(gh, a->grad_last + (b * DI + d0) * N, (size_t)width * sizeof(real));
    else memset(gh, 0, (size_t)width * sizeof(real));
    memset(gA, 0, (size_t)width * sizeof(real));
    for (int64_t d = d0; d < d1; d++) gD[d] = 0;
    for (int64_t n = 0; n < N; n++) zeros[n] = 0;

    for (int64_t c = n_chunks_of(a) - 1; c >= 0; c--) {
        const int64_t t0 = c * a->chunk, t1 = t0 + a->chunk < L ? t0 + a->chunk : L;
        rebuild_chunk(a, b, d0, d1, t0, t1, hs, decays, N);
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const int64_t row = (b * L + t) * DI;
            const real *restrict Bt = a->B + (b * L + t) * N;
            const real *restrict Ct = a->C + (b * L + t) * N;
            const real *restrict prev = hs + (t - t0) * width;
            const real *restrict cur = hs + (t - t0 + 1) * width;
            const real *restrict decay = decays + (t - t0) * width;
            /* Sums over the block's channels, kept local so that they can live in registers. */
            real gBt[N], gCt[N];
            for (int64_t n = 0; n < N; n++) gBt[n] = gCt[n] = 0;
            for (int64_t d = d0; d < d1; d++) {
                const real gy = a->grad_y[row + d], dt = a->delta[row + d], ut = a->u[row + d];
                const real *restrict Ad = a->A + d * N;
                const real *restrict gs = a->grad_states ? a->grad_states + (row + d) * N : zeros;
                const int64_t off = (d - d0) * N;
                real sum_delta = 0, sum_u = 0;
                backward_step(N, gy, dt, ut, Ad, Bt, Ct, gs, prev + off, cur + off, decay + off, gh + off, gA + off,
                              gBt, gCt, &sum_delta, &sum_u);
                a->grad_delta[row + d] = sum_delta;
                a->grad_u[row + d] = sum_u * dt + a->D[d] * gy;
                gD[d] += gy * ut;
            }
            real *restrict gB_row = gB_rows + t * N, *restrict gC_row = gC_rows + t * N;
            for (int64_t n = 0; n < N; n++) {
                gB_row[n] = first ? gBt[n] : gB_row[n] + gBt[n];
                gC_row[n] = first ? gCt[n] : gC_row[n] + gCt[n];
            }
        }
    }
}

/* One work item: sequence b = item / n_blocks and one block of channels, sub-block by sub-block. */
static inline __attribute__((always_inline)) void forward_impl(const ScanArgs *a, int64_t item, const int64_t N) {
    const int64_t b = item / n_blocks_of(a), d0 = (item % n_blocks_of(a)) * a->block;
    const int64_t d1 = d0 + a->block < a->d_inner ? d0 + a->block : a->d_inner;
    for (int64_t start = d0; start < d1; start += SUB_BLOCK)
        forward_range(a, b, start, start + SUB_BLOCK < d1 ? start + SUB_BLOCK : d1, N);
}

static inline __attribute__((always_inline)) void backward_impl(const ScanArgs *a, int64_t item, real *scratch,
                                                               const int64_t N) {
    const int64_t b = item / n_blocks_of(a), block_index = item % n_blocks_of(a), d0 = block_index * a->block;
    const int64_t d1 = d0 + a->block < a->d_inner ? d0 + a->block : a->d_inner;
    for (int64_t start = d0; start < d1; start += SUB_BLOCK)
        backward_range(a, b, block_index, start, start + SUB_BLOCK < d1 ? start + SUB_BLOCK : d1, start == d0,
                       scratch, N);
}

/* Copies of the item functions for any state size and for the common d_state = 16. */
static void forward_item_any(const ScanArgs *a, int64_t item, real *scratch) {
    (void)scratch;
    forward_impl(a, item, a->d_state);
}

static void forward_item_16(const ScanArgs *a, int64_t item, real *scratch) {
    (void)scratch;
    forward_impl(a, item, 16);
}

static void backward_item_any(const ScanArgs *a, int64_t item, real *scratch) {
    backward_impl(a, item, scratch, a->d_state);
}

static void backward_item_16(const ScanArgs *a, int64_t item, real *scratch) { backward_impl(a, item, scratch, 16); }

static void *run_worker(void *arg) {
    Worker *w = (Worker *)arg;
    const ScanArgs *a = w->args;
    const int64_t n_items = a->batch * n_blocks_of(a);
    real *scratch = NULL;
    if (a->grad_y) {
        scratch = (real *)malloc((size_t)scratch_size(a) * sizeof(real));
        if (!scratch) {
            w->failed = 1;
            return NULL;
        }
    }
    /* Each worker takes the next free item, so a thread that the OS deschedules holds up no
     * fixed share of the work. Items write disjoint outputs, so the results do not depend
     * on which thread runs which item. */
    for (int64_t item = __atomic_fetch_add(w->next_item, 1, __ATOMIC_RELAXED); item < n_items;
         item = __atomic_fetch_add(w->next_item, 1, __ATOMIC_RELAXED))
        w->run_item(a, item, scratch);
    free(scratch);
    return NULL;
}

/* Run every work item on n_threads threads, the calling thread included. Returns 0, or -1 on failure. */
static int run_items(const ScanArgs *a, void (*run_item)(const ScanArgs *, int64_t, real *), int n_threads) {
    const int64_t n_items = a->batch * n_blocks_of(a);
    if (n_items == 0) return 0;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > n_items) n_threads = (int)n_items;
    Worker *workers = (Worker *)calloc((size_t)n_threads, sizeof(Worker));
    pthread_t *threads = (pthread_t *)calloc((size_t)n_threads, sizeof(pthread_t));
    char *started = (char *)calloc((size_t)n_threads, 1);
    int64_t next_item = 0;
    int status = 0;
    if (!workers || !threads || !started) status = -1;
    for (int i = 0; status == 0 && i < n_threads; i++) {
        workers[i] = (Worker){a, &next_item, 0, run_item};
        if (i > 0) started[i] = pthread_create(&threads[i], NULL, run_worker, &workers[i]) == 0;
    }
    if (status == 0) {
        /* The calling thread works too, and finishes the items of any thread that did not start. */
        run_worker(&workers[0]);
        for (int i = 1; i < n_threads; i++)
            if (started[i]) pthread_join(threads[i], NULL);
        for (int i = 0; i < n_threads; i++) status |= workers[i].failed ? -1 : 0;
    }
    free(workers);
    free(threads);
    free(started);
    return status;
}

int scan_forward(int64_t batch, int64_t length, int64_t d_inner, int64_t d_state, int64_t block, int64_t chunk,
                 const real *u, const real *delta, const real *A, const real *B, const real *C, const real *D,
                 const real *h0, real *y, real *last_state, real *states, real *checkpoints, int n_threads) {
    ScanArgs a = {batch, length, d_inner, d_state, block, chunk, u, delta, A, B, C, D, h0,
                  y, last_state, states, checkpoints};
    return run_items(&a, d_state == 16 ? forward_item_16 : forward_item_any, n_threads);
}

int scan_backward(int64_t batch, int64_t length, int64_t d_inner, int64_t d_state, int64_t block, int64_t chunk,
                  const real *u, const real *delta, const real *A, const real *B, const real *C, const real *D,
                  const real *checkpoints, const real *grad_y, const real *grad_states, const real *grad_last,
                  real *grad_u, real *grad_delta, real *grad_A_part, real *grad_B_part, real *grad_C_part,
                  real *grad_D_part, real *grad_h0, int n_threads) {
    ScanArgs a = {batch, length, d_inner, d_state, block, chunk, u, delta, A, B, C, D, NULL,
                  NULL, NULL, NULL, (real *)checkpoints,
                  grad_y, grad_states, grad_last, grad_u, grad_delta, grad_A_part, grad_B_part, grad_C_part,
                  grad_D_part, grad_h0};
    return run_items(&a, d_state == 16 ? backward_item_16 : backward_item_any, n_threads);
}
