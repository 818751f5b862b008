#!/usr/bin/env python3
"""Tokens per second and peak memory of QLoRA training steps with transformers + PEFT + bitsandbytes on
CPU (the "theirs" column of the issue #15 speed/memory comparison; see docs/bench-peft.md).

Usage (from the repository root):
    /work/venv/bin/python tools/bench_peft_qlora_train.py [--threads 2] [--layers 3 --hidden 192 ...]

What one run does:
  1. a random LlamaForCausalLM (seeded, f32) from the flags, saved to a temporary folder;
  2. loaded back with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
     bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=--compute-dtype) on CPU (transformers
     quantizes at load; embed_tokens, lm_head and the norms stay dense);
  3. peft.prepare_model_for_kbit_training (gradient checkpointing only with --grad-checkpointing),
     get_peft_model(LoraConfig(r, alpha 2r, dropout 0.05, all 7 projections of every block));
  4. --optim: bitsandbytes.optim.AdamW8bit (default), PagedAdamW8bit or AdamW32bit, lr 2e-4,
     betas (0.9, 0.999), eps 1e-8, weight decay 0, min_8bit_size --min-8bit-size (bnb default 4096:
     smaller tensors keep f32 states);
  5. --warmup untimed steps, then --steps timed steps; one step = forward (transformers' causal-LM
     loss on random token ids, labels = input ids) + backward + optimizer step + zero_grad, on one
     batch of --batch x --seq tokens.

Printed: ONE JSON line on stdout (progress and library warnings go to stderr):
  tokens_per_s       batch*seq*steps / wall time of the timed steps (all positions counted)
  step_ms            median and min wall time of one timed step
  peak_rss_mib       resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's peak resident memory
                     (includes the interpreter, torch, and building/quantizing the model)
  rss_after_imports_mib  VmRSS after importing torch, bitsandbytes, transformers, peft (the floor)
  rss_before_train_mib, peak_rss_train_mib  VmRSS just before the first step, and VmHWM over the
                     training steps only (the peak is reset with /proc/self/clear_refs "5" first;
                     null if that is not allowed)
  params / trainable / states8bit ...  model and optimizer facts; versions; the flags.

bitsandbytes 0.50.2 on CPU, training mode: Linear4bit runs dequantize_4bit (bnb's C++ CPU kernel) +
F.linear; the AVX512-BF16 repacking is only used in eval mode without grad, so it is not involved.
bnb's C++ dequantize_4bit is wrong when a weight's input size is a multiple of 16 but not of the
blocksize 64 (testdata/README.md section 2.1); the run warns when a shape is affected, since this is
a speed benchmark and bnb's own kernel is what a user gets. Deterministic inputs (--seed); timings
are not.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def proc_status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return None


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--heads", type=int, default=6, help="attention heads (default 6: head_dim 32)")
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: = --heads)")
    ap.add_argument("--intermediate", type=int, default=512, help="MLP width (default 512 = 8/3 x 192)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--rank", type=int, default=8, help="LoRA r (lora_alpha = 2r)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--optim", choices=["adamw8bit", "paged_adamw8bit", "adamw32bit"], default="adamw8bit")
    ap.add_argument("--min-8bit-size", type=int, default=4096, help="bnb min_8bit_size (bnb default 4096)")
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the same on GPU 0 (peak memory from torch.cuda.max_memory_allocated; untested here, "
                         "no GPU was available when this script was written)")
    a = ap.parse_args()
    kv = a.kv_heads or a.heads
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import torch
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    import bitsandbytes as bnb
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    rss_imports = proc_status("VmRSS")
    load0 = os.getloadavg()[0]
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=kv,
                      max_position_embeddings=max(a.seq, 128), rms_norm_eps=1e-6, tie_word_embeddings=a.tie_embeddings,
                      use_cache=False)
    compute = getattr(torch, a.compute_dtype)
    hd = a.hidden // a.heads
    n_params = (a.vocab * a.hidden * (1 if a.tie_embeddings else 2) + a.hidden
                + a.layers * (2 * a.hidden * a.hidden + 2 * a.hidden * kv * hd + 3 * a.hidden * a.intermediate
                              + 2 * a.hidden))
    with tempfile.TemporaryDirectory(prefix="bench-peft-") as tmp:
        torch.manual_seed(a.seed)
        LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, device_map="cpu" if a.device == "cpu" else {"": 0}, dtype=compute,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))
    n4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    bad = sorted({(m.in_features, m.out_features) for m in n4 if m.in_features % 16 == 0 and m.in_features % 64})
    if bad:
        log(f"warning: bnb's CPU dequantize_4bit is wrong for in_features % 64 != 0 (shapes {bad}); timing anyway")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.grad_checkpointing)
    model.config.use_cache = False
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
           "adamw32bit": bnb.optim.AdamW32bit}[a.optim]
    kw = {} if a.optim == "adamw32bit" else {"min_8bit_size": a.min_8bit_size}
    opt = cls(trainable, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kw)

    g = torch.Generator().manual_seed(a.seed + 1)
    nb = a.warmup + a.steps
    ids = torch.randint(0, a.vocab, (nb, a.batch, a.seq), generator=g, dtype=torch.int64).to(a.device)
    cuda = a.device == "cuda"

    def step(k):
        loss = model(input_ids=ids[k], labels=ids[k]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss.detach().item()

    rss_before = proc_status("VmRSS")
    can_reset = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        cuda_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for k in range(nb):
        t0 = time.perf_counter()
        losses.append(step(k))
        dt = time.perf_counter() - t0
        if k >= a.warmup:
            times.append(dt)
        log(f"step {k + 1}/{nb}{' (warm-up)' if k < a.warmup else ''}: loss {losses[-1]:.4f}, {dt * 1e3:.1f} ms")
    peak_train = proc_status("VmHWM") if can_reset else None
    total = sum(times)
    states8 = sum(1 for st in opt.state.values() if "state1" in st and st["state1"].dtype == torch.uint8)
    res = {
        "tool": "tools/bench_peft_qlora_train.py",
        "tokens_per_s": round(a.batch * a.seq * a.steps / total, 1),
        "step_ms": {"median": round(statistics.median(times) * 1e3, 2), "min": round(min(times) * 1e3, 2)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "rss_after_imports_mib": None if rss_imports is None else round(rss_imports, 1),
        "rss_before_train_mib": None if rss_before is None else round(rss_before, 1),
        "peak_rss_train_mib": None if peak_train is None else round(peak_train, 1),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "model": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": kv,
                  "intermediate": a.intermediate, "vocab": a.vocab, "tied": a.tie_embeddings,
                  "params": n_params,
                  "linear4bit_modules": len(n4), "compute_dtype": a.compute_dtype},
        "lora": {"r": a.rank, "alpha": 2 * a.rank, "dropout": 0.05, "targets": 7 * a.layers,
                 "trainable_params": sum(p.numel() for p in trainable), "trainable_tensors": len(trainable)},
        "optim": {"class": f"bitsandbytes.optim.{cls.__name__}", "min_8bit_size": kw.get("min_8bit_size"),
                  "tensors_with_8bit_states": states8, "tensors_with_f32_states": len(opt.state) - states8},
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "warmup": a.warmup, "threads": a.threads,
        "grad_checkpointing": a.grad_checkpointing,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bnb.__version__},
        "cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
        "loadavg_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cuda:
        res["cuda"] = {"name": torch.cuda.get_device_name(0),
                       "allocated_before_train_mib": round(cuda_before / 2**20, 1),
                       "max_allocated_train_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                       "max_reserved_train_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    res["device"] = a.device
    print(json.dumps(res, sort_keys=False))


if __name__ == "__main__":
    main()
