#!/usr/bin/env python3
"""Generate reference vectors for the 4-bit (NF4/FP4) and 8-bit blockwise codecs
with the REAL bitsandbytes (CPU path), written to testdata/codec/*.safetensors.

Usage (from the repository root):
    /work/venv/bin/python tools/gen_codec_vectors.py [--out testdata/codec]

Deterministic: all inputs come from numpy PCG64 generators with fixed seeds
(computed in float64, then rounded to the target dtype). Nothing is installed.
The layout of the output files is documented in testdata/README.md; keep the
two in sync.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# bnb wraps some reference functions in torch.compile; plain eager math is identical
# and avoids per-shape recompilation.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import numpy as np
import torch

import bitsandbytes
import bitsandbytes.functional as F
from bitsandbytes.backends.default import ops as default_ops
from safetensors.torch import save_file as _st_save_file


def save_file(tensors, path, metadata):
    """safetensors.save_file with the metadata folded into ONE header key, "info" (a JSON object
    with sorted keys): safetensors writes metadata from a hash map, so several keys would come out
    in a random order and the files would not be byte-reproducible."""
    _st_save_file(tensors, path, metadata={"info": json.dumps(metadata, sort_keys=True)})


CPU = torch.device("cpu")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]
NESTED_BLOCKSIZE = 256

# bnb's reference dequantization math (backends/default/ops.py). It is wrapped in
# torch.compile(dynamic=False); use the undecorated Python function (identical math,
# no per-shape recompilation).
_deq4_compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__",
                        default_ops._dequantize_4bit_compute)

# CUDA-kernel FP4 decision literals (csrc/kernels.cu::dQuantizeFP4), as f32.
FP4_CUDA_LITERALS = np.array([0.00260417, 0.0859375, 0.20833333, 0.29166667,
                              0.4166667, 0.583333, 0.8333333], dtype=np.float32)


# --------------------------------------------------------------------------- helpers
def representable_neighbours(t, dtype):
    """For an f32 value t != 0, return (below, exact_or_None, above): the largest value
    of `dtype` strictly below t, t itself if `dtype` represents it exactly, and the
    smallest value strictly above t. Values are returned as Python floats (exact f32)."""
    t = np.float32(t)
    if dtype == "float32":
        return (float(np.nextafter(t, np.float32(-np.inf))), float(t),
                float(np.nextafter(t, np.float32(np.inf))))
    if dtype == "float16":
        h = np.float16(t)
        exact = float(h) == float(t)
        below = h if float(h) < float(t) else np.nextafter(h, np.float16(-np.inf))
        above = h if float(h) > float(t) else np.nextafter(h, np.float16(np.inf))
        return float(below), (float(t) if exact else None), float(above)
    if dtype == "bfloat16":
        # bf16 values are exactly the f32 values whose low 16 bits are zero
        m = np.abs(t)
        mb = int(np.array([m], dtype=np.float32).view(np.uint32)[0])
        lo_bits = mb & 0xFFFF0000
        exact = lo_bits == mb
        mag_below = lo_bits - 0x10000 if exact else lo_bits
        mag_above = lo_bits + 0x10000

        def fb(bits):
            return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])

        if t > 0:
            below, above = fb(mag_below), fb(mag_above)
        else:
            below, above = -fb(mag_above), -fb(mag_below)
        return below, (float(t) if exact else None), above
    raise ValueError(dtype)


def nf4_thresholds():
    code = F.get_4bit_type("nf4", device=CPU).float()
    return ((code[:-1] + code[1:]) / 2).numpy().astype(np.float32)  # f32 midpoints == CUDA literals


def fp4_midpoints():
    code = F.get_4bit_type("fp4", device=CPU).float()
    s = torch.sort(code).values
    mids = ((s[:-1] + s[1:]) / 2).numpy().astype(np.float32)
    return np.unique(np.abs(mids[mids > 0]))


def cuda_rule_4bit(x_f32_flat, absmax, blocksize, quant_type):
    """The CUDA kernel rule (csrc/kernels.cu kQuantizeBlockwise + dQuantizeNF4/FP4) with an
    IEEE reciprocal: xn = x * (1/absmax) in f32, strict '>' comparisons, all-zero block ->
    NaN -> code 0, odd-length pad element = 0.0. Returns packed bytes [(n+1)//2]."""
    n = x_f32_flat.size
    nb = (n + blocksize - 1) // blocksize
    xp = np.zeros(n + (n % 2), dtype=np.float32)
    xp[:n] = x_f32_flat
    blk = np.arange(xp.size) // blocksize
    am = absmax.astype(np.float32)[np.minimum(blk, nb - 1)]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1.0) / am).astype(np.float32)
        xn = (xp * inv).astype(np.float32)
    if quant_type == "nf4":
        th = nf4_thresholds()
        codes = (xn[:, None] > th[None, :]).sum(axis=1).astype(np.uint8)  # NaN -> 0
    else:
        L = FP4_CUDA_LITERALS
        sign = np.where(xn < 0, 8, 0).astype(np.uint8)
        m = np.abs(xn)
        hi = m > L[3]
        c = np.where(hi,
                     np.where(m > L[5], np.where(m > L[6], 0b011, 0b010), np.where(m > L[4], 0b101, 0b100)),
                     np.where(m > L[1], np.where(m > L[2], 0b111, 0b110), np.where(m > L[0], 0b001, 0b000)))
        codes = (c.astype(np.uint8) + sign).astype(np.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def cuda_rule_8bit(xn, code):
    """Transliteration of csrc/kernels.cu dQuantize<0> (binary search; nearest code,
    exact ties -> even index; NaN -> 0). xn: f32 array (already scaled). code: f32[256]."""
    xn = np.asarray(xn, dtype=np.float32)
    code = np.asarray(code, dtype=np.float32)
    pivot = np.full(xn.shape, 127, dtype=np.int64)
    lower_pivot = np.zeros(xn.shape, dtype=np.int64)
    upper_pivot = np.full(xn.shape, 255, dtype=np.int64)
    lower = np.full(xn.shape, -1.0, dtype=np.float32)
    upper = np.full(xn.shape, 1.0, dtype=np.float32)
    for step in (64, 32, 16, 8, 4, 2, 1):
        cp = code[pivot]
        gt = xn > cp
        lower_pivot = np.where(gt, pivot, lower_pivot)
        lower = np.where(gt, cp, lower).astype(np.float32)
        upper_pivot = np.where(gt, upper_pivot, pivot)
        upper = np.where(gt, upper, cp).astype(np.float32)
        pivot = np.where(gt, pivot + step, pivot - step)
    upper = np.where(upper_pivot == 255, code[255], upper).astype(np.float32)
    lower = np.where(lower_pivot == 0, code[0], lower).astype(np.float32)
    val = code[pivot]
    half = np.float32(0.5)
    up_mid = ((upper + val).astype(np.float32) * half).astype(np.float32)
    lo_mid = ((lower + val).astype(np.float32) * half).astype(np.float32)
    res = np.where(xn > val, np.where(xn > up_mid, upper_pivot, pivot),
                   np.where(xn < lo_mid, lower_pivot, pivot))
    return res.astype(np.uint8)


def cuda_rule_blockwise8(x_f32_flat, absmax, code, blocksize):
    blk = np.arange(x_f32_flat.size) // blocksize
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1.0) / absmax.astype(np.float32)).astype(np.float32)
        xn = (x_f32_flat.astype(np.float32) * inv[blk]).astype(np.float32)
    return cuda_rule_8bit(xn, code)


