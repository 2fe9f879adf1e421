"""FlashAttention-2 style attention in Triton: forward with online softmax, backward recomputing from the LSE.

Shapes: q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H a multiple of Hkv (GQA/MQA: query head h reads
K/V head h // (H / Hkv), the grouping `enable_gqa` uses) and Tq <= Tk when causal. Causal attention is
bottom-right aligned (query i sits at key position Tk - Tq + i), which for Tq == Tk is plain causal.
`window` > 0 additionally limits a query to its `window` most recent keys (itself included).

Forward (one program per BLOCK_M queries of one (batch, head)): stream K/V blocks through SRAM, keep the
running row max m, row sum l and output accumulator in fp32 registers (online softmax, Milakov &
Gimelshein 2018), never forming the (Tq, Tk) matrix. It saves O and LSE = m + log2(l) (base 2, see
below) per query. Key blocks outside the causal/window band are never visited; blocks wholly inside
it run without any masking code, only the one or two boundary blocks pay for the mask.

Backward (Dao 2023, FlashAttention-2): a preprocessing pass computes delta_i = sum_d dO_i * O_i, then
  dK/dV: one program per BLOCK_N keys of one KV head, looping over the query blocks that see them and
         over the H / Hkv query heads of the group, so dK/dV of a shared KV head are summed in registers
         (no atomics and no repeated K/V in memory);
  dQ:    one program per BLOCK_M queries, looping over the key band.
Both recompute P = exp2(S * log2(e) * scale - LSE) and use dS = P * (dP - delta), dP = dO V^T.

Scores are kept in log2 units (scale * log2(e) folded into one multiply) so the kernels use exp2, which
is what the hardware provides; LSE is stored in those units too. `flash_attention` returns only O; the
tests read the natural-log LSE through `flash_attention_forward`.

All arithmetic accumulates in fp32; bf16/fp16 inputs feed the tensor cores directly and P / dS are cast
to the input dtype for their matmuls, as in the reference FlashAttention kernels. Block sizes, warps
and pipeline stages are chosen per (kernel, D, causal, windowed, group, dtype, power-of-two buckets of
Tq and Tk) from a few curated candidates and cached on disk per GPU model (`autotune.py`); the kernels
do not specialise on the lengths, so a new length in a known bucket costs neither tuning nor a compile.
Under the interpreter a single small configuration is used (the interpreter cannot benchmark).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import triton
import triton.language as tl

from llm_dist.kernels.autotune import Config, Tuner, seq_bucket, tune_key


INTERPRETED = bool(triton.knobs.runtime.interpret)  # fixed when this module's kernels were decorated
HEAD_DIMS = (16, 32, 64, 128)  # powers of two: tl.arange needs them, and tl.dot needs >= 16
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------- launch configs

def _smem_limit() -> int:
    """Shared memory per block (opt-in) of the current GPU, bytes; 99 KiB when unknown (consumer Ampere)."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "shared_memory_per_block_optin", 101376))
    return 101376


