// Block-sparse attention on the CPU: each (batch, head, query block) reads the key blocks it visits in place and
// runs a flash-style online softmax over them; partial blocks apply their boolean tile as a predicate. fp32.
// Built on first use by kernels/native.py (g++ -O3 -march=native); see that module for the layouts.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <type_traits>
#include <vector>

namespace {

constexpr int W = 16;  // floats per vector; a key block is LV vectors (BK = 16 LV keys)
typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));

inline vf ld(const float *p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float *p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }  // one broadcast (0 + x is not)

// exp(x) for x <= 0 (and -inf -> 0): 2^n * 2^f with f in [-0.5, 0.5], 2^f by its Taylor series to degree 7.
inline vf vexp(vf x) {
    vf y = x * 1.4426950408889634f;
    y = y < -127.0f ? splat(-127.0f) : y;
    vf n = (y + 12582912.0f) - 12582912.0f;
    vf f = (y - n) * 0.6931471805599453f;
    vf p = splat(1.0f / 5040.0f);
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    vi bits;
    std::memcpy(&bits, &p, sizeof bits);
    bits += __builtin_convertvector(n, vi) << 23;
    vf out;
    std::memcpy(&out, &bits, sizeof out);
    return x < -87.0f ? splat(0.0f) : out;
}

// Horizontal max of 16 lanes in 4 shuffle steps (a sequential chain of 15 would set the pace of the whole loop).
inline float hmax(vf v) {
    v = v > __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}) ? v
        : __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    vf x = __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v = v > x ? v : x;
    x = __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v = v > x ? v : x;
    x = __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    v = v > x ? v : x;
    return v[0];
}

inline float hsum(vf v) { float s = 0; for (int i = 0; i < W; ++i) s += v[i]; return s; }

// A row's running max moves only when a block's max passes it by more than this (natural log units): the
// probabilities then stay below e^RESCALE = 256, and most blocks skip rescaling the row.
constexpr float RESCALE = 5.545177444479562f;

struct Job {
    const float *q, *kt, *v;
    float *out, *lse;
    const int32_t *fc, *fi, *pc, *pi;
    const uint8_t *pm;
    int64_t B, Hq, Hkv, Nq, Nk, D, Dp, NKB, Bm, Hm, QB, BQ, maxF, maxP;
    int causal;
    float scale;
    std::atomic<int64_t> next{0};
};

// Per group g of 4 query rows: the key columns [lo[g], hi[g]) that hold every key its rows may see (lo = hi:
// none), from the union of the partial tile's rows (bool bytes, OR-ed 8 at a time) or, for a full block, [0, width).
template <int LV>
void column_ranges(const uint8_t *tile, int64_t rows, int64_t mp, int64_t width, int32_t *lo, int32_t *hi) {
    constexpr int BK = LV * W;
    for (int64_t g = 0; g < mp / 4; ++g) {
        int32_t a = 0, z = static_cast<int32_t>(width);
        if (tile) {
            uint64_t seen[BK / 8] = {};
            for (int64_t r = g * 4; r < std::min(rows, g * 4 + 4); ++r)
                for (int w = 0; w < BK / 8; ++w) {
                    uint64_t x; std::memcpy(&x, tile + r * BK + 8 * w, 8);
                    seen[w] |= x;
                }
            int first = 0, last = BK / 8 - 1;
            while (first < BK / 8 && !seen[first]) ++first;
            while (last > first && !seen[last]) --last;
            if (first == BK / 8) a = z = 0;
            else {
                a = 8 * first + __builtin_ctzll(seen[first]) / 8;
                z = std::min(z, 8 * last + (63 - __builtin_clzll(seen[last])) / 8 + 1);
            }
        }
        if (g * 4 >= rows || a >= z) a = z = 0;
        lo[g] = a;
        hi[g] = z;
    }
}