# --------------------------------------------------------------------------- inputs
THRESH_SCALES = [1.0, 4.0, 0.5, 0.125]  # absmax of consecutive blocks (powers of two)


def threshold_values(quant_type, dtype):
    """Normalized values (|v| <= 1) on and around every decision threshold, exact in `dtype`.
    Returns (values, exact_info) where exact_info lists thresholds and whether exact."""
    vals = []
    info = []
    if quant_type == "nf4":
        ths = [("nf4_mid", float(t)) for t in nf4_thresholds()]
        code = F.get_4bit_type("nf4", device=CPU).float().numpy()
    else:
        ths = []
        for t in FP4_CUDA_LITERALS:
            ths += [("fp4_cuda_literal", float(t)), ("fp4_cuda_literal", -float(t))]
        for t in fp4_midpoints():
            if not any(float(t) == v for _, v in ths):
                ths += [("fp4_midpoint", float(t)), ("fp4_midpoint", -float(t))]
        code = F.get_4bit_type("fp4", device=CPU).float().numpy()
    for kind, t in ths:
        below, exact, above = representable_neighbours(t, dtype)
        vals += [below] + ([exact] if exact is not None else []) + [above]
        info.append({"kind": kind, "t": t, "exact_in_dtype": exact is not None})
    # codebook values themselves, signed zeros, tiny values
    cvals = [float(c) for c in code]
    tiny = [1e-3, -1e-3, 2.0 ** -10, -(2.0 ** -10)]
    extra = []
    for v in cvals + tiny:
        below, exact, above = representable_neighbours(v, dtype) if v != 0 else (None, 0.0, None)
        rv = exact if exact is not None else (below if abs(below - v) <= abs(above - v) else above)
        extra.append(rv)
    extra += [0.0, -0.0]
    vals += extra
    return vals, info


