#!/usr/bin/env python3
"""Generate tiny transformers checkpoints (bf16 and bnb NF4 + double quant) and reference
dequantizations / logits under testdata/checkpoints/, with the REAL transformers +
bitsandbytes on CPU.

Usage (from the repository root):
    /work/venv/bin/python tools/gen_checkpoint_vectors.py [--out testdata/checkpoints]
    /work/venv/bin/python tools/gen_checkpoint_vectors.py --check-ours DIR [--atol X | --exact]

--check-ours DIR loads a 4-bit folder (e.g. one written by our Rust tool) with transformers,
computes logits for the fixed input_ids and compares them with the stored logits of the bnb
4-bit model (tiny-llama-logits.safetensors, key logits_nf4). It prints the max abs difference
and a per-tensor comparison with the bnb folder, and exits non-zero on mismatch.

bitsandbytes 0.50.2's CPU dequantize_4bit (AVX-512 C++ kernel) is wrong for weights whose
last dimension is a multiple of 16 but not of the blocksize (here: down_proj, [64, 176]);
see testdata/README.md. This script therefore replaces the CPU kernel of the op
bitsandbytes::dequantize_4bit by bnb's own reference math (backends/default/ops.py
_dequantize_4bit_compute) before running any 4-bit forward pass, so the logits are
machine-independent and equal what the CUDA kernels compute.

Deterministic (fixed seeds); installs nothing.
"""
import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import numpy as np
import torch

import bitsandbytes
import bitsandbytes.functional as F
import transformers
from bitsandbytes.backends.default import ops as default_ops
from bitsandbytes.backends.utils import _get_4bit_code
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_codec_vectors import cuda_rule_blockwise8, save_file  # noqa: E402

SEED = 20261129
_deq4_compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__",
                        default_ops._dequantize_4bit_compute)


def tiny_config():
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
    )


def bnb_config():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def input_ids():
    i = torch.arange(2 * 16, dtype=torch.int64).reshape(2, 16)
    return (i * 37 + 11) % 256


def _ref_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    code = _get_4bit_code(quant_type, A.device)
    return _deq4_compute(A.reshape(-1), absmax.float(), code, blocksize, shape, dtype)


def patch_cpu_dequantize_4bit():
    """Route bitsandbytes::dequantize_4bit on CPU to bnb's reference math (see module doc)."""
    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _ref_dequantize_4bit)


def disable_cpu_repacking(model):
    """bnb 0.50.2's Linear4bit.forward repacks the weight for its AVX512-BF16 CPU GEMM on CPUs that
    have AVX512-BF16 (absmax converted to bf16 = lossy; needs out_features % 32 == 0 and
    in_features % blocksize == 0, else AssertionError). Turn it off so the forward is
    machine-independent: gemm_4bit default impl = dequantize (nested absmax in f32) + F.linear."""
    import bitsandbytes.nn as bnn
    n = 0
    for m in model.modules():
        if isinstance(m, bnn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_folder_tensors(folder):
    out = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fn), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
    return out


def dequant_from_tensors(t, name):
    """Reference dequantization of one serialized Linear4bit weight `name` (e.g. 'model...q_proj.weight')."""
    blob_key = [k for k in t if k.startswith(name + ".quant_state.bitsandbytes__")][0]
    meta = json.loads(bytes(t[blob_key].tolist()).decode("utf-8"))
    absmax = t[name + ".absmax"]
    if "nested_offset" in meta:
        q = absmax.long()
        na = t[name + ".nested_absmax"].float().repeat_interleave(meta["nested_blocksize"])[:q.numel()]
        absmax = (t[name + ".nested_quant_map"].float()[q] * na) + torch.tensor(float(meta["nested_offset"]),
                                                                               dtype=torch.float32)
    code = _get_4bit_code(meta["quant_type"], torch.device("cpu"))
    return _deq4_compute(t[name].reshape(-1).view(torch.uint8), absmax.float(), code, meta["blocksize"],
                         tuple(meta["shape"]), getattr(torch, meta["dtype"])), meta


@torch.no_grad()
def logits_of(model):
    return model(input_ids=input_ids()).logits.float()


