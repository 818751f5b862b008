#!/usr/bin/env python3
"""Generate PEFT reference vectors for crates/lora under testdata/peft/, with the REAL peft,
transformers and bitsandbytes on CPU, from the tiny random Llama in testdata/checkpoints/.

Usage (from the repository root):
    /work/venv/bin/python tools/gen_peft_vectors.py [--out testdata/peft]
    /work/venv/bin/python tools/gen_peft_vectors.py --check-ours DIR

Written (see testdata/README.md, section "peft"):
  adapters/{lora,rslora,dora}/   PEFT adapter folders (adapter_config.json, adapter_model.safetensors)
  merged-bf16-{name}.safetensors merge_and_unload() on the bf16 base: "<module>.weight" (BF16) per
                                 adapted module
  base-nf4.safetensors           the 4-bit base (tiny-llama-nf4-dq) as plain tensors per module:
                                 "<module>.packed" U8, ".absmax_codes" U8, ".nested_absmax" F32,
                                 ".offset" F32[1]; metadata: blocksize, quant_type, dtype, shapes
  merged-nf4-{name}.safetensors  merge_and_unload() on the 4-bit base, same layout
  layer-{lora,rslora,dora}.safetensors  one PEFT LoRA layer over an f32 nn.Linear
                                 (64 -> 48): x, W, bias, A, B, [m], gy, y, dx, dA, dB, [dm]
  layer-nf4.safetensors          one PEFT lora.Linear4bit (bnb nf4 + double quant, f32 compute)
                                 in train mode: x, A, B, gy, y, dx, dA, dB, bias and the base as
                                 "W4.*" tensors as above; layer-nf4.json holds its quant metadata

--check-ours DIR: every sub-folder of DIR is an adapter folder written by our Rust code (e.g. by
`cargo run -p qlora-lora --example resave_adapters -- DIR`). Each is loaded with
PeftModel.from_pretrained on the bf16 tiny Llama; the script checks that no key is missing or
unexpected, that the loaded tensors equal PEFT's own adapter of the same name bit for bit, that
merge_and_unload gives the same weights, and reports whether the safetensors bytes are identical.
Exits non-zero on any mismatch.

bitsandbytes 0.50.2 on CPU: dequantize_4bit's C++ kernel is wrong for down_proj ([64, 176]), so
the op is routed to bnb's reference math (as tools/gen_checkpoint_vectors.py does), and the
AVX512-BF16 repacking is disabled; the quantizer is bnb's PyTorch default backend (all-zero
blocks -> 0x77; approximate 8-bit double-quant rounding, docs bitsandbytes.md 2.6/11).
"""
import argparse
import copy
import json
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
from torch import nn

import bitsandbytes as bnb
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_checkpoint_vectors import disable_cpu_repacking, patch_cpu_dequantize_4bit  # noqa: E402

SEED = 20261129
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CKPT = os.path.join(ROOT, "testdata", "checkpoints")


def configs():
    return {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                           task_type="CAUSAL_LM"),
        "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 32},
                             init_lora_weights=False, task_type="CAUSAL_LM"),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM"),
    }


def load_bf16():
    return AutoModelForCausalLM.from_pretrained(os.path.join(CKPT, "tiny-llama-bf16"), dtype=torch.bfloat16)


def load_nf4():
    patch_cpu_dequantize_4bit()
    m = AutoModelForCausalLM.from_pretrained(os.path.join(CKPT, "tiny-llama-nf4-dq"), device_map="cpu")
    disable_cpu_repacking(m)
    return m


def lora_modules(peft_model):
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = mod
    return out


def q4_tensors(prefix, weight):
    qs = weight.quant_state
    t = {f"{prefix}.packed": weight.data.reshape(-1).view(torch.uint8).contiguous()}
    meta = {"blocksize": qs.blocksize, "quant_type": qs.quant_type, "dtype": str(qs.dtype).removeprefix("torch."),
            "shape": list(qs.shape), "nested": bool(qs.nested)}
    if qs.nested:
        t[f"{prefix}.absmax_codes"] = qs.absmax.contiguous()
        t[f"{prefix}.nested_absmax"] = qs.state2.absmax.float().contiguous()
        t[f"{prefix}.offset"] = qs.offset.reshape(1).float().contiguous()
        meta["nested_blocksize"] = qs.state2.blocksize
    else:
        t[f"{prefix}.absmax"] = qs.absmax.float().contiguous()
    return t, meta