// One key block's probabilities for the 4-row group from row r0, in registers from the scores to P: S = Qs (rows
// r0..r0+3 x Dp) @ the block, transposed (Dp x BK), on its key vectors [j0, j0 + NJ) only; keys a row may not see
// (outside the tile, past the last key, above the causal diagonal, padding rows) masked to -inf; then the online
// softmax step: a row's max m moves (its mass l and accumulator rescaled) when the block's max passes it by more
// than RESCALE, and P = exp(S - m) is stored to p (0 for a row that sees none of the block).
template <int LV, int NJ>
void group_probabilities(const float *qs, const float *kt, const uint8_t *tile, float *p, float *acc, float *m,
                         float *l, int64_t r0, int j0, int64_t rows, int64_t dp, int64_t width,
                         int64_t diagonal_shift, bool diagonal, bool predicated) {
    constexpr int BK = LV * W;
    vf c[4][NJ] = {};
    for (int64_t d = 0; d < dp; ++d) {
        vf k[NJ];
        for (int j = 0; j < NJ; ++j) k[j] = ld(kt + d * BK + (j0 + j) * W);
        for (int i = 0; i < 4; ++i) {
            const vf qv = splat(qs[(r0 + i) * dp + d]);
            for (int j = 0; j < NJ; ++j) c[i][j] += qv * k[j];
        }
    }
    float block_max[4];
    for (int i = 0; i < 4; ++i) {
        const int64_t r = r0 + i;
        vf mx = splat(-INFINITY);
        for (int j = 0; j < NJ; ++j) {
            if (predicated) {
                const vi col = vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + (j0 + j) * W;
                vi ok = col < static_cast<int>(width);
                if (diagonal) ok &= col <= static_cast<int>(r - diagonal_shift);  // key k0 + col <= query q0 + r
                if (r >= rows) ok = vi{};
                else if (tile) {
                    vb t; std::memcpy(&t, tile + r * BK + (j0 + j) * W, sizeof t);
                    ok &= __builtin_convertvector(t, vi) != 0;
                }
                c[i][j] = ok ? c[i][j] : splat(-INFINITY);
            }
            mx = c[i][j] > mx ? c[i][j] : mx;
        }
        block_max[i] = hmax(mx);
    }
    for (int i = 0; i < 4; ++i) {
        const int64_t r = r0 + i;
        float *pr = p + r * BK + j0 * W;
        if (block_max[i] == -INFINITY) {
            for (int j = 0; j < NJ; ++j) st(pr + j * W, vf{});
            continue;
        }
        if (block_max[i] > m[r] + RESCALE) {  // also the first block a row sees (m = -inf)
            const float alpha = m[r] == -INFINITY ? 0.0f : std::exp(m[r] - block_max[i]);
            st(l + r * W, ld(l + r * W) * alpha);
            for (int64_t d = 0; d < dp; ++d) acc[r * dp + d] *= alpha;
            m[r] = block_max[i];
        }
        const vf shift = splat(m[r]);
        vf sum = ld(l + r * W);
        for (int j = 0; j < NJ; ++j) { const vf e = vexp(c[i][j] - shift); st(pr + j * W, e); sum += e; }
        st(l + r * W, sum);
    }
}

// The probabilities of one key block (Dp x BK, transposed) for every 4-row group, each over the key vectors that
// cover its column range [lo, hi).
template <int LV>
void probabilities(const float *qs, const float *kt, const uint8_t *tile, float *p, float *acc, float *m, float *l,
                   int64_t rows, int64_t mp, int64_t dp, int64_t width, int64_t diagonal_shift, bool diagonal,
                   const int32_t *lo, const int32_t *hi) {
    const bool predicated = tile || width < LV * W || diagonal || mp > rows;
    for (int64_t r0 = 0; r0 < mp; r0 += 4) {
        const int j0 = lo[r0 / 4] / W, nj = (hi[r0 / 4] + W - 1) / W - j0;
        auto run = [&](auto count) {
            group_probabilities<LV, decltype(count)::value>(qs, kt, tile, p, acc, m, l, r0, j0, rows, dp, width,
                                                            diagonal_shift, diagonal, predicated);
        };
        switch (nj) {
            case 1: run(std::integral_constant<int, 1>{}); break;
            case 2: if constexpr (LV >= 2) run(std::integral_constant<int, 2>{}); break;
            case 3: if constexpr (LV >= 3) run(std::integral_constant<int, 3>{}); break;
            case 4: if constexpr (LV >= 4) run(std::integral_constant<int, 4>{}); break;
            case 5: if constexpr (LV >= 5) run(std::integral_constant<int, 5>{}); break;
            case 6: if constexpr (LV >= 6) run(std::integral_constant<int, 6>{}); break;
            case 7: if constexpr (LV >= 7) run(std::integral_constant<int, 7>{}); break;
            case 8: if constexpr (LV >= 8) run(std::integral_constant<int, 8>{}); break;
            default: break;  // nj = 0: the group sees none of the block
        }
    }
}