def generate(out):
    os.makedirs(out, exist_ok=True)
    bf16_dir = os.path.join(out, "tiny-llama-bf16")
    nf4_dir = os.path.join(out, "tiny-llama-nf4-dq")
    for d in (bf16_dir, nf4_dir):
        if os.path.isdir(d):
            shutil.rmtree(d)

    # 1. bf16 model, sharded
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(tiny_config()).to(torch.bfloat16).eval()
    model.save_pretrained(bf16_dir, max_shard_size="100KB", safe_serialization=True)
    shards = [f for f in os.listdir(bf16_dir) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and os.path.exists(os.path.join(bf16_dir, "model.safetensors.index.json")), shards

    # 2. load with load_in_4bit on CPU (transformers quantizes at load) and save
    # Quantization at load uses bnb's CPU path (quantize_4bit default backend + C++ 8-bit nested quantizer).
    model4 = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=bnb_config(),
                                                  device_map="cpu", dtype=torch.bfloat16).eval()
    model4.save_pretrained(nf4_dir, safe_serialization=True)
    assert disable_cpu_repacking(model4) == 14

    # 3. reference dequantization of every quantized weight (bf16, original names)
    t4 = load_folder_tensors(nf4_dir)
    tb = load_folder_tensors(bf16_dir)
    names = sorted(k.rsplit(".quant_state.", 1)[0] for k in t4 if ".quant_state.bitsandbytes__" in k)
    deq = {}
    report = {"quantized_weights": len(names), "codes_equal_to_quantize_4bit_of_bf16": True,
              "nested_codes_total": 0, "nested_codes_differ_cuda_rule": 0, "per_weight": {}}
    for name in names:
        w, meta = dequant_from_tensors(t4, name)
        assert w.dtype == torch.bfloat16 and tuple(w.shape) == tuple(tb[name].shape)
        deq[name] = w.contiguous()
        # re-quantize the bf16 weight with bnb and compare; count nested codes vs CUDA rule
        p_raw, st_raw = F.quantize_4bit(tb[name], blocksize=meta["blocksize"], compress_statistics=False,
                                        quant_type=meta["quant_type"])
        same = torch.equal(p_raw, t4[name])
        report["codes_equal_to_quantize_4bit_of_bf16"] &= same
        centered = (st_raw.absmax.float() - torch.tensor(float(meta["nested_offset"]), dtype=torch.float32))
        exact = cuda_rule_blockwise8(centered.numpy(), t4[name + ".nested_absmax"].float().numpy(),
                                     t4[name + ".nested_quant_map"].float().numpy(), meta["nested_blocksize"])
        nd = int((exact != t4[name + ".absmax"].numpy()).sum())
        report["nested_codes_total"] += exact.size
        report["nested_codes_differ_cuda_rule"] += nd
        bnbq = t4[name + ".absmax"].numpy()
        report["per_weight"][name] = {"shape": meta["shape"], "blocks": exact.size, "nested_codes_differ": nd,
                                      "nested_code_differences": [
                                          {"block": int(j), "bnb_cpu_code": int(bnbq[j]), "cuda_rule_code": int(exact[j])}
                                          for j in np.nonzero(exact != bnbq)[0]],
                                      "bnb_cpu_dequantize_4bit_wrong_elems": None}
    save_file(deq, os.path.join(out, "tiny-llama-nf4-dq.dequant.safetensors"),
              metadata={"generator": "tools/gen_checkpoint_vectors.py", "bitsandbytes": bitsandbytes.__version__,
                        "source": "tiny-llama-nf4-dq", "math": "bnb backends/default/ops.py _dequantize_4bit_compute"})

    # 4. logits. First record how wrong bnb's unpatched CPU dequantize_4bit is on this machine.
    for name in names:
        qs = model4.get_submodule(name.rsplit(".", 1)[0]).weight.quant_state
        pub = F.dequantize_4bit(model4.get_submodule(name.rsplit(".", 1)[0]).weight.data, qs)
        report["per_weight"][name]["bnb_cpu_dequantize_4bit_wrong_elems"] = int(
            (pub.reshape(deq[name].shape).view(torch.int16) != deq[name].view(torch.int16)).sum())
    logits_unpatched = logits_of(model4)
    patch_cpu_dequantize_4bit()
    logits_nf4 = logits_of(model4)
    # bf16 logits from the saved folder as transformers loads it (rotary inv_freq stays f32 there;
    # the in-memory model above had it cast to bf16 by .to(torch.bfloat16)).
    model_bf16 = AutoModelForCausalLM.from_pretrained(bf16_dir, device_map="cpu", dtype=torch.bfloat16).eval()
    logits_bf16 = logits_of(model_bf16)
    # self-check: the 4-bit forward == bf16 forward with the reference-dequantized weights
    ref_model = AutoModelForCausalLM.from_pretrained(bf16_dir, device_map="cpu", dtype=torch.bfloat16).eval()
    missing, unexpected = ref_model.load_state_dict(deq, strict=False)
    assert not unexpected
    logits_ref = logits_of(ref_model)
    assert torch.equal(logits_ref, logits_nf4), "4-bit forward != bf16 forward on dequantized weights"
    # reload the saved 4-bit folder and check it reproduces the same logits
    reloaded = AutoModelForCausalLM.from_pretrained(nf4_dir, device_map="cpu").eval()
    assert disable_cpu_repacking(reloaded) == 14
    logits_reloaded = logits_of(reloaded)
    assert torch.equal(logits_reloaded, logits_nf4), "reloaded 4-bit folder gives different logits"
    report["max_abs_logits_nf4_minus_bf16"] = float((logits_nf4 - logits_bf16).abs().max())
    report["max_abs_logits_bnb_cpu_unpatched_minus_nf4"] = float((logits_unpatched - logits_nf4).abs().max())
    report["max_abs_logits_bf16"] = float(logits_bf16.abs().max())
    save_file({"input_ids": input_ids(), "logits_bf16": logits_bf16.contiguous(), "logits_nf4": logits_nf4.contiguous()},
              os.path.join(out, "tiny-llama-logits.safetensors"),
              metadata={"generator": "tools/gen_checkpoint_vectors.py", "bitsandbytes": bitsandbytes.__version__,
                        "transformers": transformers.__version__, "torch": torch.__version__,
                        "logits_bf16": "tiny-llama-bf16, bf16 forward on CPU, values converted exactly to f32",
                        "logits_nf4": "tiny-llama-nf4-dq, compute dtype bf16, CPU, reference dequantization; "
                                      "values converted exactly to f32"})
    with open(os.path.join(out, "SUMMARY.json"), "w") as f:
        json.dump({"versions": {"bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
                                "torch": torch.__version__, "python": sys.version.split()[0]},
                   **report}, f, indent=1)
        f.write("\n")
    print(json.dumps(report, indent=1))


