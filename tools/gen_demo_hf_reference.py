#!/usr/bin/env python3
"""Loads the folders `qlora demo` writes with transformers, PEFT and bitsandbytes, and records their
logits, so that the Rust test of the demo (crates/cli/tests/demo.rs) checks that our outputs mean the
same thing in the Python stack as in ours (issue #15, "outputs interoperate").

Usage (from the repository root):
    cargo run --release -p qlora-cli -- demo --steps 12 --pretrain-steps 12 --rank 16 --seed 7 \
        --out /tmp/demo-ref
    /work/venv/bin/python tools/gen_demo_hf_reference.py /tmp/demo-ref [--out testdata/demo-hf]

The demo arguments above are the ones the Rust test runs (it reruns the demo and compares its own
logits with the ones stored here, so both sides must come from the same run configuration).

Checks (exit status 1 on any failure), on a fixed prompt encoded by the saved tokenizer:
  * base/      AutoTokenizer + AutoModelForCausalLM (f32) load it; its tokenizer encodes the prompt
               to the ids our tokenizer gives (stored, and re-checked by the Rust test);
  * base-nf4/  AutoModelForCausalLM with bitsandbytes loads the 4-bit folder as saved (its
               quantization_config; 14 Linear4bit modules) on the CPU;
  * adapter/   PeftModel.from_pretrained over the 4-bit model (the model the adapter was trained on);
  * merged/    AutoModelForCausalLM (f32), no PEFT;
  * the merged model's logits equal the adapter-over-4-bit logits to float rounding (PEFT's
    merge_and_unload of the same thing).

Written: OUT/reference.safetensors with input_ids I64 [1, T] and logits F32 [1, T, vocab] for
`base`, `nf4`, `nf4_adapter`, `merged`; OUT/reference.json (versions, prompt, the checks).

bitsandbytes 0.50.2 on CPU: dequantize_4bit is routed to bnb's reference math and the AVX512-BF16
repacking is turned off (tools/gen_checkpoint_vectors.py explains both): its C++ kernel is wrong for
down_proj here (input size 688: a multiple of 16, not of 64). Deterministic: torch.set_num_threads(1).
"""
import argparse
import json
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch

import bitsandbytes as bnb
import peft
import transformers
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_checkpoint_vectors import disable_cpu_repacking, patch_cpu_dequantize_4bit  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROMPT = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo_out", help="the --out folder of a `qlora demo` run")
    ap.add_argument("--out", default=os.path.join(ROOT, "testdata", "demo-hf"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    patch_cpu_dequantize_4bit()
    d = args.demo_out
    checks = {}
    failed = []

    tok = AutoTokenizer.from_pretrained(os.path.join(d, "base"))
    ids = torch.tensor([tok(PROMPT)["input_ids"]], dtype=torch.int64)
    checks["prompt_tokens"] = ids.shape[1]

    base = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), dtype=torch.float32,
                                                attn_implementation="eager").eval()
    l_base = logits_of(base, ids)

    nf4 = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base-nf4"), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    n4 = disable_cpu_repacking(nf4)
    checks["linear4bit_modules"] = n4
    if n4 != 7 * base.config.num_hidden_layers:
        failed.append(f"base-nf4 has {n4} Linear4bit modules")
    l_nf4 = logits_of(nf4, ids)
    checks["nf4_vs_base_rel"] = rel(l_nf4, l_base)

    with_adapter = PeftModel.from_pretrained(nf4, os.path.join(d, "adapter")).eval()
    l_adapter = logits_of(with_adapter, ids)
    checks["adapter_vs_nf4_rel"] = rel(l_adapter, l_nf4)
    if checks["adapter_vs_nf4_rel"] == 0.0:
        failed.append("the adapter changes nothing")

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(d, "merged"), dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    l_merged = logits_of(merged, ids)
    checks["merged_vs_adapter_rel"] = rel(l_merged, l_adapter)
    if checks["merged_vs_adapter_rel"] > 1e-4:
        failed.append(f"merged differs from adapter-over-4-bit by {checks['merged_vs_adapter_rel']:.2e}")

    os.makedirs(args.out, exist_ok=True)
    save_file({"input_ids": ids, "base": l_base, "nf4": l_nf4, "nf4_adapter": l_adapter,
               "merged": l_merged}, os.path.join(args.out, "reference.safetensors"))
    meta = {
        "tool": "tools/gen_demo_hf_reference.py",
        "demo_args": "demo --steps 12 --pretrain-steps 12 --rank 16 --seed 7",
        "prompt": PROMPT,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bnb.__version__},
        "checks": checks,
        "failed": failed,
    }
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(json.dumps(meta, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