def save_adapters(out):
    adir = os.path.join(out, "adapters")
    for name, cfg in configs().items():
        torch.manual_seed(SEED)
        pm = get_peft_model(load_bf16(), cfg)
        if name == "dora":
            with torch.no_grad():
                for mod in lora_modules(pm).values():
                    w = mod.lora_magnitude_vector["default"].weight
                    w.mul_(1 + 0.2 * torch.randn_like(w))
        d = os.path.join(adir, name)
        pm.peft_config["default"].base_model_name_or_path = "testdata/checkpoints/tiny-llama-bf16"
        pm.save_pretrained(d)
        readme = os.path.join(d, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        # merge on the bf16 base
        merged = PeftModel.from_pretrained(load_bf16(), d).merge_and_unload()
        sd = merged.state_dict()
        keys = sorted(lora_modules(PeftModel.from_pretrained(load_bf16(), d)).keys())
        save_file({f"{k}.weight": sd[f"{k}.weight"].contiguous() for k in keys},
                  os.path.join(out, f"merged-bf16-{name}.safetensors"), metadata={"format": "pt"})
        # merge on the 4-bit base
        pm4 = PeftModel.from_pretrained(load_nf4(), d)
        pm4.train()
        keys4 = sorted(lora_modules(pm4).keys())
        merged4 = pm4.merge_and_unload()
        tensors, metas = {}, {}
        mods = dict(merged4.named_modules())
        for k in keys4:
            t, meta = q4_tensors(k, mods[k].weight)
            tensors.update(t)
            metas[k] = meta
        save_file(tensors, os.path.join(out, f"merged-nf4-{name}.safetensors"),
                  metadata={"format": "pt", "modules": json.dumps(metas, sort_keys=True)})
        print(f"{name}: {len(keys)} modules; bf16 and nf4 merges written")
    # the 4-bit base itself
    m4 = load_nf4()
    tensors, metas = {}, {}
    for k, mod in m4.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            t, meta = q4_tensors(k, mod.weight)
            tensors.update(t)
            metas[k] = meta
    save_file(tensors, os.path.join(out, "base-nf4.safetensors"),
              metadata={"format": "pt", "modules": json.dumps(metas, sort_keys=True)})


class One(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def layer_case(out, name, cfg, lin, x, gy, extra=None, dora_scale=True):
    torch.manual_seed(SEED + 1)
    pm = get_peft_model(One(lin), cfg)
    pm.train()
    layer = pm.base_model.model.proj
    A = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    m = None
    if cfg.use_dora:
        m = layer.lora_magnitude_vector["default"].weight
        if dora_scale:
            with torch.no_grad():
                m.mul_(1 + 0.2 * torch.randn_like(m))
    x = x.clone().requires_grad_(True)
    y = pm(x)
    (y * gy).sum().backward()
    t = {"x": x.detach(), "gy": gy, "y": y.detach().float(), "dx": x.grad, "A": A.detach(), "B": B.detach(),
         "dA": A.grad, "dB": B.grad}
    if m is not None:
        t["m"] = m.detach()
        t["dm"] = m.grad
    t.update(extra or {})
    meta = {"format": "pt", "r": str(cfg.r), "lora_alpha": str(cfg.lora_alpha), "use_rslora": str(cfg.use_rslora),
            "use_dora": str(cfg.use_dora), "scaling": repr(layer.scaling["default"])}
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out, f"layer-{name}.safetensors"),
              metadata=meta)


def save_layers(out):
    torch.manual_seed(SEED)
    lin = nn.Linear(64, 48, bias=True)
    x = torch.randn(5, 64)
    gy = torch.randn(5, 48)
    base = {"W": lin.weight.detach().clone(), "bias": lin.bias.detach().clone()}
    for name, cfg in {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights=False),
        "rslora": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["proj"], init_lora_weights=False),
        "dora": LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["proj"], init_lora_weights=False),
    }.items():
        layer_case(out, name, cfg, copy.deepcopy(lin), x, gy, base)
    # 4-bit base: bnb Linear4bit, nf4 + double quant, f32 compute, train mode
    patch_cpu_dequantize_4bit()
    l4 = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                           quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, compress_statistics=True,
                                  quant_type="nf4")
    l4.bias = nn.Parameter(lin.bias.detach().clone())
    l4 = l4.to("cpu")
    l4.support_avx512bf16_for_cpu = False
    q, meta = q4_tensors("W4", l4.weight)
    q["bias"] = lin.bias.detach().clone()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], init_lora_weights=False)
    layer_case(out, "nf4", cfg, l4, x, gy, q)
    with open(os.path.join(out, "layer-nf4.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def check_ours(d):
    ok = True
    ref_dir = os.path.join(ROOT, "testdata", "peft", "adapters")
    for name in sorted(os.listdir(d)):
        ours = os.path.join(d, name)
        ref = os.path.join(ref_dir, name)
        if not os.path.isdir(ours):
            continue
        pm = PeftModel.from_pretrained(load_bf16(), ours)
        mods = lora_modules(pm)
        with safe_open(os.path.join(ref, "adapter_model.safetensors"), "pt") as f:
            want = {k: f.get_tensor(k) for k in f.keys()}
        got = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items() if "lora_" in k}
        n_eq = 0
        for k, v in want.items():
            mk = k.removeprefix("base_model.model.")
            if mk.endswith(".lora_magnitude_vector"):
                mk += ".default.weight"
            else:
                mk = mk.replace(".weight", ".default.weight")
            if mk not in got or not torch.equal(got[mk].float(), v.float()):
                print(f"  {name}: {k} missing or different after loading ours")
                ok = False
            else:
                n_eq += 1
        merged_ours = pm.merge_and_unload().state_dict()
        merged_ref = PeftModel.from_pretrained(load_bf16(), ref).merge_and_unload().state_dict()
        same_merge = all(torch.equal(merged_ours[k], merged_ref[k]) for k in merged_ref)
        ok &= same_merge
        same_bytes = open(os.path.join(ours, "adapter_model.safetensors"), "rb").read() == \
            open(os.path.join(ref, "adapter_model.safetensors"), "rb").read()
        print(f"{name}: {len(mods)} LoRA modules loaded by PEFT, {n_eq}/{len(want)} tensors equal to PEFT's, "
              f"merge equal: {same_merge}, safetensors bytes identical: {same_bytes}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "testdata", "peft"))
    ap.add_argument("--check-ours", metavar="DIR")
    a = ap.parse_args()
    if a.check_ours:
        sys.exit(check_ours(a.check_ours))
    os.makedirs(a.out, exist_ok=True)
    save_layers(a.out)
    save_adapters(a.out)


if __name__ == "__main__":
    main()