def _arch() -> str:
    """'sm90' on Hopper and newer, else 'sm80' (Ampere; also the guess for anything older or unknown)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return "sm90"
    return "sm80"


def _grid(blocks: list[tuple[int, int]], warps: tuple[int, ...], stages: tuple[int, ...]) -> list[Config]:
    return [Config(m, n, w, s) for m, n in blocks for w in warps for s in stages]


_INTERPRETER_CONFIG = Config(32, 16, 4, 1)  # several blocks per sequence even at test shapes
_SAFE_CONFIG = Config(64, 32, 4, 2)  # fits any card's shared memory: what is left when pruning drops everything

# `full`: the whole search space (the original autotune lists, ~30 per kernel before pruning).
# dK/dV programs own BLOCK_N keys and stream BLOCK_M queries (small M, large N); dQ the opposite.
_FULL = {
    "fwd": _grid([(64, 64), (128, 64), (128, 128), (64, 128), (128, 32)], (4, 8), (2, 3, 4)),
    "dkdv": _grid([(32, 64), (32, 128), (64, 64), (64, 128), (16, 128)], (4, 8), (2, 3, 4)),
    "dq": _grid([(64, 32), (128, 32), (64, 64), (128, 64), (128, 16)], (4, 8), (2, 3, 4)),
}
# `curated`: three per (arch, kernel, head dim <= 64 or 128), the likely best first (`reduced` takes it alone).
# Chosen from the shapes FlashAttention-2 / Triton's fused-attention tutorial settle on for these cards, not
# measured here: a GPU session should confirm them with LLM_DIST_AUTOTUNE=full (docs/kernels.md).
_C = Config
_CURATED = {
    ("sm90", "fwd", 128): [_C(128, 64, 8, 3), _C(128, 64, 8, 4), _C(64, 64, 4, 3)],
    ("sm90", "fwd", 64): [_C(128, 64, 4, 3), _C(128, 128, 8, 3), _C(64, 64, 4, 4)],
    ("sm80", "fwd", 128): [_C(128, 64, 8, 2), _C(64, 64, 4, 3), _C(128, 32, 4, 2)],
    ("sm80", "fwd", 64): [_C(128, 64, 4, 3), _C(64, 64, 4, 3), _C(128, 128, 8, 2)],
    ("sm90", "dkdv", 128): [_C(32, 128, 8, 3), _C(64, 128, 8, 3), _C(32, 64, 4, 3)],
    ("sm90", "dkdv", 64): [_C(32, 128, 4, 3), _C(64, 128, 8, 3), _C(32, 64, 4, 3)],
    ("sm80", "dkdv", 128): [_C(32, 128, 8, 2), _C(32, 64, 4, 3), _C(64, 64, 4, 2)],
    ("sm80", "dkdv", 64): [_C(32, 128, 4, 3), _C(64, 64, 4, 3), _C(32, 64, 4, 2)],
    ("sm90", "dq", 128): [_C(128, 32, 8, 3), _C(128, 64, 8, 3), _C(64, 32, 4, 3)],
    ("sm90", "dq", 64): [_C(128, 32, 4, 3), _C(128, 64, 8, 3), _C(64, 64, 4, 3)],
    ("sm80", "dq", 128): [_C(128, 32, 8, 2), _C(64, 32, 4, 3), _C(64, 64, 4, 2)],
    ("sm80", "dq", 64): [_C(128, 32, 4, 3), _C(64, 64, 4, 3), _C(64, 32, 4, 2)],
}


def _prune(configs: list[Config], head_dim: int, n_q: int, elem_bytes: int = 2, tiles_in_smem: int = 2
           ) -> list[Config]:
    """Drop configs whose pipelined tiles overflow shared memory, or that are too big for a short sequence.

    Per stage a kernel buffers `tiles_in_smem` streamed tiles of (BLOCK x D) elements of `elem_bytes`, plus
    the resident block; the estimate is conservative enough to keep only compilable configs on A100 / H100.
    `n_q` is the bucketed query length, so every length of a bucket sees the same candidates.
    """
    limit = _smem_limit()
    keep = []
    for c in configs:
        bm, bn = c.block_m, c.block_n
        smem = elem_bytes * head_dim * (max(bm, bn) + c.num_stages * tiles_in_smem * min(bm, bn) + bm)
        if smem > limit or bm > max(64, n_q):
            continue
        if head_dim >= 128 and bm * bn >= 128 * 128 and c.num_warps < 8:  # too few warps for the accumulators
            continue
        keep.append(c)
    return keep or [_SAFE_CONFIG]


def candidates(kernel: str, head_dim: int, n_q: int, mode: str, elem_bytes: int = 2) -> list[Config]:
    """The configurations `mode` tries for `kernel` ("fwd", "dkdv", "dq"), pruned for (head_dim, bucket of n_q,
    element size); best guess first. `reduced` runs the first of them that compiles, without timing."""
    if INTERPRETED:  # the interpreter cannot time anything: one small config
        return [_INTERPRETER_CONFIG]
    if mode == "full":
        configs = _FULL[kernel]
    else:
        configs = _CURATED[(_arch(), kernel, 128 if head_dim >= 128 else 64)]
    return _prune(configs, head_dim, seq_bucket(n_q), elem_bytes)


_TUNERS = {name: Tuner(name) for name in ("fwd", "dkdv", "dq")}
_NO_SPECIALIZE = ["N_Q", "N_K", "WINDOW"]  # one binary for every length (the tune key buckets them)


def _tuned_launch(name: str, q: torch.Tensor, k: torch.Tensor, causal: bool, window: int,
                  launch: Callable[[Config], None]) -> Config:
    """Launch kernel `name` with the configuration chosen for this shape's bucket (see autotune.py)."""
    B, H, Tq, D = q.shape
    key = tune_key(name, Tq, k.shape[2], D, causal, window > 0, H // k.shape[1], q.dtype)
    device_name = torch.cuda.get_device_name(q.device) if q.is_cuda and not INTERPRETED else None
    return _TUNERS[name].run(key, lambda mode: candidates(name, D, Tq, mode, q.element_size()), launch, device_name)


# ------------------------------------------------------------------------------------------ ranges

@triton.jit
def _key_range(start_m, N_Q, N_K, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Key ranges of query block `start_m`: [lo, mid_lo) and [mid_hi, hi) need masks, [mid_lo, mid_hi) does not.

    Keys outside [lo, hi) are invisible to every query of the block and are skipped. Bounds other than
    `hi` are multiples of BLOCK_N. Every operand is kept non-negative before a division: Triton's integer
    division truncates on the GPU but floors in the interpreter.
    """
    off = N_K - N_Q  # bottom-right alignment: query i sits at key position i + off
    q_first = start_m * BLOCK_M + off
    q_last = q_first + BLOCK_M - 1
    lo = N_K * 0
    hi = N_K + 0
    mid_lo = N_K * 0
    mid_hi = (N_K // BLOCK_N) * BLOCK_N  # a ragged last key block always takes the masked path
    if CAUSAL:
        hi = tl.minimum(N_K, q_last + 1)
        mid_hi = tl.minimum(mid_hi, (q_first // BLOCK_N) * BLOCK_N)  # keys <= q_first: seen by every row
    if WINDOWED:
        lo = (tl.maximum(q_first - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        mid_lo = tl.cdiv(tl.maximum(q_last - WINDOW + 1, 0), BLOCK_N) * BLOCK_N  # keys > q_last - W: seen by all
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_range(start_n, N_Q, N_K, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Query-row ranges that see key block `start_n`: [lo, mid_lo) and [mid_hi, hi) masked, the middle not."""
    off = N_K - N_Q
    k_first = start_n * BLOCK_N
    k_last = k_first + BLOCK_N - 1
    lo = N_Q * 0
    hi = N_Q + 0
    mid_lo = N_Q * 0
    mid_hi = (N_Q // BLOCK_M) * BLOCK_M  # a ragged last query block always takes the masked path
    if CAUSAL:
        lo = (tl.maximum(k_first - off, 0) // BLOCK_M) * BLOCK_M  # rows at positions >= k_first
        mid_lo = tl.cdiv(tl.maximum(k_last - off, 0), BLOCK_M) * BLOCK_M  # rows at positions >= k_last
    if WINDOWED:
        hi = tl.minimum(N_Q, tl.maximum(k_last + WINDOW - off, 0))  # rows at positions < k_last + W
        mid_hi = tl.minimum(mid_hi, (tl.maximum(k_first + WINDOW - off, 0) // BLOCK_M) * BLOCK_M)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _visible(q_pos, k_idx, N_K, WINDOW, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Boolean tile: key k_idx exists and query position q_pos may see it (shapes broadcast)."""
    keep = k_idx < N_K
    if CAUSAL:
        keep = keep & (q_pos >= k_idx)
    if WINDOWED:
        keep = keep & (q_pos - k_idx < WINDOW)
    return keep


# ------------------------------------------------------------------------------------------ forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, offs_d, start, end,
               N_K, WINDOW, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N): K^T
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
        if MASKED:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < N_K, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < N_K, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N) scores in log2 units, fp32
        if MASKED:
            s = tl.where(_visible(q_pos[:, None], offs_n[None, :], N_K, WINDOW, CAUSAL, WINDOWED), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row may see nothing in this block (a window boundary): keep exp2 away from -inf - -inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_use)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd(Q, K, V, O, LSE, qk_scale,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              H, N_Q, N_K, WINDOW, GROUP,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP  # GQA: this query head's K/V head, read in place
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < N_Q, other=0.0)  # (BLOCK_M, D), resident for the whole loop
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    q_pos = offs_m + (N_K - N_Q)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_range(start_m, N_Q, N_K, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, offs_d, lo, mid_lo,
                               N_K, WINDOW, qk_scale, BLOCK_N, True, CAUSAL, WINDOWED)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, offs_d, mid_lo, mid_hi,
                               N_K, WINDOW, qk_scale, BLOCK_N, False, CAUSAL, WINDOWED)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, offs_d, mid_hi, hi,
                               N_K, WINDOW, qk_scale, BLOCK_N, True, CAUSAL, WINDOWED)

    row_ok = offs_m < N_Q
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows past N_Q only; never stored
    tl.store(LSE + pid_bh * N_Q + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------- backward

@triton.jit
def _bwd_preprocess(O, DO, Delta, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                    H, N_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO[i, d] * O[i, d] (fp32): the softmax-backward term that is the same for every key."""
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < N_Q
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + pid_bh * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                start, end, N_Q, N_K, WINDOW, qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    off = N_K - N_Q
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt_ptrs = q_base + offs_m[None, :] * stride_qt + offs_d[:, None]  # (D, BLOCK_M): Q^T
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]  # (BLOCK_M, D)
        if MASKED:
            qt = tl.load(qt_ptrs, mask=offs_m[None, :] < N_Q, other=0.0)
            do = tl.load(do_ptrs, mask=offs_m[:, None] < N_Q, other=0.0)
            lse = tl.load(lse_base + offs_m, mask=offs_m < N_Q, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < N_Q, other=0.0)
        else:
            qt = tl.load(qt_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        st = tl.dot(k, qt) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T in log2 units
        pt = tl.math.exp2(st - lse[None, :])  # P^T, recomputed from the saved LSE
        if MASKED:
            keep = _visible(offs_m[None, :] + off, offs_n[:, None], N_K, WINDOW, CAUSAL, WINDOWED)
            pt = tl.where(keep & (offs_m[None, :] < N_Q), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)  # dV += P^T dO
        dpt = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        dst = pt * (dpt - delta[None, :])  # dS^T
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)  # dK += dS^T Q  (times scale, applied once at the end)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, sm_scale, qk_scale,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                   H, N_Q, N_K, WINDOW, GROUP,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    HKV = H // GROUP
    b = pid_bk // HKV
    hk = pid_bk % HKV
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < N_K
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _query_range(start_n, N_Q, N_K, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    for g in range(GROUP):  # every query head that reads this K/V head: their dK/dV add up here
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * N_Q
        delta_base = Delta + (b * H + h) * N_Q
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                             lo, mid_lo, N_Q, N_K, WINDOW, qk_scale, BLOCK_M, True, CAUSAL, WINDOWED)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                             mid_lo, mid_hi, N_Q, N_K, WINDOW, qk_scale, BLOCK_M, False, CAUSAL, WINDOWED)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                             mid_hi, hi, N_Q, N_K, WINDOW, qk_scale, BLOCK_M, True, CAUSAL, WINDOWED)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, offs_d, start, end,
              N_K, WINDOW, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
        vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None]  # (D, BLOCK_N)
        if MASKED:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < N_K, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_n[None, :] < N_K, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        s = tl.dot(q, kt) * qk_scale
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            p = tl.where(_visible(q_pos[:, None], offs_n[None, :], N_K, WINDOW, CAUSAL, WINDOWED), p, 0.0)
        dp = tl.dot(do, vt)  # dO V^T
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)  # dQ += dS K
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, sm_scale, qk_scale,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 H, N_Q, N_K, WINDOW, GROUP,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * N_Q + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + pid_bh * N_Q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    q_pos = offs_m + (N_K - N_Q)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_range(start_m, N_Q, N_K, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, offs_d, lo, mid_lo,
                   N_K, WINDOW, qk_scale, BLOCK_N, True, CAUSAL, WINDOWED)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, offs_d, mid_lo, mid_hi,
                   N_K, WINDOW, qk_scale, BLOCK_N, False, CAUSAL, WINDOWED)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_pos, offs_d, mid_hi, hi,
                   N_K, WINDOW, qk_scale, BLOCK_N, True, CAUSAL, WINDOWED)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------ launchers

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention: expected q (B, H, Tq, D) and k, v (B, Hkv, Tk, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % Hkv:
        raise ValueError(f"flash_attention: k/v shape {tuple(k.shape)} does not fit q {tuple(q.shape)} "
                         "(same batch and head dim, n_head a multiple of n_kv_head)")
    if D not in HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim {D} is not one of {HEAD_DIMS}")
    if causal and Tq > Tk:
        raise ValueError(f"flash_attention: causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    if window < 0 or (window and not causal):
        raise ValueError(f"flash_attention: window={window} needs causal=True and window >= 0")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention: q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int, sm_scale: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(O (B, H, Tq, D) in q's dtype, LSE (B, H, Tq) fp32 in log2 units)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)

    def launch(c: Config) -> None:
        _attn_fwd[(triton.cdiv(Tq, c.block_m), B * H)](
            q, k, v, o, lse, sm_scale * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, Tq, Tk, window, H // Hkv,
            HEAD_DIM=D, CAUSAL=causal, WINDOWED=window > 0, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            num_warps=c.num_warps, num_stages=c.num_stages)

    _tuned_launch("fwd", q, k, causal, window, launch)
    return o, lse


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
              causal: bool, window: int, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    do = _lastdim_contiguous(do)
    delta = torch.empty_like(lse)
    pre_block = 64 if not INTERPRETED else 32
    _bwd_preprocess[(triton.cdiv(Tq, pre_block), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq,
                                                          HEAD_DIM=D, BLOCK_M=pre_block)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = dict(HEAD_DIM=D, CAUSAL=causal, WINDOWED=window > 0)

    def launch_dkdv(c: Config) -> None:
        _attn_bwd_dkdv[(triton.cdiv(Tk, c.block_n), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, sm_scale, sm_scale * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], H, Tq, Tk, window, H // Hkv, **common,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)

    def launch_dq(c: Config) -> None:
        _attn_bwd_dq[(triton.cdiv(Tq, c.block_m), B * H)](
            q, k, v, do, lse, delta, dq, sm_scale, sm_scale * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3], H, Tq, Tk, window, H // Hkv, **common,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)

    _tuned_launch("dkdv", q, k, causal, window, launch_dkdv)
    _tuned_launch("dq", q, k, causal, window, launch_dq)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """autograd wrapper: saves q, k, v, O and the LSE; backward recomputes P block by block."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int,  # noqa: ANN001
                sm_scale: float) -> torch.Tensor:
        q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
        o, lse = _forward(q, k, v, causal, window, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.window, ctx.sm_scale = causal, window, sm_scale
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):  # noqa: ANN001, ANN205
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.window, ctx.sm_scale)
        return dq, dk, dv, None, None, None


# ------------------------------------------------------------------------------------- public entry

def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int = 0,
                            sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton forward alone, no autograd: (O, natural-log LSE (B, H, Tq) fp32). For tests and benchmarks."""
    _check(q, k, v, causal, window)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    o, lse2 = _forward(_lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v), causal, window, scale)
    return o, lse2 / LOG2E


# torch.compile runs this eagerly (a graph break): the launch logic (autotuned grids, Python chunk loops)
# is not something to trace, and the kernels are already fused.
@torch.compiler.disable
def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int = 0,
                           sm_scale: float | None = None) -> torch.Tensor:
    """FlashAttention in Triton with autograd; q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> O (B, H, Tq, D).

    Runs the kernels unconditionally; `llm_dist.kernels.flash_attention` checks first that they can run.
    """
    _check(q, k, v, causal, window)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, causal, window, scale)
