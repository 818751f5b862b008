#!/usr/bin/env python3
"""Record trajectories of bitsandbytes' Adam/AdamW optimizers (CPU) as reference vectors.

Writes, for every case NAME, three files under testdata/optim/:

  NAME.in.safetensors      p0 (f32[n]) and grad0 .. grad{N-1} (f32[n]); the header metadata holds
                           the optimizer and its hyper-parameters (optim, lr, beta1, beta2, eps,
                           weight_decay, steps, bnb_version, torch_version).
  NAME.out.safetensors     param0 .. param{N-1}: the parameter after each step; the final optimizer
                           state under bitsandbytes' names: state1, state2 (u8 or f32), absmax1,
                           absmax2, qmap1, qmap2 (8-bit states only) and step (i64 scalar).
  NAME.states.safetensors  the state after every step k = 1..N: state1.k, state2.k and, for 8-bit
                           states, absmax1.k and absmax2.k (for single-step replays).

This is the layout that `cargo run -p qlora-optim --example adamw_replay -- IN OUT ...` reads
and writes, so the Rust side can be compared key by key.

Usage: /work/venv/bin/python tools/gen_optim_vectors.py [--out testdata/optim]
Requires torch and bitsandbytes (0.50.2 was used).  Deterministic: torch.manual_seed per case.
"""

import argparse
import os

import bitsandbytes as bnb
import torch
from safetensors.torch import save_file

STEPS = 12

# name, bnb class, n, lr, betas, eps, weight_decay
CASES = [
    ("adamw8bit_n4500", "AdamW8bit", 4500, 1e-3, (0.9, 0.999), 1e-8, 1e-2),
    ("adamw8bit_n1000", "AdamW8bit", 1000, 1e-3, (0.9, 0.999), 1e-8, 1e-2),
    ("adam8bit_n4500", "Adam8bit", 4500, 2e-3, (0.9, 0.995), 1e-6, 0.0),
    ("adam8bit_n1000", "Adam8bit", 1000, 2e-3, (0.9, 0.995), 1e-6, 0.0),
    ("adamw32bit_n4500", "AdamW32bit", 4500, 1e-3, (0.9, 0.999), 1e-8, 1e-1),
    ("adamw32bit_n1000", "AdamW32bit", 1000, 1e-3, (0.9, 0.999), 1e-8, 1e-1),
]

OPTIM_FLAG = {"AdamW8bit": "adamw8bit", "Adam8bit": "adam8bit", "AdamW32bit": "adamw32bit"}


def make_gradients(n, steps, gen):
    """Gradients spanning seven decades across blocks, with exact zeros.

    The magnitude is fixed per element over the run: a per-256-block scale 10^U(-6, 1) times a
    per-element factor 10^U(-1, 0), random signs. Within one block |g| spans one decade, as real
    gradients roughly do; a block spanning more than ~3.5 decades would let the second moment of
    its smallest elements underflow the unsigned map (code 0), where bitsandbytes' CUDA kernel
    (and qlora-optim) then take a step of lr * m_hat / eps while its CPU quantizer floors v at
    about 1.5e-5 * absmax2 -- a known divergence, kept out of these trajectories on purpose.
    """
    nblocks = (n + 255) // 256
    block_scale = torch.pow(10.0, torch.empty(nblocks).uniform_(-6.0, 1.0, generator=gen))
    scale = block_scale.repeat_interleave(256)[:n] * torch.pow(
        10.0, torch.empty(n).uniform_(-1.0, 0.0, generator=gen)
    )
    grads = []
    for k in range(steps):
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        g = sign * scale * torch.empty(n).uniform_(0.5, 1.5, generator=gen)
        # ~5 % scattered exact zeros.
        g[torch.rand(n, generator=gen) < 0.05] = 0.0
        # A whole 256-block of zero gradient in some (not the first) steps: its state only decays.
        if k in (3, 7) and n >= 768:
            g[512:768] = 0.0
        # A block whose gradient drops by 1e3 every other step.
        if n >= 1280 and k % 2:
            g[1024:1280] *= 1e-3
        grads.append(g.to(torch.float32).contiguous())
    return grads


def state_tensors(state, suffix=""):
    out = {}
    for key in ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"):
        if key in state:
            if suffix and key.startswith("qmap"):
                continue
            out[key + suffix] = state[key].detach().clone().contiguous()
    return out


def run_case(name, cls_name, n, lr, betas, eps, wd, out_dir):
    # A seed derived from the case name (stable across runs, unlike hash()).
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    p0 = (torch.randn(n, generator=gen) * 0.1).to(torch.float32)
    grads = make_gradients(n, STEPS, gen)

    p = torch.nn.Parameter(p0.clone())
    cls = getattr(bnb.optim, cls_name)
    opt = cls([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)

    params = {}
    states = {}
    for k, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        params[f"param{k}"] = p.detach().clone()
        states.update(state_tensors(opt.state[p], suffix=f".{k + 1}"))

    final = state_tensors(opt.state[p])
    final["step"] = torch.tensor(int(opt.state[p]["step"]), dtype=torch.int64)

    meta = {
        "optim": OPTIM_FLAG[cls_name],
        "lr": repr(lr),
        "beta1": repr(betas[0]),
        "beta2": repr(betas[1]),
        "eps": repr(eps),
        "weight_decay": repr(wd),
        "steps": str(STEPS),
        "bnb_version": bnb.__version__,
        "torch_version": torch.__version__,
        "device": "cpu",
    }
    inp = {"p0": p0}
    inp.update({f"grad{k}": g for k, g in enumerate(grads)})
    save_file(inp, os.path.join(out_dir, f"{name}.in.safetensors"), metadata=meta)
    out = dict(params)
    out.update(final)
    save_file(out, os.path.join(out_dir, f"{name}.out.safetensors"), metadata=meta)
    save_file(states, os.path.join(out_dir, f"{name}.states.safetensors"), metadata=meta)
    kind = final["state1"].dtype
    print(f"{name}: n={n} steps={STEPS} state dtype={kind}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "testdata", "optim"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    for case in CASES:
        run_case(*case, args.out)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"total {total} bytes in {args.out}")


if __name__ == "__main__":
    main()
