"""Triton flash-decoding attention that reads a quantized KV cache as it is stored.

The reference (``decode_attention.decode_attention_reference``) is the specification. The layout is
``compress.kv.quant``'s (all (B, H, T, ...), any strides along B, H and T, rows contiguous):

- int (KIVI): ``k_codes`` / ``v_codes`` uint8 (B, H, T, D/PER), PER = 8/BITS codes per byte, channel
  d in bits ``(d % PER) * BITS`` of byte ``d // PER``; ``k_scale`` / ``k_min`` fp16 (B, H, T/G, D) per
  key block of G tokens and channel; ``v_scale`` / ``v_min`` fp16 (B, H, T, NG) per token and group
  of GV = D/NG channels; x = code * scale + min;
- fp8: ``k_codes`` / ``v_codes`` float8_e4m3fn (B, H, T, D), read as their uint8 bits, and a float32
  scale per KV head; x = e4m3 * scale;
- the residual window ``k_res`` / ``v_res`` (B, H, R, D) in the model dtype, after the quantized tokens.

**Split scheme.** Grid (B, H, S): one program per sequence, KV head and slice of the cache; the
program handles every query head of its KV head, so each K/V byte is read once. The quantized
tokens are cut into slices of ``split_tokens`` (a multiple of BLOCK_N) and so is the residual
window: splits ``0 .. quant_splits-1`` read codes, the rest read the residual, so a slice never
mixes the two. Each program loops over BLOCK_N-token tiles with an online softmax in float32 (base
2: log2(e) is folded into the scale) and writes its normalized partial output and log-sum-exp;
``_combine_kernel`` merges the S partials of each (sequence, query head).

**Rows.** ``tl.dot`` needs at least 16 rows, and a KV head has GROUP = Hq/H query heads (1..8). The
query tile has QH >= 16 rows, row r = (value group g, head h) = (r // GROUP, r % GROUP): every value
group of the integer format gets its own copy of the heads, and the store keeps row (g, h) only
for the output channels of group g. One dot then serves every value group (see below), in rows
that would otherwise be padding. fp8 and the residual have one group: rows are the heads.

**Inside an integer tile.** No int-to-float conversions (1/8 of the FMA rate on sm_80/sm_90), and
codes are built two per integer operation:

- A tile's columns are in *code order* (``_code_order``): columns 2r and 2r + 1 hold code j of
  bytes 4w + k and 4w + k + 2 (r = 2*PER*w + PER*k + j, PER = 8 // BITS codes per byte, k = 0, 1),
  the two codes that sit 16 bits apart in int32 word w of the token's row. The query, the key
  scales and the output use the same column order (the output is stored through it).
- Quantized tiles use fp16 ``tl.dot`` operands whenever the query is 16-bit (``dot_dtypes``). Codes
  become exact fp16 operands by or-ing them into the mantissa of 1024.0; the offset 1024 is removed
  once per row of each product (from the same rounded operands, so it cancels exactly). With the
  rows read as int32 words (``_code_pairs``; each byte leaves DRAM once, ``evict_first``), one
  shift and one mask-or per pair give the fp16x2 bit pattern of columns 2r, 2r + 1 directly
  (``(word >> shift) & mask | 0x64006400``), and joins and reshapes that only rename registers
  lay the pairs out as a (BLOCK_N, D) tile. Rows that are not 4-byte aligned (``_word_rows``) and
  float32 operands load each column's byte (PER times; the duplicate addresses coalesce) with one
  shift per column; float32 operands go through the float32 mantissa of 2^23 instead.
- Keys: BLOCK_N divides G and tiles start on multiples of BLOCK_N, so a tile lies in one key
  block: ``q.(c*s + m) = (q*s).c + q.m``. The block's scale row goes into the query, ``tl.dot`` runs
  on the codes and ``q.m`` is one float32 term per row and tile.
- Values: ``p.(c*s + m) = (p*s).c + p.m`` per value group. Row (g, h) multiplies its probabilities
  by group g's per-token scales, so one ``tl.dot`` on the codes gives every group's output; the
  ``p.m`` terms accumulate in one float32 number per row.

**FP8.** The E4M3 bits move into an fp16 bit pattern with one shift-mask-or (sign to bit 15,
exponent and mantissa up by 7 bits): exactly ``e4m3 * 2^-8``, normal and subnormal, so neither
Triton's fp8 type nor an sm_89+ GPU is needed. The per-head scales and the 2^8 are folded into the
score scale (keys) and applied once to the output (values).

Out-of-range tokens (past ``length``, in a partial last key block or a preallocated buffer) are
masked on load (never read) and scored -inf. Residual tiles use the cache's 16-bit dtype when the
query shares it, float32 ("ieee") otherwise and for bf16 under Triton 3.9's interpreter (its bf16
arithmetic is wrong). Softmax, accumulators and partials are float32.

**Cost, compiled offline for sm_90 (Llama-3-8B: D = 128, 4 query heads per KV head, 2 value groups,
BLOCK_N = 64, 4 warps):** per cached token about 59 warp instructions for int4 and int2 (78 before
the fp16x2 code pairs), 67 for int8, 63 for fp8 and 19 for the bf16 residual; 160-230 registers, no
spills (16-bit queries, sm_80 and sm_90, head_dim 16..256). By that count the int4 and int2 paths
are still issue-bound on an H100, at about 2.65x bf16 against 3.5x (int4) and 6.3x (int2) for their
bytes (docs/kernel-budget.md).

Importing this module imports Triton; ``compress.kernels`` imports it only when first needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_attention import QuantizedKVLike, choose_num_splits, sm_count
from .hadamard import rotate

LOG2E = 1.4426950408889634
FP8_FP16_SHIFT = tl.constexpr(256.0)   # the fp16 pattern of an E4M3 code holds e4m3 * 2^-8


@triton.jit
def _code_order(BITS: tl.constexpr, D: tl.constexpr):
    """Column c of an integer tile -> (byte, shift, channel), PER = 8 // BITS codes per byte.

    int4/int2: the order of ``_code_pairs``. Columns 2r and 2r + 1 (r = R*w + k*PER + j, R = 2*PER
    pairs per int32 word w of a token's row, k = 0, 1, j = 0 .. PER-1) hold code j of bytes
    4w + k and 4w + k + 2: the two codes that sit 16 bits apart in word w, so one shift and one
    mask-or make both fp16 operands. int8: channel order."""
    PER: tl.constexpr = 8 // BITS
    c = tl.arange(0, D)
    if PER == 1:
        ch = c % D
        byte = ch
        shift = (c // D) * BITS
    else:
        R: tl.constexpr = 2 * PER
        r = (c // 2) % R
        ch = PER * (4 * (c // (2 * R)) + r // PER + 2 * (c % 2)) + r % PER
        byte = ch // PER
        shift = (ch % PER) * BITS
    return byte, shift, ch


@triton.jit
def _join_tree(p, R: tl.constexpr):
    """Tensors p[0 .. R-1] (R = 2, 4, 8) of one shape -> one tensor (..., R) with p[i] at i."""
    if R == 2:
        out = tl.join(p[0], p[1])
    elif R == 4:
        out = tl.join(tl.join(p[0], p[2]), tl.join(p[1], p[3]))                 # [.., y, x] = p[2y + x]
    else:
        out = tl.join(tl.join(tl.join(p[0], p[4]), tl.join(p[2], p[6])),
                      tl.join(tl.join(p[1], p[5]), tl.join(p[3], p[7])))         # [.., z, y, x] = p[4z + 2y + x]
    return out


@triton.jit
def _code_pairs(ptr, t, ok, stride_t, BITS: tl.constexpr, D: tl.constexpr):
    """(BLOCK_N, D) fp16 operands ``1024 + code`` of tokens t in ``_code_order``, two codes per
    integer operation: the rows are read as int32 words (each byte once), and for each of the
    R = 2*PER pairs of a word, ``((word >> shift) & (M | M << 16)) | 0x64006400`` is the fp16x2 bit
    pattern of codes j of bytes k and k + 2 (a shift and a mask-or, no per-code extraction)."""
    PER: tl.constexpr = 8 // BITS
    R: tl.constexpr = 2 * PER
    NW: tl.constexpr = D // PER // 4                                     # int32 words per token
    M: tl.constexpr = ((1 << BITS) - 1) * 65537
    w = tl.load(ptr.to(tl.pointer_type(tl.int32)) + t[:, None] * (stride_t // 4) + tl.arange(0, NW)[None, :],
                mask=ok[:, None], other=0, eviction_policy="evict_first")     # (BLOCK_N, NW)
    p = ()
    for r in tl.static_range(R):
        p = p + (((w >> (8 * (r // PER) + BITS * (r % PER))) & M) | 0x64006400,)
    q = tl.reshape(_join_tree(p, R), (t.shape[0], D // 2))                  # pair R*w + r
    h = tl.join(q.to(tl.int16), (q >> 16).to(tl.int16))                      # (BLOCK_N, D/2, 2): low, high half
    return tl.reshape(h, (t.shape[0], D)).to(tl.float16, bitcast=True)


@triton.jit
def _code_tile(ptr, t, ok, stride_t, byte, shift, BITS: tl.constexpr, D: tl.constexpr,
               CODE_OFFSET: tl.constexpr, DOT_DTYPE: tl.constexpr, WORDS: tl.constexpr):
    """The ``tl.dot`` operand (BLOCK_N, D) of codes + CODE_OFFSET in ``_code_order``."""
    if WORDS and CODE_OFFSET == 1024 and BITS < 8:
        op = _code_pairs(ptr, t, ok, stride_t, BITS, D)
    else:
        op = _code_operand(_load_codes(ptr, t, ok, stride_t, byte, shift, BITS), CODE_OFFSET, DOT_DTYPE)
    return op


@triton.jit
def _load_codes(ptr, t, ok, stride_t, byte, shift, BITS: tl.constexpr):
    """(BLOCK_N, D) int32 codes of tokens t in code order, each column's byte loaded and shifted
    (one shift per column): the path for unaligned rows and float32 operands."""
    b = tl.load(ptr + t[:, None] * stride_t + byte[None, :], mask=ok[:, None], other=0,
                eviction_policy="evict_first")
    return (b.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _code_operand(codes, CODE_OFFSET: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``codes + CODE_OFFSET`` as exact ``tl.dot`` operands of ``DOT_DTYPE``, without a conversion
    instruction: offset 1024 or-s the codes into the mantissa of fp16 1024.0; offset 0 goes through
    the float32 mantissa of 2^23 (float32 operands)."""
    if CODE_OFFSET == 1024:
        op = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        op = ((codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(DOT_DTYPE)
    return op


@triton.jit
def _e4m3_as_fp16(bits):
    """float8_e4m3fn bits (int32, 0..255) -> fp16 equal to e4m3 * 2^-8, exact; 0x7F/0xFF (NaN) never occur."""
    return (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _softmax_step(s, m_i, l_i, acc, acc_row):
    """Base-2 scores s (QH, BLOCK_N) of one tile -> probabilities p relative to the new running max,
    and the running max m_i, sum l_i (QH,), output acc (QH, D) and row terms acc_row (QH,) rescaled."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None], acc_row * alpha


@triton.jit
def _int_tiles(q_ptr, stride_qh, t_start, t_end, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, stride_ct,
               stride_kn, stride_vt, qk_scale, head, group, row_ok, BITS: tl.constexpr,
               GROUP_SIZE: tl.constexpr, QH: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_DTYPE: tl.constexpr, CODE_OFFSET: tl.constexpr, WORDS: tl.constexpr):
    """Online softmax over integer-quantized tokens t_start .. t_end of one (sequence, KV head).
    Rows (QH,): query ``head`` and value ``group``; output columns in ``_code_order``."""
    byte, shift, ch = _code_order(BITS, D)                                              # (D,) each
    q = tl.load(q_ptr + head[:, None] * stride_qh + ch[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    m_i = tl.full((QH,), float("-inf"), tl.float32)
    l_i = tl.zeros((QH,), tl.float32)
    acc = tl.zeros((QH, D), tl.float32)
    acc_row = tl.zeros((QH,), tl.float32)                          # sum_t p * v_min, per row
    for t0 in range(t_start, t_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        ok = t < t_end
        # Keys: q.(c*s + m) = (q*s).c + q.m with the scale row of key block t0 // G.
        blk = t0 // GROUP_SIZE
        ks = tl.load(ks_ptr + blk * stride_kn + ch).to(tl.float32)                      # (D,)
        km = tl.load(km_ptr + blk * stride_kn + ch).to(tl.float32)
        kq = _code_tile(kc_ptr, t, ok, stride_ct, byte, shift, BITS, D, CODE_OFFSET, DOT_DTYPE, WORDS)
        qs = (q * ks[None, :]).to(DOT_DTYPE)                                            # (QH, D)
        s = tl.dot(qs, tl.trans(kq), input_precision="ieee")                            # (QH, BLOCK_N)
        if CODE_OFFSET != 0:
            row = tl.sum(q * km[None, :] - CODE_OFFSET * qs.to(tl.float32), 1)          # (QH,)
        else:
            row = tl.sum(q * km[None, :], 1)
        s = tl.where(ok[None, :], (s + row[:, None]) * qk_scale, float("-inf"))
        p, m_i, l_i, acc, acc_row = _softmax_step(s, m_i, l_i, acc, acc_row)
        # Values: p.(c*s + m) = (p*s).c + p.m, row (g, h) with the scales of group g.
        vmask = row_ok[:, None] & ok[None, :]
        vs = tl.load(vs_ptr + t[None, :] * stride_vt + group[:, None], mask=vmask, other=0.0)  # (QH, BLOCK_N)
        vm = tl.load(vm_ptr + t[None, :] * stride_vt + group[:, None], mask=vmask, other=0.0)
        a = (p * vs.to(tl.float32)).to(DOT_DTYPE)
        vq = _code_tile(vc_ptr, t, ok, stride_ct, byte, shift, BITS, D, CODE_OFFSET, DOT_DTYPE, WORDS)
        acc = tl.dot(a, vq, acc, input_precision="ieee")                                # (QH, D)
        if CODE_OFFSET != 0:
            acc_row += tl.sum(p * vm.to(tl.float32) - CODE_OFFSET * a.to(tl.float32), 1)
        else:
            acc_row += tl.sum(p * vm.to(tl.float32), 1)
    return m_i, l_i, acc + acc_row[:, None]


@triton.jit
def _fp8_tiles(q, t_start, t_end, kc_ptr, vc_ptr, stride_ct, k_mult, QH: tl.constexpr, D: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Online softmax over FP8 tokens t_start .. t_end; values are left unscaled (see the caller)."""
    d = tl.arange(0, D)
    qd = q.to(DOT_DTYPE)
    m_i = tl.full((QH,), float("-inf"), tl.float32)
    l_i = tl.zeros((QH,), tl.float32)
    acc = tl.zeros((QH, D), tl.float32)
    no_rows = tl.zeros((QH,), tl.float32)
    for t0 in range(t_start, t_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        ok = t < t_end
        offs = t[:, None] * stride_ct + d[None, :]
        kb = tl.load(kc_ptr + offs, mask=ok[:, None], other=0, eviction_policy="evict_first").to(tl.int32)
        k = _e4m3_as_fp16(kb).to(DOT_DTYPE)                                             # (BLOCK_N, D)
        s = tl.where(ok[None, :], tl.dot(qd, tl.trans(k), input_precision="ieee") * k_mult, float("-inf"))
        p, m_i, l_i, acc, no_rows = _softmax_step(s, m_i, l_i, acc, no_rows)
        vb = tl.load(vc_ptr + offs, mask=ok[:, None], other=0, eviction_policy="evict_first").to(tl.int32)
        acc = tl.dot(p.to(DOT_DTYPE), _e4m3_as_fp16(vb).to(DOT_DTYPE), acc, input_precision="ieee")
    return m_i, l_i, acc


@triton.jit
def _residual_tiles(q, t_start, t_end, kr_ptr, vr_ptr, stride_rt, qk_scale, QH: tl.constexpr, D: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Online softmax over residual-window tokens t_start .. t_end (full precision)."""
    d = tl.arange(0, D)
    qd = q.to(DOT_DTYPE)
    m_i = tl.full((QH,), float("-inf"), tl.float32)
    l_i = tl.zeros((QH,), tl.float32)
    acc = tl.zeros((QH, D), tl.float32)
    no_rows = tl.zeros((QH,), tl.float32)
    for t0 in range(t_start, t_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        ok = t < t_end
        offs = t[:, None] * stride_rt + d[None, :]
        k = tl.load(kr_ptr + offs, mask=ok[:, None], other=0.0).to(DOT_DTYPE)
        s = tl.where(ok[None, :], tl.dot(qd, tl.trans(k), input_precision="ieee") * qk_scale, float("-inf"))
        p, m_i, l_i, acc, no_rows = _softmax_step(s, m_i, l_i, acc, no_rows)
        v = tl.load(vr_ptr + offs, mask=ok[:, None], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(p.to(DOT_DTYPE), v, acc, input_precision="ieee")
    return m_i, l_i, acc


@triton.jit
def _split_kernel(q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kr_ptr, vr_ptr, po_ptr, plse_ptr,
                  length, res_len, split_tokens, quant_splits, num_splits, qk_scale,
                  stride_qb, stride_qh, stride_cb, stride_ch, stride_ct, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vt, stride_rb, stride_rh, stride_rt,
                  GROUP: tl.constexpr, NG: tl.constexpr, QH: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                  FP8: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, QUANT_DTYPE: tl.constexpr,
                  RES_DTYPE: tl.constexpr, CODE_OFFSET: tl.constexpr, WORDS: tl.constexpr = False):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    r = tl.arange(0, QH)
    head = r % GROUP                            # query head pid_h * GROUP + head
    group = r // GROUP                          # value group (integer format; 0 otherwise)
    row_ok = r < GROUP * NG
    d = tl.arange(0, D)
    q_head0 = q_ptr + pid_b * stride_qb + pid_h * GROUP * stride_qh
    if pid_s < quant_splits:
        t_start = pid_s * split_tokens
        t_end = tl.minimum(t_start + split_tokens, length)
        codes = pid_b * stride_cb + pid_h * stride_ch
        if FP8:
            q = tl.load(q_head0 + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
            k_mult = qk_scale * FP8_FP16_SHIFT * tl.load(ks_ptr + pid_h)
            m_i, l_i, acc = _fp8_tiles(q.to(tl.float32), t_start, t_end, kc_ptr + codes, vc_ptr + codes, stride_ct,
                                       k_mult, QH, D, BLOCK_N, QUANT_DTYPE)
            acc = acc * (FP8_FP16_SHIFT * tl.load(vs_ptr + pid_h))
            out_ch = d
            out_group = d // (D // NG)
        else:
            kscales = pid_b * stride_kb + pid_h * stride_kh
            vscales = pid_b * stride_vb + pid_h * stride_vh
            m_i, l_i, acc = _int_tiles(q_head0, stride_qh, t_start, t_end, kc_ptr + codes, ks_ptr + kscales,
                                       km_ptr + kscales, vc_ptr + codes, vs_ptr + vscales, vm_ptr + vscales,
                                       stride_ct, stride_kn, stride_vt, qk_scale, head, group, row_ok, BITS,
                                       GROUP_SIZE, QH, D, BLOCK_N, QUANT_DTYPE, CODE_OFFSET, WORDS)
            out_ch = _code_order(BITS, D)[2]
            out_group = out_ch // (D // NG)
    else:
        t_start = (pid_s - quant_splits) * split_tokens
        t_end = tl.minimum(t_start + split_tokens, res_len)
        res = pid_b * stride_rb + pid_h * stride_rh
        q = tl.load(q_head0 + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
        m_i, l_i, acc = _residual_tiles(q.to(tl.float32), t_start, t_end, kr_ptr + res, vr_ptr + res, stride_rt,
                                        qk_scale, QH, D, BLOCK_N, RES_DTYPE)
        out_ch = d
        out_group = d // (D // NG)
    # Every split holds at least one token, so l_i > 0. Row (g, h) owns the channels of group g.
    out_row = (pid_b * tl.num_programs(1) * GROUP + pid_h * GROUP + head) * num_splits + pid_s     # (QH,)
    keep = row_ok[:, None] & (out_group[None, :] == group[:, None])
    tl.store(po_ptr + out_row[:, None] * D + out_ch[None, :], acc / l_i[:, None], mask=keep)
    tl.store(plse_ptr + out_row, m_i + tl.log2(l_i), mask=r < GROUP)


@triton.jit
def _combine_kernel(po_ptr, plse_ptr, out_ptr, num_splits, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[b, hq] = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max): one program per (b, hq) row."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)
    base = row * num_splits
    m = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = tl.maximum(m, tl.load(plse_ptr + base + s, mask=s < num_splits, other=float("-inf")))
    m_max = tl.max(m, 0)
    w_sum = tl.zeros((BLOCK_S,), tl.float32)
    acc = tl.zeros((BLOCK_S, D), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = s < num_splits
        w = tl.exp2(tl.load(plse_ptr + base + s, mask=ok, other=float("-inf")) - m_max)   # (BLOCK_S,)
        o = tl.load(po_ptr + (base + s)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        w_sum += w
        acc += w[:, None] * o
    out = tl.sum(acc, 0) / tl.sum(w_sum, 0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def _interpreting() -> bool:
    return type(_split_kernel).__name__ == "InterpretedFunction"


def dot_dtypes(q_dtype: torch.dtype, kv_dtype: torch.dtype):
    """``tl.dot`` operand dtypes (quantized tiles, residual tiles).

    Quantized tiles use fp16 whenever the query is 16-bit: codes and E4M3 values are exact in fp16
    (bf16 holds only 8 significant bits and no E4M3 bit pattern), its 11-bit significand keeps
    ``q * key_scale`` and ``p * value_scale`` more precisely than bf16, and no fp16 -> bf16
    conversion is needed. Limit: a bf16 query entry above 65504 would overflow in fp16 (real
    queries are orders of magnitude smaller). Residual tiles use the cache's own 16-bit dtype when
    the query shares it. Everything else is float32 ("ieee"), and so is bf16 under Triton 3.9's
    interpreter, whose bf16 arithmetic is wrong.
    """
    quant = tl.float16 if q_dtype in (torch.float16, torch.bfloat16) else tl.float32
    if q_dtype == kv_dtype == torch.float16:
        return quant, tl.float16
    if q_dtype == kv_dtype == torch.bfloat16 and not _interpreting():
        return quant, tl.bfloat16
    return quant, tl.float32


def code_offset(dtype) -> int:
    """The constant or-ed into integer codes to make exact fp16 operands (0: via float32)."""
    return 1024 if dtype == tl.float16 else 0


def default_block_n(kv: QuantizedKVLike, head_dim: int, q_dtype: torch.dtype) -> int:
    """Tokens per tile: 64 (32 at head_dim 256, 16 for float32 queries, whose exact dots run on the
    CUDA cores: bounds registers, no spills on sm_80/sm_90 except fp8 with float32 queries at
    head_dim >= 128), and never more than an integer key block, so that a tile lies in one block."""
    cap = 16 if q_dtype == torch.float32 else 64 if head_dim <= 128 else 32
    return cap if kv.fp8 else min(cap, kv.group_size)


def rows(group: int, value_groups: int) -> int:
    """QH: rows of the query tile, one per (value group, query head), at least 16 for ``tl.dot``."""
    return max(16, triton.next_power_of_2(group * value_groups))


def _same_strides(a: torch.Tensor, b: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n tokens of two (B, H, T, X) tensors read with one set of strides, rows contiguous."""
    if a.stride() == b.stride() and a.stride(-1) == 1:
        return a, b
    return a[:, :, :n].contiguous(), b[:, :, :n].contiguous()


def _head_scale(scale: torch.Tensor, heads: int) -> torch.Tensor:
    """float32 (H,) from a per-head or per-tensor FP8 scale."""
    s = scale.float().reshape(-1)
    return (s.expand(heads) if s.numel() == 1 else s).contiguous()


def _quant_args(q: torch.Tensor, kv: QuantizedKVLike, heads: int) -> tuple[list, list]:
    """(pointers kc, ks, km, vc, vs, vm), (strides codes b/h/t, key scales b/h/block, value scales b/h/t)."""
    n = kv.length
    if n == 0:
        return [q] * 6, [0] * 9
    kc, vc = _same_strides(kv.k_codes, kv.v_codes, n)
    if kv.fp8:
        kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)
        ptrs = [kc, _head_scale(kv.k_scale, heads), q, vc, _head_scale(kv.v_scale, heads), q]
        return ptrs, [*kc.stride()[:3], 0, 0, 0, 0, 0, 0]
    ks, km = _same_strides(kv.k_scale, kv.k_min, -(-n // kv.group_size))
    vs, vm = _same_strides(kv.v_scale, kv.v_min, n)
    if ks.dtype != torch.float16:
        # fp8 scales and minima (scale_dtype: fp8) widened for the kernel, which reads fp16: an
        # extra pass over 1/8 (g32) of the codes' bytes per step, no fp8 loads needed (pre-sm_89 GPUs)
        nb = -(-n // kv.group_size)
        ks, km = (t[:, :, :nb].to(torch.float16) for t in (ks, km))
        vs, vm = (t[:, :, :n].to(torch.float16) for t in (vs, vm))
    return [kc, ks, km, vc, vs, vm], [*kc.stride()[:3], *ks.stride()[:3], *vs.stride()[:3]]


def _word_rows(kc: torch.Tensor, vc: torch.Tensor, kv: QuantizedKVLike) -> bool:
    """Whether the integer code rows can be read as int32 words: 4-byte aligned tensors, strides
    and rows (``_code_pairs``)."""
    if kv.fp8 or kv.length == 0:
        return False
    return (all(t.data_ptr() % 4 == 0 for t in (kc, vc)) and all(st % 4 == 0 for st in kc.stride()[:3])
            and kc.shape[-1] % 4 == 0)


def decode_attention(q: torch.Tensor, kv: QuantizedKVLike, scale: float, *, num_splits: int | None = None,
                     block_n: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, D) attention output in q's dtype with two launches (splits, combine). ``num_splits``:
    sequence slices per (sequence, KV head), default ``choose_num_splits``; ``block_n`` forces the
    tile (tests); ``out`` (B, Hq, D) contiguous receives the result when given (tests poison it)."""
    b, hq, d = q.shape
    h = kv.k_res.shape[1]
    if kv.rotated:
        q = rotate(q)
    length, res_len = kv.length, kv.k_res.shape[2]
    out = out if out is not None else torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    if b == 0 or length + res_len == 0:
        return out.zero_()                 # softmax over no tokens: the reference's empty sum
    block_n = block_n or default_block_n(kv, d, q.dtype)
    if block_n < 16 or block_n & (block_n - 1) or (not kv.fp8 and kv.group_size % block_n):
        raise ValueError(f"block_n {block_n} must be a power of two >= 16 dividing the key group_size "
                         f"{kv.group_size}")
    num_splits = num_splits or choose_num_splits(b, h, length + res_len, sm_count(q.device))
    split_tokens = triton.cdiv(triton.cdiv(length + res_len, num_splits), block_n) * block_n
    quant_splits = triton.cdiv(length, split_tokens)
    splits = quant_splits + triton.cdiv(res_len, split_tokens)

    q = q if q.stride(-1) == 1 else q.contiguous()
    ptrs, strides = _quant_args(q, kv, h)
    kr, vr = _same_strides(kv.k_res, kv.v_res, res_len) if res_len else (q, q)
    res_strides = kr.stride()[:3] if res_len else (0, 0, 0)
    value_groups = 1 if kv.fp8 else kv.v_scale.shape[-1]
    quant_dtype, res_dtype = dot_dtypes(q.dtype, kv.dtype)
    partial_o = torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)     # normalized per split
    partial_lse = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)      # log2-sum-exp2
    _split_kernel[(b, h, splits)](
        q, *ptrs, kr, vr, partial_o, partial_lse, length, res_len, split_tokens, quant_splits, splits,
        float(scale) * LOG2E, q.stride(0), q.stride(1), *strides, *res_strides,
        GROUP=hq // h, NG=value_groups, QH=rows(hq // h, value_groups), D=d, BITS=kv.bits, FP8=kv.fp8,
        GROUP_SIZE=kv.group_size, BLOCK_N=block_n, QUANT_DTYPE=quant_dtype, RES_DTYPE=res_dtype,
        CODE_OFFSET=code_offset(quant_dtype), WORDS=_word_rows(ptrs[0], ptrs[3], kv),
        num_warps=4, num_stages=2)
    _combine_kernel[(b * hq,)](partial_o, partial_lse, out, splits, D=d,
                               BLOCK_S=min(16, triton.next_power_of_2(splits)), num_warps=4)
    return out