def compare_folder_tensors(ours, ref):
    """Per-tensor diagnostic comparison of two 4-bit folders (prints, returns nothing)."""
    to = load_folder_tensors(ours)
    tr = load_folder_tensors(ref)
    missing = sorted(set(tr) - set(to))
    extra = sorted(set(to) - set(tr))
    if missing:
        print(f"keys missing in {ours}: {missing}")
    if extra:
        print(f"extra keys in {ours}: {extra}")
    for k in sorted(set(tr) & set(to)):
        a, b = to[k], tr[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            print(f"{k}: dtype/shape {a.dtype}{tuple(a.shape)} vs reference {b.dtype}{tuple(b.shape)}")
            continue
        if a.dtype == torch.uint8 and k.endswith(".weight") and a.dim() == 2:
            av, bv = a.reshape(-1), b.reshape(-1)
            nib = int(((av >> 4) != (bv >> 4)).sum() + ((av & 15) != (bv & 15)).sum())
            if nib:
                print(f"{k}: {nib} of {2 * av.numel()} 4-bit codes differ")
        elif ".quant_state.bitsandbytes__" in k:
            if not torch.equal(a, b):
                print(f"{k}: JSON differs:\n  ours: {bytes(a.tolist()).decode()}\n  ref:  {bytes(b.tolist()).decode()}")
        elif not torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b):
            n = int((a != b).sum()) if a.dtype == b.dtype else -1
            print(f"{k}: {n} of {a.numel()} elements differ")


def check_ours(folder, ref_dir, atol, exact):
    patch_cpu_dequantize_4bit()
    ref = safe_open(os.path.join(ref_dir, "tiny-llama-logits.safetensors"), "pt")
    ids = ref.get_tensor("input_ids")
    want = ref.get_tensor("logits_nf4")
    bf16 = ref.get_tensor("logits_bf16")
    assert torch.equal(ids, input_ids())
    compare_folder_tensors(folder, os.path.join(ref_dir, "tiny-llama-nf4-dq"))
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    n4 = disable_cpu_repacking(model)
    print(f"{n4} Linear4bit modules")
    if n4 == 0:
        print(f"MISMATCH: {folder} has no bitsandbytes 4-bit layers")
        return 1
    got = logits_of(model)
    d = float((got - want).abs().max())
    scale = float((want - bf16).abs().max())
    print(f"max |logits(ours) - logits(bnb nf4)| = {d:.6g}  (bnb nf4 vs bf16 max diff: {scale:.6g}; "
          f"tolerance: {'exact' if exact else atol})")
    ok = (d == 0.0) if exact else (d <= atol)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "testdata", "checkpoints"),
                    help="output folder (generation) or reference folder (--check-ours)")
    ap.add_argument("--check-ours", metavar="DIR", help="compare a 4-bit folder against the stored references")
    ap.add_argument("--atol", type=float, default=0.01,
                    help="max allowed |logits diff| for --check-ours (default 0.01; see testdata/README.md)")
    ap.add_argument("--exact", action="store_true", help="--check-ours: require bit-identical logits")
    args = ap.parse_args()
    if args.check_ours:
        sys.exit(check_ours(args.check_ours, args.out, args.atol, args.exact))
    generate(args.out)


if __name__ == "__main__":
    main()