// acc (Mp x DV*W) += P (Mp x BK) @ V (BK x DV*W) over each 4-row group's columns [lo, hi) (P is 0 elsewhere):
// R rows at a time, the accumulators in registers.
template <int DV>
void update(const float *p, const float *v, float *acc, int64_t mp, int64_t bk, const int32_t *lo,
            const int32_t *hi) {
    constexpr int R = DV <= 4 ? 4 : 2;
    constexpr int DP = DV * W;
    for (int64_t r0 = 0; r0 < mp; r0 += R) {
        const int64_t l0 = lo[r0 / 4], l1 = hi[r0 / 4];
        if (l0 >= l1) continue;
        vf c[R][DV];
        for (int i = 0; i < R; ++i)
            for (int j = 0; j < DV; ++j) c[i][j] = ld(acc + (r0 + i) * DP + j * W);
        for (int64_t l = l0; l < l1; ++l) {
            vf vv[DV];
            for (int j = 0; j < DV; ++j) vv[j] = ld(v + l * DP + j * W);
            for (int i = 0; i < R; ++i) {
                vf pv = splat(p[(r0 + i) * bk + l]);
                for (int j = 0; j < DV; ++j) c[i][j] += pv * vv[j];
            }
        }
        for (int i = 0; i < R; ++i)
            for (int j = 0; j < DV; ++j) st(acc + (r0 + i) * DP + j * W, c[i][j]);
    }
}

void update_any(const float *p, const float *v, float *acc, int64_t mp, int64_t bk, int64_t dv, const int32_t *lo,
                const int32_t *hi) {
    switch (dv) {
        case 1: update<1>(p, v, acc, mp, bk, lo, hi); break;
        case 2: update<2>(p, v, acc, mp, bk, lo, hi); break;
        case 3: update<3>(p, v, acc, mp, bk, lo, hi); break;
        case 4: update<4>(p, v, acc, mp, bk, lo, hi); break;
        case 5: update<5>(p, v, acc, mp, bk, lo, hi); break;
        case 6: update<6>(p, v, acc, mp, bk, lo, hi); break;
        case 7: update<7>(p, v, acc, mp, bk, lo, hi); break;
        default: update<8>(p, v, acc, mp, bk, lo, hi); break;
    }
}