def build_thresh_case(quant_type, dtype, bs):
    vals, info = threshold_values(quant_type, dtype)
    out = []
    i = 0
    b = 0
    per = bs - 1
    while i < len(vals):
        s = THRESH_SCALES[b % len(THRESH_SCALES)]
        chunk = vals[i:i + per]
        marker = s if b % 2 == 0 else -s  # |marker| = absmax of the block
        out.append(marker)
        out += [v * s for v in chunk]
        i += per
        b += 1
    return np.array(out, dtype=np.float64), info


TIES_MAX_BLOCKSIZE = 256
_TIES_CACHE = {}


def _dtype_candidates_1_2(dtype):
    """Candidate absmax values in [1, 2) exactly representable in dtype (f32: a fixed sample)."""
    if dtype == "float16":
        return np.arange(0x3C00, 0x4000, dtype=np.uint16).view(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (np.arange(0x3F80, 0x4000, dtype=np.uint32) << 16).astype(np.uint32).view(np.float32)
    r = np.random.Generator(np.random.PCG64(424242))
    bits = r.integers(0x3F800001, 0x40000000, 4096, dtype=np.int64).astype(np.uint32)
    return np.unique(bits).view(np.float32)


def _round_to_dtype(v, dtype):
    v = np.asarray(v, dtype=np.float32)
    if dtype == "float32":
        return v
    if dtype == "float16":
        return v.astype(np.float16).astype(np.float32)
    return torch.from_numpy(v.copy()).to(torch.bfloat16).float().numpy()


def _ulp_steps(v, dtype, k):
    """v (positive, exact in dtype) moved by k units in the last place of dtype."""
    v = np.asarray(v, dtype=np.float32)
    if dtype == "float32":
        return (v.view(np.int32) + k).view(np.float32)
    if dtype == "float16":
        return (v.astype(np.float16).view(np.int16) + k).view(np.float16).astype(np.float32)
    return ((v.view(np.int32) >> 16) + k).astype(np.int32).__lshift__(16).view(np.float32)


def tie_pairs(quant_type, dtype):
    """Exact ties with a NON-power-of-two absmax: pairs (a, x), both exact in `dtype`, 0 < |x| < a,
    with f32(x * f32(1/a)) == T exactly for a decision threshold T (NF4: the 15 midpoints;
    FP4: the CUDA literals and the f32 midpoints, both signs). Greedy cover of the thresholds
    with few absmax values. Returns (list of (a, [x...])), list of thresholds without any tie)."""
    key = (quant_type, dtype)
    if key in _TIES_CACHE:
        return _TIES_CACHE[key]
    if quant_type == "nf4":
        ths = [float(t) for t in nf4_thresholds()]
    else:
        mags = sorted(set([float(t) for t in FP4_CUDA_LITERALS] + [float(t) for t in fp4_midpoints()]))
        ths = mags + [-m for m in mags]
    A = _dtype_candidates_1_2(dtype)
    R = (np.float32(1.0) / A).astype(np.float32)
    found = {}  # T -> {a: x}
    for T in ths:
        m = np.float32(abs(T))
        base = _round_to_dtype(A.astype(np.float64) * float(m), dtype)
        for k in (-2, -1, 0, 1, 2):
            X = _ulp_steps(base, dtype, k)
            ok = ((X * R).astype(np.float32) == m) & (X < A) & (X > 0)
            for a, x in zip(A[ok], X[ok]):
                found.setdefault(T, {})[float(a)] = float(np.copysign(x, T))
    chosen = []
    uncovered = [T for T in ths if T in found]
    while uncovered:
        counts = {}
        for T in uncovered:
            for a in found[T]:
                counts[a] = counts.get(a, 0) + 1
        a = max(sorted(counts), key=lambda k: counts[k])
        xs = [found[T][a] for T in uncovered if a in found[T]]
        chosen.append((a, xs))
        uncovered = [T for T in uncovered if a not in found[T]]
    res = (chosen, [T for T in ths if T not in found])
    _TIES_CACHE[key] = res
    return res


def build_ties_case(quant_type, dtype, bs):
    """Full blocks only (bnb CPU multiplies by the f32 reciprocal only in full blocks; the tail
    block divides). Block = [+-a] + tie values for a, cycled to fill the block."""
    chosen, _ = tie_pairs(quant_type, dtype)
    out = []
    for i, (a, xs) in enumerate(chosen):
        for j in range(0, len(xs), bs - 1):
            chunk = xs[j:j + bs - 1]
            fill = [chunk[k % len(chunk)] for k in range(bs - 1)]
            out += [a if (len(out) // bs) % 2 == 0 else -a] + fill
    return np.array(out, dtype=np.float64)


def rng_for(case_id, bs):
    return np.random.Generator(np.random.PCG64(1_000_003 * case_id + bs))


def build_cases(quant_type, dtype, bs):
    """Return list of (case_name, float64 ndarray with its shape)."""
    cases = []
    thr, _ = build_thresh_case(quant_type, dtype, bs)
    cases.append(("thresh", thr))
    if bs <= TIES_MAX_BLOCKSIZE and tie_pairs(quant_type, dtype)[0]:
        cases.append(("ties", build_ties_case(quant_type, dtype, bs)))
    r = rng_for(1, bs)
    cases.append(("normal_tail", r.standard_normal(bs + bs // 2 + 2)))
    r = rng_for(2, bs)
    cases.append(("laplace_odd", r.laplace(0.0, 0.5, bs + 7)))
    r = rng_for(3, bs)
    cases.append(("student_t", r.standard_t(2.5, bs)))
    r = rng_for(4, bs)
    z = np.zeros(bs + 5)
    z[bs:] = r.standard_normal(5)
    cases.append(("zero_block", z))
    r = rng_for(5, bs)
    cases.append(("rows2d", 0.02 * r.standard_normal((3, bs // 4 + 3))))
    r = rng_for(6, bs)
    cases.append(("small_odd", r.standard_normal(7)))
    cases.append(("zeros_odd", np.zeros(7)))
    if bs == 32:
        r = rng_for(7, bs)
        n = bs * 259 + 9  # 260 blocks -> 2 nested blocks (256 + 4)
        scale = 2.0 ** np.linspace(-4.0, 4.0, n)
        cases.append(("many_blocks", r.standard_normal(n) * scale))
    return cases


def to_dtype(a64, dtype):
    return torch.from_numpy(np.ascontiguousarray(a64)).to(torch.float32).to(DTYPES[dtype])


# --------------------------------------------------------------------------- 4-bit
def reconstruct_absmax(state):
    """absmax_f32[j] = f32(f32(code2[q[j]] * nested_absmax[j // 256]) + offset)."""
    q = state.absmax.long()
    nb = q.numel()
    s2 = state.state2
    na = s2.absmax.float().repeat_interleave(s2.blocksize)[:nb]
    out = (s2.code.float()[q] * na) + state.offset.float()
    return out.float()


def gen_4bit_file(dtype, quant_type, dq, outdir, summary):
    tensors = {}
    stats = {"file": None, "cases": [], "nested_codes_total": 0, "nested_codes_differ_cuda_rule": 0,
             "codes_total": 0, "codes_differ_cuda_rule": 0, "zero_blocks": 0,
             "bnb_cpu_dequantize_4bit_mismatches": 0, "bnb_cpu_dequantize_4bit_value_mismatches": 0}
    code = F.get_4bit_type(quant_type, device=CPU).float()
    tensors["quant_map"] = code.clone()
    if dq:
        tensors["nested_quant_map"] = F.create_dynamic_map(signed=True).float().cpu()
    thresh_info = None
    for bs in BLOCKSIZES:
        for case, a64 in build_cases(quant_type, dtype, bs):
            if case == "thresh" and thresh_info is None:
                _, thresh_info = build_thresh_case(quant_type, dtype, bs)
            x = to_dtype(a64, dtype)
            shape = tuple(x.shape)
            n = x.numel()
            nb = (n + bs - 1) // bs
            packed, st = F.quantize_4bit(x, blocksize=bs, compress_statistics=dq, quant_type=quant_type)
            assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((n + 1) // 2, 1)
            p = f"bs{bs}.{case}."
            tensors[p + "input"] = x.contiguous()
            tensors[p + "packed"] = packed.contiguous()
            d = st.as_dict(packed=True)
            blob_key = f"quant_state.bitsandbytes__{quant_type}"
            tensors[p + "quant_state"] = d[blob_key].contiguous()
            assert torch.equal(d["quant_map"], code)
            # raw (un-double-quantized) absmax: the 4-bit kernel output; identical with and without DQ
            p_raw, st_raw = F.quantize_4bit(x, blocksize=bs, compress_statistics=False, quant_type=quant_type)
            assert torch.equal(p_raw, packed)
            absmax_raw = st_raw.absmax.float()
            if dq:
                assert st.absmax.dtype == torch.uint8 and st.absmax.numel() == nb
                tensors[p + "absmax"] = st.absmax.contiguous()
                tensors[p + "absmax_raw"] = absmax_raw.contiguous()
                tensors[p + "nested_absmax"] = st.state2.absmax.float().contiguous()
                tensors[p + "nested_offset"] = st.offset.float().reshape(1).contiguous()
                absmax_f32 = reconstruct_absmax(st)
                # cross-check with bnb's own path (dequantize_blockwise + offset)
                chk = F.dequantize_blockwise(st.absmax, st.state2).float() + st.offset
                assert torch.equal(chk.view(torch.int32), absmax_f32.view(torch.int32)), "absmax reconstruction"
                tensors[p + "absmax_f32"] = absmax_f32.contiguous()
                # CUDA-rule nested codes for the same (absmax_raw - offset) and nested absmax
                centered = (absmax_raw - st.offset.float()).numpy().astype(np.float32)
                exact = cuda_rule_blockwise8(centered, st.state2.absmax.float().numpy(),
                                             st.state2.code.float().numpy(), NESTED_BLOCKSIZE)
                # nested absmax as CUDA computes it (max |centered| per 256-block)
                nab = np.array([np.abs(centered[i:i + 256]).max() for i in range(0, nb, 256)], dtype=np.float32)
                assert np.array_equal(nab, st.state2.absmax.float().numpy()), "nested absmax"
                ndiff = int((exact != st.absmax.numpy()).sum())
                stats["nested_codes_total"] += nb
                stats["nested_codes_differ_cuda_rule"] += ndiff
                if ndiff:
                    tensors[p + "nested_codes_cuda"] = torch.from_numpy(exact)
            else:
                assert st.absmax.dtype == torch.float32
                tensors[p + "absmax"] = st.absmax.contiguous()
                absmax_f32 = st.absmax.float()
            # dequantization with bnb's default-backend reference math
            deq = _deq4_compute(packed.reshape(-1), absmax_f32, code, bs, shape, DTYPES[dtype])
            deq32 = _deq4_compute(packed.reshape(-1), absmax_f32, code, bs, shape, torch.float32)
            tensors[p + "dequant"] = deq.contiguous()
            tensors[p + "dequant_f32"] = deq32.contiguous()
            # bnb's public CPU dequantize_4bit (informational: known to be wrong for some shapes)
            try:
                pub = F.dequantize_4bit(packed, st)
                pb = pub.reshape(shape).float()
                bad = pb.view(torch.int32) != deq.float().view(torch.int32)
                if bad.any():
                    stats["bnb_cpu_dequantize_4bit_mismatches"] += 1
                    if bool((pb[bad] != deq.float()[bad]).any()):
                        stats["bnb_cpu_dequantize_4bit_value_mismatches"] += 1
            except Exception:  # noqa: BLE001
                stats["bnb_cpu_dequantize_4bit_mismatches"] += 1
            # CUDA rule (with IEEE reciprocal) applied to the same input; CUDA's absmax is the
            # plain per-block max |x| (bnb CPU stores 1e-38 for an all-zero *tail* block).
            xf = x.float().reshape(-1).numpy()
            absmax_cuda = np.array([np.abs(xf[i * bs:(i + 1) * bs]).max() for i in range(nb)], dtype=np.float32)
            if not np.array_equal(absmax_cuda.view(np.uint32), absmax_raw.numpy().view(np.uint32)):
                tensors[p + "absmax_cuda"] = torch.from_numpy(absmax_cuda)
            cu = cuda_rule_4bit(xf, absmax_cuda, bs, quant_type)
            bnbp = packed.reshape(-1).numpy()
            hi_d = ((cu >> 4) != (bnbp >> 4))
            lo_d = ((cu & 15) != (bnbp & 15))
            pad_diff = bool(n % 2 and lo_d[-1])
            if n % 2:
                lo_d[-1] = False  # pad nibble: reported separately
            ncode_diff = int(hi_d.sum() + lo_d.sum())
            zb = int((absmax_cuda == 0).sum())
            stats["zero_blocks"] += zb
            stats["codes_total"] += n
            stats["codes_differ_cuda_rule"] += ncode_diff
            if not np.array_equal(cu, bnbp):
                tensors[p + "packed_cuda"] = torch.from_numpy(cu).reshape(-1, 1)
            # sign-of-zero differences of bnb's CPU C++ dequantize_4bit vs the reference math
            # are counted in bnb_cpu_dequantize_4bit_mismatches above.
            stats["cases"].append({"key": p[:-1], "shape": list(shape), "blocks": nb,
                                   "zero_blocks": zb, "codes_differ_cuda_rule": ncode_diff,
                                   "pad_nibble_differs_cuda_rule": pad_diff,
                                   "packed_cuda_differs": bool(not np.array_equal(cu, bnbp))})
    name = f"{dtype}-{quant_type}-{'dq' if dq else 'nodq'}.safetensors"
    stats["file"] = name
    meta = {
        "generator": "tools/gen_codec_vectors.py",
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "dtype": dtype, "quant_type": quant_type, "double_quant": str(dq).lower(),
        "blocksizes": BLOCKSIZES,
        "thresholds": thresh_info,
        "ties": {"absmax_and_values": tie_pairs(quant_type, dtype)[0],
                 "thresholds_without_tie": tie_pairs(quant_type, dtype)[1]},
        "stats": {k: v for k, v in stats.items() if k != "cases"},
        "cases": stats["cases"],
    }
    save_file(tensors, os.path.join(outdir, name), metadata=meta)
    summary.append(stats)
    print(f"{name}: {len(tensors)} tensors, {os.path.getsize(os.path.join(outdir, name))} bytes, "
          f"codes differing from CUDA rule {stats['codes_differ_cuda_rule']}/{stats['codes_total']}, "
          f"nested codes differing {stats['nested_codes_differ_cuda_rule']}/{stats['nested_codes_total']}, "
          f"zero blocks {stats['zero_blocks']}, bnb CPU dequantize_4bit mismatching cases "
          f"{stats['bnb_cpu_dequantize_4bit_mismatches']} (by value: "
          f"{stats['bnb_cpu_dequantize_4bit_value_mismatches']})", flush=True)
    return thresh_info


# --------------------------------------------------------------------------- 8-bit
def gen_8bit_file(outdir, summary):
    sm = F.create_dynamic_map(signed=True).float().cpu()
    um = F.create_dynamic_map(signed=False).float().cpu()
    tensors = {"dynamic_map_signed": sm, "dynamic_map_unsigned": um}
    bs = 256
    cases = []
    r = np.random.Generator(np.random.PCG64(8001))
    cases.append(("signed", "normal_tail", "float32", r.standard_normal(1000)))
    r = np.random.Generator(np.random.PCG64(8002))
    wide = r.standard_normal(768) * 10.0 ** r.uniform(-6, 0, 768)
    cases.append(("signed", "wide", "float32", wide))
    # exact f32 midpoints between adjacent signed-map entries (ties), absmax 1.0 marker per block
    smn = sm.numpy().astype(np.float32)
    mids = ((smn[:-1] + smn[1:]).astype(np.float32) * np.float32(0.5)).astype(np.float32)
    tie_blocks = []
    for i in range(0, mids.size, 255):
        tie_blocks.append(np.concatenate([[1.0], mids[i:i + 255].astype(np.float64)]))
    cases.append(("signed", "ties", "float32", np.concatenate(tie_blocks)))
    z = np.zeros(2 * bs + 10)
    r = np.random.Generator(np.random.PCG64(8003))
    z[:bs] = r.standard_normal(bs)
    z[2 * bs:] = r.standard_normal(10)
    cases.append(("signed", "zero_block", "float32", z))
    r = np.random.Generator(np.random.PCG64(8004))
    cases.append(("signed", "normal_f16", "float16", r.standard_normal(600)))
    r = np.random.Generator(np.random.PCG64(8005))
    cases.append(("signed", "normal_bf16", "bfloat16", r.standard_normal(600)))
    r = np.random.Generator(np.random.PCG64(8006))
    cases.append(("unsigned", "uniform", "float32", r.uniform(0.0, 1.0, 1000) ** 4))
    umn = um.numpy().astype(np.float32)
    umids = ((umn[:-1] + umn[1:]).astype(np.float32) * np.float32(0.5)).astype(np.float32)
    ub = []
    for i in range(0, umids.size, 255):
        ub.append(np.concatenate([[1.0], umids[i:i + 255].astype(np.float64)]))
    cases.append(("unsigned", "ties", "float32", np.concatenate(ub)))
    stats = {"file": "blockwise8.safetensors", "cases": []}
    for mapname, case, dtype, a64 in cases:
        code = sm if mapname == "signed" else um
        x = to_dtype(a64, dtype)
        q, st = F.quantize_blockwise(x, code=code, blocksize=bs)
        p = f"{mapname}.{case}."
        tensors[p + "input"] = x.contiguous()
        tensors[p + "codes"] = q.contiguous()
        tensors[p + "absmax"] = st.absmax.float().contiguous()
        deq = F.dequantize_blockwise(q, st)  # output dtype = input dtype
        # reference: code[q] * absmax[i // bs] in f32, then cast
        blk = torch.arange(x.numel()) // bs
        ref32 = code[q.reshape(-1).long()] * st.absmax.float()[blk]
        assert torch.equal(deq.reshape(-1).float().view(torch.int32),
                           ref32.to(DTYPES[dtype]).float().view(torch.int32)), "8-bit dequant"
        tensors[p + "dequant"] = deq.contiguous()
        tensors[p + "dequant_f32"] = ref32.contiguous()
        exact = cuda_rule_blockwise8(x.float().reshape(-1).numpy(), st.absmax.float().numpy(),
                                     code.numpy(), bs)
        # CUDA's absmax (max |x|) must equal bnb CPU's
        nb = st.absmax.numel()
        xa = x.float().reshape(-1).abs().numpy()
        am = np.array([xa[i * bs:(i + 1) * bs].max() for i in range(nb)], dtype=np.float32)
        assert np.array_equal(am, st.absmax.float().numpy())
        tensors[p + "codes_cuda"] = torch.from_numpy(exact)
        nd = int((exact != q.reshape(-1).numpy()).sum())
        stats["cases"].append({"key": p[:-1], "n": x.numel(), "codes_differ_cuda_rule": nd})
        print(f"blockwise8 {p[:-1]}: {nd}/{x.numel()} codes differ from CUDA rule", flush=True)
    meta = {"generator": "tools/gen_codec_vectors.py", "bitsandbytes": bitsandbytes.__version__,
            "torch": torch.__version__, "blocksize": bs, "cases": stats["cases"]}
    save_file(tensors, os.path.join(outdir, "blockwise8.safetensors"), metadata=meta)
    summary.append(stats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata", "codec"))
    args = ap.parse_args()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    summary = []
    thresholds = {}
    for dtype in DTYPES:
        for qt in QUANT_TYPES:
            for dq in (False, True):
                info = gen_4bit_file(dtype, qt, dq, args.out, summary)
                thresholds[f"{dtype}-{qt}"] = {"power_of_two_absmax": info,
                                               "ties_non_power_of_two_absmax": {
                                                   "absmax_and_values": tie_pairs(qt, dtype)[0],
                                                   "thresholds_without_tie": tie_pairs(qt, dtype)[1]}}
    gen_8bit_file(args.out, summary)
    # human-readable summary (also used to write testdata/README.md by hand)
    with open(os.path.join(args.out, "SUMMARY.json"), "w") as f:
        json.dump({"versions": {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
                                "numpy": np.__version__, "python": sys.version.split()[0]},
                   "files": [{**{k: v for k, v in st.items() if k != "cases"},
                              "cases_differing_from_cuda_rule": [
                                  c for c in st["cases"]
                                  if c.get("packed_cuda_differs") or c.get("codes_differ_cuda_rule")]}
                             for st in summary],
                   "thresholds": thresholds}, f, indent=1, sort_keys=False)
        f.write("\n")


if __name__ == "__main__":
    main()
