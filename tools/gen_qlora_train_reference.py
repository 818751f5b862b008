#!/usr/bin/env python3
"""Reference QLoRA training runs (transformers + PEFT + bitsandbytes on CPU) of a tiny random Llama,
under testdata/qlora-train/, for the end-to-end QLoRA test of issue #15.

Usage (from the repository root):
    /work/venv/bin/python tools/gen_qlora_train_reference.py [--out testdata/qlora-train]

Written (see testdata/README.md, section "qlora-train"):
  base/                      the tiny random LlamaForCausalLM, f32 (config.json, model.safetensors)
  base-nf4/                  the same loaded with BitsAndBytesConfig(load_in_4bit, nf4, double quant,
                             compute dtype float32) and save_pretrained: the 4-bit codes every run uses
  batches.safetensors        input_ids / labels I64 [steps, batch, seq] (labels: -100 on a masked
                             prompt and on end padding)
  adapter-init/              the initial PEFT adapter (r 8, alpha 16, all 7 projections, B != 0)
  runs/<run>/adapter-step1/  the adapter after the first optimizer step
  runs/<run>/adapter-final/  the adapter after the last step
  runs/<run>/losses.safetensors  losses F64 [steps] (the loss of batch k before step k, train mode)
                             and eval_losses_init / eval_losses_final F64 [steps] (every batch, no
                             grad, initial and final adapter)
  step0-grads.safetensors    the LoRA gradients of the first step (PEFT key names, F32), to localize a
                             mismatch before the optimizer
  reference.json             model/LoRA/optimizer hyper-parameters, versions, all losses, the f64
                             noise-floor comparison and the suggested tolerances

Runs (same data, same init, same adapter; only the optimizer differs):
  adamw8bit      bnb.optim.AdamW8bit(lr, betas, eps, weight_decay=0, min_8bit_size=256): every LoRA
                 tensor (256..1408 elements) gets 8-bit blockwise states. With bnb's default
                 min_8bit_size=4096 none of this tiny model's LoRA tensors would (they would all
                 keep f32 states, which is the adamw32bit run below).
  adamw8bit-wd   the same with weight_decay=0.1
  adamw32bit     bnb.optim.AdamW32bit(lr, betas, eps, weight_decay=0) (= AdamW8bit with its default
                 min_8bit_size on this model: checked bit for bit)
  paged-adamw8bit  bnb.optim.PagedAdamW8bit, same settings as adamw8bit (on CPU paging is a no-op:
                 checked bit for bit against adamw8bit, not stored separately)
and, for the tolerance (recorded in reference.json, not stored as files):
  * an f64 run: the same model with the 4-bit weights dequantized exactly to f64, PEFT LoRA in f64 and
    torch.optim.AdamW in f64 (the exact math the f32 runs approximate);
  * CUDA-rule 8-bit runs: bnb's CUDA 8-bit AdamW kernel (which qlora-optim follows) transcribed to f32
    torch ops (CudaRuleAdamW8bit) in place of bnb's CPU 8-bit path, with and without a 1e-6 relative
    gradient perturbation (a stand-in for f32 rounding differences);
  * how many codes of base-nf4/ differ from the CUDA quantization rule applied to base/.

bitsandbytes 0.50.2 on CPU: as in tools/gen_checkpoint_vectors.py, dequantize_4bit is routed to bnb's
reference math (its C++ kernel is wrong for down_proj [64, 176]) and the AVX512-BF16 repacking is
disabled, so the forward is machine-independent (dequantize in f32 + F.linear). Deterministic: fixed
seeds, torch.set_num_threads(1).
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch

import bitsandbytes as bnb
import peft
import safetensors
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_checkpoint_vectors import (  # noqa: E402
    dequant_from_tensors, disable_cpu_repacking, load_folder_tensors, patch_cpu_dequantize_4bit)

SEED = 20261204
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

STEPS, BATCH, SEQ = 8, 4, 32
VOCAB = 128
# transformers' init is N(0, initializer_range^2) for every linear / embedding. With the default 0.02 the
# logits of this tiny model are almost uniform (|lm_head x| ~ 0.16) and LoRA on the blocks can hardly move
# the loss (8 steps: 4.858 -> 4.70); 0.1 makes the run visibly learn (eval mean 5.13 -> 4.06).
INIT_RANGE = 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 16
B_INIT_STD = 0.02          # lora_B ~ N(0, B_INIT_STD^2) after PEFT's default init (A: kaiming-uniform)
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8
WD = 0.1                    # the weight-decay run
MIN_8BIT = 256

RUNS = {
    # name: (bnb class, weight decay, extra kwargs)
    "adamw8bit": ("AdamW8bit", 0.0, {"min_8bit_size": MIN_8BIT}),
    "adamw8bit-wd": ("AdamW8bit", WD, {"min_8bit_size": MIN_8BIT}),
    "adamw32bit": ("AdamW32bit", 0.0, {}),
}


def tiny_config():
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=INIT_RANGE,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def bnb_config():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def lora_config():
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      init_lora_weights=True, task_type="CAUSAL_LM")


def make_batches():
    """Learnable token streams: each row is an arithmetic progression mod (VOCAB-3) shifted past the
    special ids, with a random start and a step from a small set; BOS first. Labels are input_ids
    with -100 on a 'prompt' of 4..9 tokens (incl. BOS) and, in some rows, on 0..6 pad tokens
    (id 0) at the end."""
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.empty(STEPS, BATCH, SEQ, dtype=torch.int64)
    labels = torch.empty_like(ids)
    m = VOCAB - 3
    for s in range(STEPS):
        for b in range(BATCH):
            start = int(torch.randint(0, m, (1,), generator=g))
            step = [1, 2, 3, 5, 7][int(torch.randint(0, 5, (1,), generator=g))]
            row = [1] + [3 + (start + step * i) % m for i in range(SEQ - 1)]
            npad = int(torch.randint(0, 7, (1,), generator=g)) if b % 2 else 0
            for i in range(SEQ - npad, SEQ):
                row[i] = 0
            prompt = int(torch.randint(4, 10, (1,), generator=g))
            lab = list(row)
            for i in range(prompt):
                lab[i] = -100
            for i in range(SEQ - npad, SEQ):
                lab[i] = -100
            ids[s, b] = torch.tensor(row)
            labels[s, b] = torch.tensor(lab)
    return ids, labels


def info(d):
    """safetensors metadata as ONE key (the header's metadata map order is not stable across processes)."""
    return {"info": json.dumps(d, sort_keys=True)}


def clean_adapter_dir(d, base_name):
    cfg_path = os.path.join(d, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = base_name
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set: order varies per process
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    readme = os.path.join(d, "README.md")
    if os.path.exists(readme):
        os.remove(readme)


def load_nf4(out):
    m = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base-nf4"), device_map="cpu")
    assert disable_cpu_repacking(m) == 14
    return m


def lora_params(pm):
    return {n: p for n, p in pm.named_parameters() if p.requires_grad}


def peft_key(name):
    """named_parameters name -> the key PEFT writes in adapter_model.safetensors."""
    return name.replace(".default.weight", ".weight")


@torch.no_grad()
def eval_losses(pm, ids, labels):
    return [float(pm(input_ids=ids[s], labels=labels[s]).loss) for s in range(ids.shape[0])]


def train(pm, opt, ids, labels, out_dir=None, base_name=None, grads_out=None, grad_noise=None, step1_out=None):
    """grad_noise: (generator, rel) multiplies every gradient element by (1 + rel * N(0,1)) before the step: a
    stand-in for f32 rounding differences between two implementations of the same math."""
    pm.train()
    losses = []
    for s in range(ids.shape[0]):
        loss = pm(input_ids=ids[s], labels=labels[s]).loss
        loss.backward()
        if grad_noise is not None:
            gen, rel = grad_noise
            with torch.no_grad():
                for _, p in sorted(lora_params(pm).items()):
                    p.grad.mul_(1 + rel * torch.randn(p.grad.shape, generator=gen))
        if s == 0 and grads_out is not None:
            grads_out.update({peft_key(n): p.grad.detach().clone().contiguous()
                              for n, p in lora_params(pm).items()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if s == 0 and step1_out is not None:
            step1_out.update({n: p.detach().clone() for n, p in lora_params(pm).items()})
        if s == 0 and out_dir is not None:
            pm.save_pretrained(os.path.join(out_dir, "adapter-step1"))
            clean_adapter_dir(os.path.join(out_dir, "adapter-step1"), base_name)
    return losses


def state_kinds(opt):
    kinds = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "state1" in st:
                kinds[str(st["state1"].dtype).removeprefix("torch.")] = kinds.get(
                    str(st["state1"].dtype).removeprefix("torch."), 0) + 1
    return kinds


class CudaRuleAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' CUDA kernel kOptimizerStatic8bit2StateBlockwise<float, ADAM> (blocks of 256) transcribed to
    IEEE f32 torch ops (docs/reference/bitsandbytes.md 6.3): dequantize with the old absmax, Adam moments in f32,
    step p += step_size * m / (sqrt(v) + c2*eps), decoupled decay AFTER the step, new absmax = block max |s|
    (tail lanes contribute |qmap1[128]| * absmax1_old * beta1), nearest code (exact ties -> even index) and the
    state1 sign fix. What qlora-optim implements; used here only to measure how far bnb's CPU path is from it."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        import bitsandbytes.functional as bf
        self.q1 = bf.create_dynamic_map(signed=True).float()
        self.q2 = bf.create_dynamic_map(signed=False).float()
        self.m1 = ((self.q1[1:] + self.q1[:-1]) * 0.5).float()
        self.m2 = ((self.q2[1:] + self.q2[:-1]) * 0.5).float()

    @staticmethod
    def _nearest(x, mids):
        idx = torch.searchsorted(mids, x, right=False)          # number of midpoints < x
        tie = (idx < mids.numel()) & (mids[idx.clamp(max=mids.numel() - 1)] == x)
        idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)    # x == midpoint k: codes k, k+1 -> the even one
        return torch.where(torch.isnan(x), torch.zeros_like(idx), idx)

    @torch.no_grad()
    def step(self):
        for grp in self.param_groups:
            lr, (b1, b2), eps, wd = grp["lr"], grp["betas"], grp["eps"], grp["weight_decay"]
            for p in grp["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                n = p.numel()
                nb = (n + 255) // 256
                if not st:
                    st["step"] = 0
                    st["c1"] = torch.zeros(n, dtype=torch.int64)
                    st["c2"] = torch.zeros(n, dtype=torch.int64)
                    st["a1"] = torch.zeros(nb)
                    st["a2"] = torch.zeros(nb)
                st["step"] += 1
                t = st["step"]
                f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
                c1 = f(1.0) - torch.pow(f(b1), t)
                c2 = torch.sqrt(f(1.0) - torch.pow(f(b2), t))
                step_size = (-f(lr) * c2) / c1
                g = p.grad.reshape(-1).float()
                blk = torch.arange(n) // 256
                s2 = self.q2[st["c2"]] * st["a2"][blk]
                s2 = s2 * f(b2) + (f(1.0) - f(b2)) * g * g
                s1 = self.q1[st["c1"]] * st["a1"][blk]
                s1 = s1 * f(b1) + (f(1.0) - f(b1)) * g
                pad = nb * 256 - n
                a1 = torch.nn.functional.pad(s1.abs(), (0, pad)).reshape(nb, 256).amax(1)
                a2 = torch.nn.functional.pad(s2.abs(), (0, pad)).reshape(nb, 256).amax(1)
                if pad:
                    a1[-1] = torch.maximum(a1[-1], self.q1[128].abs() * st["a1"][-1] * f(b1))
                pf = p.data.reshape(-1)
                pf += step_size * (s1 / (torch.sqrt(s2) + c2 * f(eps)))
                if wd > 0:
                    pf *= f(1.0) - f(lr) * f(wd)
                k1 = self._nearest(s1 / a1[blk], self.m1)
                k2 = self._nearest(s2 / a2[blk], self.m2)
                fix = torch.signbit(self.q1[k1]) != torch.signbit(s1)
                k1 = torch.where(fix, torch.where(s1 > 0, k1 + 1, k1 - 1) % 256, k1)
                st["c1"], st["c2"], st["a1"], st["a2"] = k1, k2, a1, a2


def quantizer_vs_cuda_rule(out):
    """How many codes of base-nf4/ differ from bnb's CUDA rule applied to base/ (i.e. from what a quantizer
    following the CUDA kernels, like qlora's, writes for the same f32 weights)."""
    import numpy as np
    import bitsandbytes.functional as bf
    from gen_codec_vectors import cuda_rule_4bit, cuda_rule_blockwise8
    t4 = load_folder_tensors(os.path.join(out, "base-nf4"))
    tb = load_folder_tensors(os.path.join(out, "base"))
    names = sorted(k.rsplit(".quant_state.", 1)[0] for k in t4 if ".quant_state.bitsandbytes__" in k)
    r = {"nf4_codes": 0, "nf4_codes_differ": 0, "nested_codes": 0, "nested_codes_differ": 0, "nested_differences": []}
    for n in names:
        meta = json.loads(bytes(t4[n + ".quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8"))
        _, st = bf.quantize_4bit(tb[n], blocksize=meta["blocksize"], compress_statistics=False, quant_type="nf4")
        a = cuda_rule_4bit(tb[n].reshape(-1).float().numpy(), st.absmax.float().numpy(), meta["blocksize"], "nf4")
        b = t4[n].reshape(-1).numpy()
        r["nf4_codes"] += 2 * b.size
        r["nf4_codes_differ"] += int(((a >> 4) != (b >> 4)).sum() + ((a & 15) != (b & 15)).sum())
        centered = st.absmax.float() - torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        ex = cuda_rule_blockwise8(centered.numpy(), t4[n + ".nested_absmax"].float().numpy(),
                                  t4[n + ".nested_quant_map"].float().numpy(), meta["nested_blocksize"])
        got = t4[n + ".absmax"].numpy()
        r["nested_codes"] += ex.size
        r["nested_codes_differ"] += int((ex != got).sum())
        r["nested_differences"] += [{"weight": n, "block": int(j), "bnb_cpu": int(got[j]), "cuda_rule": int(ex[j])}
                                    for j in np.nonzero(ex != got)[0]]
    return r


def f64_run(out, ids, labels):
    """The exact-math run: dequantized 4-bit weights in f64, PEFT LoRA f64, torch AdamW f64."""
    t4 = load_folder_tensors(os.path.join(out, "base-nf4"))
    names = sorted(k.rsplit(".quant_state.", 1)[0] for k in t4 if ".quant_state.bitsandbytes__" in k)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"), dtype=torch.float32)
    sd = {}
    for n in names:
        w, meta = dequant_from_tensors(t4, n)
        assert meta["dtype"] == "float32"
        sd[n] = w
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected
    model = model.to(torch.float64)
    pm = PeftModel.from_pretrained(model, os.path.join(out, "adapter-init"), is_trainable=True)
    pm = pm.to(torch.float64)
    opt = torch.optim.AdamW(list(lora_params(pm).values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    return train(pm, opt, ids, labels)


def generate(out):
    torch.set_num_threads(1)
    patch_cpu_dequantize_4bit()
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    base_dir, nf4_dir = os.path.join(out, "base"), os.path.join(out, "base-nf4")

    # 1. the tiny random f32 Llama
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(tiny_config()).to(torch.float32).eval()
    model.save_pretrained(base_dir)
    for f in ("generation_config.json",):
        p = os.path.join(base_dir, f)
        if os.path.exists(p):
            os.remove(p)

    # 2. its NF4 + double-quant version, quantized at load by transformers + bnb (CPU) and saved
    m4 = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(), device_map="cpu",
                                              dtype=torch.float32)
    assert disable_cpu_repacking(m4) == 14
    m4.save_pretrained(nf4_dir)
    p = os.path.join(nf4_dir, "generation_config.json")
    if os.path.exists(p):
        os.remove(p)
    del m4
    qcheck = quantizer_vs_cuda_rule(out)
    print(f"base-nf4 vs the CUDA quantization rule applied to base/: {qcheck}")

    # 3. batches
    ids, labels = make_batches()
    save_file({"input_ids": ids, "labels": labels}, os.path.join(out, "batches.safetensors"),
              metadata=info({"generator": "tools/gen_qlora_train_reference.py",
                             "layout": "[steps, batch, seq]; labels unshifted (the model shifts), -100 = ignored"}))

    # 4. the initial adapter: PEFT default init (A kaiming-uniform, B = 0), then B ~ N(0, B_INIT_STD^2)
    torch.manual_seed(SEED + 2)
    pm = get_peft_model(load_nf4(out), lora_config())
    g = torch.Generator().manual_seed(SEED + 3)
    with torch.no_grad():
        for n, p in sorted(lora_params(pm).items()):
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * B_INIT_STD)
    pm.save_pretrained(os.path.join(out, "adapter-init"))
    clean_adapter_dir(os.path.join(out, "adapter-init"), "base-nf4")
    del pm

    # 5. the runs, each from the saved adapter on a fresh load of the 4-bit folder
    results, grads0, step1 = {}, {}, {}
    final_adapters = {}
    for name, (cls_name, wd, kw) in RUNS.items():
        pm = PeftModel.from_pretrained(load_nf4(out), os.path.join(out, "adapter-init"), is_trainable=True)
        n_lora = len(lora_params(pm))
        opt = getattr(bnb.optim, cls_name)(list(lora_params(pm).values()), lr=LR, betas=BETAS, eps=EPS,
                                           weight_decay=wd, **kw)
        rdir = os.path.join(out, "runs", name)
        os.makedirs(rdir)
        ev0 = eval_losses(pm, ids, labels)
        step1[name] = {}
        losses = train(pm, opt, ids, labels, rdir, "base-nf4", grads0 if not grads0 else None, step1_out=step1[name])
        ev1 = eval_losses(pm, ids, labels)
        pm.save_pretrained(os.path.join(rdir, "adapter-final"))
        clean_adapter_dir(os.path.join(rdir, "adapter-final"), "base-nf4")
        final_adapters[name] = {n: p.detach().clone() for n, p in lora_params(pm).items()}
        save_file({"losses": torch.tensor(losses, dtype=torch.float64),
                   "eval_losses_init": torch.tensor(ev0, dtype=torch.float64),
                   "eval_losses_final": torch.tensor(ev1, dtype=torch.float64)},
                  os.path.join(rdir, "losses.safetensors"),
                  metadata=info({"optimizer": f"bitsandbytes.optim.{cls_name}", "lr": LR, "betas": list(BETAS),
                                 "eps": EPS, "weight_decay": wd, "min_8bit_size": kw.get("min_8bit_size", 4096),
                                 "steps": STEPS}))
        results[name] = {"optimizer": f"bitsandbytes.optim.{cls_name}", "weight_decay": wd,
                         "min_8bit_size": kw.get("min_8bit_size", 4096), "lora_tensors": n_lora,
                         "optimizer_state1_dtypes": state_kinds(opt), "losses": losses,
                         "eval_losses_init": ev0, "eval_losses_final": ev1}
        print(f"{name}: losses {' '.join(f'{x:.6f}' for x in losses)}; eval mean {sum(ev0) / len(ev0):.6f} -> "
              f"{sum(ev1) / len(ev1):.6f}; states {state_kinds(opt)}")
        del pm, opt
    save_file(grads0, os.path.join(out, "step0-grads.safetensors"),
              metadata=info({"what": "d loss(batch 0) / d LoRA tensors at the initial adapter (PEFT key names)"}))

    # 6. equivalence checks (not stored): AdamW8bit with its default min_8bit_size == AdamW32bit here,
    #    and PagedAdamW8bit == AdamW8bit on CPU
    checks = {}
    for label, cls_name, kw, ref in (("adamw8bit_default_min_8bit_size_equals_adamw32bit", "AdamW8bit", {},
                                      "adamw32bit"),
                                     ("paged_adamw8bit_equals_adamw8bit", "PagedAdamW8bit",
                                      {"min_8bit_size": MIN_8BIT}, "adamw8bit")):
        pm = PeftModel.from_pretrained(load_nf4(out), os.path.join(out, "adapter-init"), is_trainable=True)
        opt = getattr(bnb.optim, cls_name)(list(lora_params(pm).values()), lr=LR, betas=BETAS, eps=EPS,
                                           weight_decay=0.0, **kw)
        losses = train(pm, opt, ids, labels)
        same = losses == results[ref]["losses"] and all(
            torch.equal(p.detach(), final_adapters[ref][n]) for n, p in lora_params(pm).items())
        checks[label] = same
        print(f"{label}: {same}")
        assert same, label
        del pm, opt

    # 7. bnb's CUDA 8-bit rule (what qlora-optim follows) transcribed to torch f32: how far bnb's CPU 8-bit
    #    path (the stored adamw8bit / adamw8bit-wd runs) is from it
    cuda_rule = {}
    for name in ("adamw8bit", "adamw8bit-wd"):
        wd = RUNS[name][1]
        pm = PeftModel.from_pretrained(load_nf4(out), os.path.join(out, "adapter-init"), is_trainable=True)
        opt = CudaRuleAdamW8bit(list(lora_params(pm).values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)
        s1 = {}
        losses = train(pm, opt, ids, labels, step1_out=s1)
        ev1 = eval_losses(pm, ids, labels)
        d = max(abs(a - b) for a, b in zip(losses, results[name]["losses"]))
        de = max(abs(a - b) for a, b in zip(ev1, results[name]["eval_losses_final"]))
        dp = max(float((p.detach() - final_adapters[name][n]).abs().max()) for n, p in lora_params(pm).items())
        cuda_rule[name] = {"losses": losses, "eval_losses_final": ev1, "max_abs_loss_diff_vs_bnb_cpu": d,
                           "max_abs_eval_loss_final_diff_vs_bnb_cpu": de,
                           "max_abs_adapter_final_diff_vs_bnb_cpu": dp,
                           "max_abs_adapter_step1_diff_vs_bnb_cpu": max(float((v - step1[name][n]).abs().max())
                                                                        for n, v in s1.items())}
        print(f"cuda-rule {name}: losses {' '.join(f'{x:.6f}' for x in losses)}; max |dloss| vs bnb CPU {d:.3g}, "
              f"final eval {de:.3g}, adapter {dp:.3g}")
        del pm, opt
        # sensitivity: the same CUDA-rule run with every gradient perturbed by a relative 1e-6 (a few f32 ulps)
        pm = PeftModel.from_pretrained(load_nf4(out), os.path.join(out, "adapter-init"), is_trainable=True)
        opt = CudaRuleAdamW8bit(list(lora_params(pm).values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)
        lp = train(pm, opt, ids, labels, grad_noise=(torch.Generator().manual_seed(SEED + 4), 1e-6))
        ep = eval_losses(pm, ids, labels)
        cuda_rule[name]["grad_noise_1e-6"] = {
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(lp, losses)),
            "max_abs_eval_loss_final_diff": max(abs(a - b) for a, b in zip(ep, ev1))}
        print(f"  with 1e-6 relative gradient noise: {cuda_rule[name]['grad_noise_1e-6']}")
        del pm, opt

    # 8. the f64 exact-math run and the f32/8-bit deviations from it
    l64 = f64_run(out, ids, labels)
    print(f"f64 AdamW: losses {' '.join(f'{x:.6f}' for x in l64)}")
    dev = {name: max(abs(a - b) for a, b in zip(r["losses"], l64)) for name, r in results.items()
           if r["weight_decay"] == 0.0}
    d832 = {"max_abs_loss_diff": max(abs(a - b) for a, b in zip(results["adamw8bit"]["losses"],
                                                                results["adamw32bit"]["losses"])),
            "max_abs_eval_loss_final_diff": max(abs(a - b) for a, b in zip(results["adamw8bit"]["eval_losses_final"],
                                                                           results["adamw32bit"]["eval_losses_final"])),
            "max_abs_adapter_step1_diff": max(float((v - step1["adamw32bit"][n]).abs().max())
                                              for n, v in step1["adamw8bit"].items()),
            "max_abs_adapter_final_diff": max(float((v - final_adapters["adamw32bit"][n]).abs().max())
                                              for n, v in final_adapters["adamw8bit"].items())}
    print(f"adamw8bit vs adamw32bit: {d832}")
    for name in cuda_rule:
        print(f"cuda-rule {name}: adapter step1 diff vs bnb CPU {cuda_rule[name]['max_abs_adapter_step1_diff_vs_bnb_cpu']:.3g}")
    print(f"max |loss - loss_f64| per run: {dev}")

    meta = {
        "generator": "tools/gen_qlora_train_reference.py",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bnb.__version__, "safetensors": safetensors.__version__},
        "device": "cpu", "torch_threads": 1, "seed": SEED,
        "model": {k: v for k, v in tiny_config().to_dict().items()
                  if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                           "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "rope_theta")},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                         "bnb_4bit_compute_dtype": "float32", "blocksize": 64, "nested_blocksize": 256,
                         "quantized_modules": 14, "not_quantized": "embed_tokens, lm_head, norms (f32)"},
        "base_nf4_vs_cuda_quantization_rule": qcheck,
        "lora": {"r": R, "lora_alpha": ALPHA, "scaling": ALPHA / R, "lora_dropout": 0.0, "target_modules": TARGETS,
                 "bias": "none", "init": f"PEFT default (A kaiming-uniform a=sqrt(5)), then lora_B ~ N(0, {B_INIT_STD}^2)",
                 "trainable_tensors": 2 * 7 * 2,
                 "trainable_parameters": int(sum(p.numel() for p in grads0.values()))},
        "data": {"steps": STEPS, "batch": BATCH, "seq": SEQ,
                 "labels": "input_ids with -100 on a 4..9-token prompt and on end padding (pad id 0); "
                           "no attention mask (padding only at the end, causal attention)",
                 "non_ignored_labels_per_step": [int((labels[s] != -100).sum()) for s in range(STEPS)]},
        "training": {"lr": LR, "betas": list(BETAS), "eps": EPS, "constant_lr": True, "grad_clip": None,
                     "grad_accumulation": 1, "mode": "model.train() (dropout 0 everywhere)",
                     "loss": "transformers ForCausalLMLoss: logits.float(), labels shifted left by one, "
                             "cross_entropy(ignore_index=-100, reduction='mean') over the non-ignored positions of the batch",
                     "losses_are": "losses[k] = loss of batch k with the adapter after k optimizer steps (before step k+1)"},
        "runs": results,
        "checks": checks,
        "cuda_rule_8bit": {"what": "bnb's CUDA 8-bit AdamW kernel rule (nearest code, ties to even, sign fix, decay after "
                                   "the step) transcribed to IEEE f32 torch ops (class CudaRuleAdamW8bit) in place of "
                                   "bnb's CPU 8-bit path; everything else identical", **cuda_rule},
        "adamw8bit_vs_adamw32bit": d832,
        "f64_exact_math": {"what": "4-bit weights dequantized (reference math) to f32 and cast to f64, model + LoRA in f64, "
                                   "torch.optim.AdamW(weight_decay=0) in f64",
                           "losses": l64, "max_abs_loss_diff": dev},
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(out) for fn in fns)
    print(f"total {total} bytes in {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "testdata", "qlora-train"))
    a = ap.parse_args()
    generate(a.out)


if __name__ == "__main__":
    main()