template <int LV>
void run_task(Job &job, int64_t task, float *qs, float *s, float *acc, float *m, float *l, int32_t *lo,
              int32_t *hi) {
    constexpr int BK = LV * W;
    const int64_t qb = task % job.QB, h = task / job.QB % job.Hq, b = task / (job.QB * job.Hq);
    const int64_t hk = h / (job.Hq / job.Hkv), dp = job.Dp;
    const int64_t q0 = qb * job.BQ, rows = std::min(job.BQ, job.Nq - q0), mp = (rows + 3) / 4 * 4;
    const float *qsrc = job.q + ((b * job.Hq + h) * job.Nq + q0) * job.D;
    std::memset(qs, 0, sizeof(float) * mp * dp);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < job.D; ++d) qs[r * dp + d] = qsrc[r * job.D + d] * job.scale;
    std::memset(acc, 0, sizeof(float) * mp * dp);
    for (int64_t r = 0; r < mp; ++r) m[r] = -INFINITY;
    std::memset(l, 0, sizeof(float) * mp * W);  // a row's mass as 16 partial sums

    const int64_t mo = ((job.Bm > 1 ? b : 0) * job.Hm + (job.Hm > 1 ? h : 0)) * job.QB + qb;
    const int64_t nf = job.fc[mo], np = job.pc[mo];
    const float *kt_head = job.kt + (b * job.Hkv + hk) * job.NKB * dp * BK;
    const float *v_head = job.v + (b * job.Hkv + hk) * job.NKB * BK * dp;
    for (int64_t j = 0; j < nf + np; ++j) {
        const bool partial = j >= nf;
        const int64_t kb = partial ? job.pi[mo * job.maxP + j - nf] : job.fi[mo * job.maxF + j];
        const uint8_t *tile = partial ? job.pm + (mo * job.maxP + j - nf) * job.BQ * BK : nullptr;
        const int64_t k0 = kb * BK, width = std::min<int64_t>(BK, job.Nk - k0);
        column_ranges<LV>(tile, rows, mp, width, lo, hi);
        probabilities<LV>(qs, kt_head + kb * dp * BK, tile, s, acc, m, l, rows, mp, dp, width, k0 - q0,
                          job.causal && k0 + BK - 1 > q0, lo, hi);
        update_any(s, v_head + k0 * dp, acc, mp, BK, dp / W, lo, hi);
    }
    float *dst = job.out + ((b * job.Hq + h) * job.Nq + q0) * job.D;
    float *lse = job.lse + (b * job.Hq + h) * job.Nq + q0;
    for (int64_t r = 0; r < rows; ++r) {
        const float mass = hsum(ld(l + r * W)), inv = mass > 0 ? 1.0f / mass : 0.0f;
        for (int64_t d = 0; d < job.D; ++d) dst[r * job.D + d] = acc[r * dp + d] * inv;
        lse[r] = mass > 0 ? m[r] + std::log(mass) : -INFINITY;
    }
}

template <int LV>
void worker(Job &job) {
    const int64_t mp = (job.BQ + 3) / 4 * 4;
    auto buffer = [](int64_t n) { return static_cast<float *>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64)); };
    float *qs = buffer(mp * job.Dp), *s = buffer(mp * LV * W), *acc = buffer(mp * job.Dp), *m = buffer(mp),
          *l = buffer(mp * W);
    std::vector<int32_t> lo(mp / 4), hi(mp / 4);
    const int64_t tasks = job.B * job.Hq * job.QB;
    for (int64_t t; (t = job.next.fetch_add(1)) < tasks;) run_task<LV>(job, t, qs, s, acc, m, l, lo.data(), hi.data());
    for (float *p : {qs, s, acc, m, l}) std::free(p);
}

}  // namespace

extern "C" int mmattn_block_sparse_f32(
    const float *q, const float *kt, const float *v, float *out, float *lse, const int32_t *full_counts,
    const int32_t *full_indices, const int32_t *partial_counts, const int32_t *partial_indices,
    const uint8_t *partial_mask, const int64_t *sizes, int block_kv, int causal, float scale, int threads) {
    // sizes: B, Hq, Hkv, Nq, Nk, D, Dp, NKB, Bm, Hm, QB, BQ, maxF, maxP; block_kv in 16, 32, 64, 128
    Job job;
    job.q = q; job.kt = kt; job.v = v; job.out = out; job.lse = lse;
    job.fc = full_counts; job.fi = full_indices; job.pc = partial_counts; job.pi = partial_indices;
    job.pm = partial_mask;
    int64_t *fields[] = {&job.B, &job.Hq, &job.Hkv, &job.Nq, &job.Nk, &job.D, &job.Dp, &job.NKB, &job.Bm,
                         &job.Hm, &job.QB, &job.BQ, &job.maxF, &job.maxP};
    for (int i = 0; i < 14; ++i) *fields[i] = sizes[i];
    if (job.Dp % W || job.Dp > 8 * W || job.Dp < job.D) return 1;
    job.causal = causal; job.scale = scale;
    void (*work)(Job &) = block_kv == 16 ? worker<1> : block_kv == 32 ? worker<2> : block_kv == 64 ? worker<4>
                          : block_kv == 128 ? worker<8> : nullptr;
    if (!work) return 1;
    // OpenMP threads, the same pool as torch's (one libgomp per process): threads of our own would compete with
    // torch's, which spin a while after each of its parallel regions.
#pragma omp parallel num_threads(threads)
    work(job);
    return 0;
}
