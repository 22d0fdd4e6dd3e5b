// Block-sparse attention on the CPU: each (batch, head, query block) reads the key blocks it visits in place and
// runs a flash-style online softmax over them; partial blocks apply their boolean tile as a predicate. fp32.
// Built on first use by kernels/native.py (g++ -O3 -march=native); see that module for the layouts.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <thread>
#include <vector>

namespace {

constexpr int W = 16;  // floats per vector; a key block is LV vectors (BK = 16 LV keys)
typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));

inline vf ld(const float *p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float *p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }

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

inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m; return m; }
inline float hsum(vf v) { float s = 0; for (int i = 0; i < W; ++i) s += v[i]; return s; }

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

// S (Mp x BK) = Qs (Mp x Dp) @ one key block, transposed (Dp x BK); Mp a multiple of 4.
template <int LV>
void scores(const float *qs, const float *kt, float *s, int64_t mp, int64_t dp) {
    for (int64_t r0 = 0; r0 < mp; r0 += 4) {
        constexpr int BK = LV * W;
        vf c[4][LV] = {};
        for (int64_t d = 0; d < dp; ++d) {
            vf k[LV];
            for (int j = 0; j < LV; ++j) k[j] = ld(kt + d * BK + j * W);
            for (int i = 0; i < 4; ++i) {
                vf qv = splat(qs[(r0 + i) * dp + d]);
                for (int j = 0; j < LV; ++j) c[i][j] += qv * k[j];
            }
        }
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < LV; ++j) st(s + (r0 + i) * BK + j * W, c[i][j]);
    }
}

// acc (Mp x DV*W) += P (Mp x BK) @ V (BK x DV*W): R rows at a time, the accumulators in registers.
template <int DV>
void update(const float *p, const float *v, float *acc, int64_t mp, int64_t bk) {
    constexpr int R = DV <= 4 ? 4 : 2;
    constexpr int DP = DV * W;
    for (int64_t r0 = 0; r0 < mp; r0 += R) {
        vf c[R][DV];
        for (int i = 0; i < R; ++i)
            for (int j = 0; j < DV; ++j) c[i][j] = ld(acc + (r0 + i) * DP + j * W);
        for (int64_t l = 0; l < bk; ++l) {
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

void update_any(const float *p, const float *v, float *acc, int64_t mp, int64_t bk, int64_t dv) {
    switch (dv) {
        case 1: update<1>(p, v, acc, mp, bk); break;
        case 2: update<2>(p, v, acc, mp, bk); break;
        case 3: update<3>(p, v, acc, mp, bk); break;
        case 4: update<4>(p, v, acc, mp, bk); break;
        case 5: update<5>(p, v, acc, mp, bk); break;
        case 6: update<6>(p, v, acc, mp, bk); break;
        case 7: update<7>(p, v, acc, mp, bk); break;
        default: update<8>(p, v, acc, mp, bk); break;
    }
}

template <int LV>
void run_task(Job &job, int64_t task, float *qs, float *s, float *acc, float *m, float *l) {
    constexpr int BK = LV * W;
    const int64_t qb = task % job.QB, h = task / job.QB % job.Hq, b = task / (job.QB * job.Hq);
    const int64_t hk = h / (job.Hq / job.Hkv), dp = job.Dp;
    const int64_t q0 = qb * job.BQ, rows = std::min(job.BQ, job.Nq - q0), mp = (rows + 3) / 4 * 4;
    const float *qsrc = job.q + ((b * job.Hq + h) * job.Nq + q0) * job.D;
    std::memset(qs, 0, sizeof(float) * mp * dp);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < job.D; ++d) qs[r * dp + d] = qsrc[r * job.D + d] * job.scale;
    std::memset(acc, 0, sizeof(float) * mp * dp);
    for (int64_t r = 0; r < mp; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }

    const int64_t mo = ((job.Bm > 1 ? b : 0) * job.Hm + (job.Hm > 1 ? h : 0)) * job.QB + qb;
    const int64_t nf = job.fc[mo], np = job.pc[mo];
    const float *kt_head = job.kt + (b * job.Hkv + hk) * job.NKB * dp * BK;
    const float *v_head = job.v + (b * job.Hkv + hk) * job.NKB * BK * dp;
    for (int64_t j = 0; j < nf + np; ++j) {
        const bool partial = j >= nf;
        const int64_t kb = partial ? job.pi[mo * job.maxP + j - nf] : job.fi[mo * job.maxF + j];
        const uint8_t *tile = partial ? job.pm + (mo * job.maxP + j - nf) * job.BQ * BK : nullptr;
        const int64_t k0 = kb * BK, width = std::min<int64_t>(BK, job.Nk - k0);
        scores<LV>(qs, kt_head + kb * dp * BK, s, mp, dp);
        const bool diagonal = job.causal && k0 + BK - 1 > q0;
        for (int64_t r = 0; r < rows; ++r) {
            float *sr = s + r * BK;
            if (tile || width < BK || diagonal) {
                for (int64_t c = 0; c < BK; ++c) {
                    const bool seen = c < width && (!tile || tile[r * BK + c]) && (!diagonal || k0 + c <= q0 + r);
                    sr[c] = seen ? sr[c] : -INFINITY;
                }
            }
            vf mx = ld(sr);
            for (int i = 1; i < LV; ++i) { vf x = ld(sr + i * W); mx = x > mx ? x : mx; }
            const float m_new = std::max(m[r], hmax(mx));
            if (m_new == -INFINITY) { std::memset(sr, 0, sizeof(float) * BK); continue; }
            vf sum = {};
            for (int i = 0; i < LV; ++i) { vf e = vexp(ld(sr + i * W) - m_new); st(sr + i * W, e); sum += e; }
            if (m_new != m[r]) {
                const float alpha = m[r] == -INFINITY ? 0.0f : std::exp(m[r] - m_new);
                l[r] *= alpha;
                for (int64_t d = 0; d < dp; ++d) acc[r * dp + d] *= alpha;
                m[r] = m_new;
            }
            l[r] += hsum(sum);
        }
        for (int64_t r = rows; r < mp; ++r) std::memset(s + r * BK, 0, sizeof(float) * BK);
        update_any(s, v_head + k0 * dp, acc, mp, BK, dp / W);
    }
    float *dst = job.out + ((b * job.Hq + h) * job.Nq + q0) * job.D;
    float *lse = job.lse + (b * job.Hq + h) * job.Nq + q0;
    for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < job.D; ++d) dst[r * job.D + d] = acc[r * dp + d] * inv;
        lse[r] = l[r] > 0 ? m[r] + std::log(l[r]) : -INFINITY;
    }
}

template <int LV>
void worker(Job &job) {
    const int64_t mp = (job.BQ + 3) / 4 * 4;
    auto buffer = [](int64_t n) { return static_cast<float *>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64)); };
    float *qs = buffer(mp * job.Dp), *s = buffer(mp * LV * W), *acc = buffer(mp * job.Dp), *m = buffer(mp),
          *l = buffer(mp);
    const int64_t tasks = job.B * job.Hq * job.QB;
    for (int64_t t; (t = job.next.fetch_add(1)) < tasks;) run_task<LV>(job, t, qs, s, acc, m, l);
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
    std::vector<std::thread> pool;
    void (*work)(Job &) = block_kv == 16 ? worker<1> : block_kv == 32 ? worker<2> : block_kv == 64 ? worker<4>
                          : block_kv == 128 ? worker<8> : nullptr;
    if (!work) return 1;
    for (int i = 1; i < threads; ++i) pool.emplace_back(work, std::ref(job));
    work(job);
    for (auto &t : pool) t.join();
    return 0;
}
