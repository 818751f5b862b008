#!/usr/bin/env python3
"""Generate Llama-family reference folders for qlora_candle::llama under testdata/llama/, with the
REAL transformers on CPU (f32, eager attention).

Usage (from the repository root):
    /work/venv/bin/python tools/gen_llama_vectors.py [--out testdata/llama]
    /work/venv/bin/python tools/gen_llama_vectors.py --check-ours DIR

Written (see testdata/README.md, section "llama"), one folder per tiny random config:
  {name}/config.json, {name}/model.safetensors   save_pretrained() of the random model (f32)
  {name}/reference.safetensors                    input_ids I64 [2, 12], labels I64 [2, 12]
                                                  (a few -100), logits F32 [2, 12, vocab],
                                                  loss F32 [] (model(input_ids, labels=labels).loss)

  tokenizer/corpus.txt      the first 16 000 bytes of crates/cli/data/coriolanus.txt
  tokenizer/tokenizer.json  a byte-level BPE (vocab 400, special token <|endoftext|>) trained on
                            it by Python `tokenizers` as qlora_candle::data::BpeTokenizer::train
                            trains one
  tokenizer/samples.json    {"samples": [...], "ids": [[...], ...]}: its encodings of a few texts

Configs: llama-gqa (4 query / 2 key-value heads, untied), llama-tied (tied embeddings, MHA),
llama-rope3 (llama3 rope scaling, attention and MLP biases),
qwen2 (q/k/v biases), mistral-window (sliding window 5 < sequence 12). Norm weights and biases are
randomised (transformers initialises them to 1 and 0, which would leave them untested).

--check-ours DIR: every sub-folder of DIR named like a config above is a model folder written by
our Rust code (`cargo run -p qlora-candle --example llama_resave -- DIR`). Each is loaded with
AutoModelForCausalLM.from_pretrained; the script checks that its tensors equal ours bit for bit and
that its logits equal the stored reference logits (max abs diff <= 1e-6 · max |logit|). DIR/tokenizer
(written by the same example: our BPE trained on tokenizer/corpus.txt, saved with save_pretrained)
must load with AutoTokenizer.from_pretrained and encode the samples to the stored ids. Exits
non-zero on any mismatch.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

SEED = 20261204
SEQ = 12


def configs():
    common = dict(hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.1,
                  max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    return {
        "llama-gqa": (LlamaForCausalLM, LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)),
        "llama-tied": (LlamaForCausalLM, LlamaConfig(
            vocab_size=80, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **common)),
        "llama-rope3": (LlamaForCausalLM, LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
            attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8}, **common)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(
            vocab_size=72, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False, **common)),
        "mistral-window": (MistralForCausalLM, MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
            sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common)),
    }


TOKENIZER_VOCAB = 400
SAMPLES = ["First Citizen:\nBefore we proceed any further, hear me speak.",
           "What, Romeo! Tybalt's dead? 1234 -- unseen words: qlora, nf4, ünïcödé, 日本",
           "  leading spaces, tabs\tand\n\nnewlines  ",
           "<|endoftext|>the next document"]


def train_tokenizer(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                 use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                              use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus], trainer)
    return tok


def gen_tokenizer(out):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "crates", "cli", "data", "coriolanus.txt"), "rb") as f:
        corpus = f.read()[:16000].decode("utf-8")
    folder = os.path.join(out, "tokenizer")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "corpus.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(corpus)
    tok = train_tokenizer(corpus)
    tok.save(os.path.join(folder, "tokenizer.json"))
    ids = [tok.encode(s, add_special_tokens=False).ids for s in SAMPLES]
    for s, i in zip(SAMPLES, ids):
        assert tok.decode(i, skip_special_tokens=False) == s, s
    with open(os.path.join(folder, "samples.json"), "w") as f:
        json.dump({"samples": SAMPLES, "ids": ids}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"tokenizer: vocab {tok.get_vocab_size()}, sample lengths {[len(i) for i in ids]}")


def inputs(vocab):
    g = torch.Generator().manual_seed(SEED + vocab)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100    # a "prompt" whose tokens are not scored
    labels[1, -2:] = -100   # right padding
    return ids, labels


def build(cls, cfg, seed):
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def reference(model, vocab):
    ids, labels = inputs(vocab)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    return {"input_ids": ids, "labels": labels, "logits": out.logits.float().contiguous(),
            "loss": out.loss.float().reshape(())}


def generate(out):
    info = json.dumps({"generator": "tools/gen_llama_vectors.py", "torch": torch.__version__,
                       "transformers": transformers.__version__, "seed": SEED,
                       "attn_implementation": "eager"}, sort_keys=True)
    for i, (name, (cls, cfg)) in enumerate(configs().items()):
        model = build(cls, cfg, SEED + i)
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        model.save_pretrained(folder)
        for extra in ("generation_config.json",):
            p = os.path.join(folder, extra)
            if os.path.exists(p):
                os.remove(p)
        ref = reference(model, cfg.vocab_size)
        save_file(ref, os.path.join(folder, "reference.safetensors"),
                  metadata={"info": info})
        # The saved folder reloads to the same logits (what our loader reads is what they ran).
        back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
        with torch.no_grad():
            again = back(input_ids=ref["input_ids"]).logits
        assert torch.equal(again, ref["logits"]), name
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"loss {ref['loss'].item():.6f}, max |logit| {ref['logits'].abs().max().item():.4f}")
    gen_tokenizer(out)


def check_ours(ours, ref_root):
    bad = 0
    for name in configs():
        folder = os.path.join(ours, name)
        if not os.path.isdir(folder):
            print(f"{name}: missing in {ours}")
            bad += 1
            continue
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        with safe_open(os.path.join(ref_root, name, "model.safetensors"), "pt") as f:
            theirs = {k: f.get_tensor(k) for k in f.keys()}
        state = model.state_dict()
        for k, t in theirs.items():
            if not torch.equal(state[k], t):
                print(f"{name}: tensor {k} differs")
                bad += 1
        with safe_open(os.path.join(ref_root, name, "reference.safetensors"), "pt") as f:
            ids, logits = f.get_tensor("input_ids"), f.get_tensor("logits")
        with torch.no_grad():
            got = model(input_ids=ids).logits
        diff = (got - logits).abs().max().item()
        tol = 1e-6 * logits.abs().max().item()
        status = "ok" if diff <= tol else "MISMATCH"
        bad += status != "ok"
        print(f"{name}: transformers loads our folder; max |logit diff| {diff:.3g} ({status})")
    from transformers import AutoTokenizer
    folder = os.path.join(ours, "tokenizer")
    with open(os.path.join(ref_root, "tokenizer", "samples.json")) as f:
        ref = json.load(f)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        got = [tok.encode(s, add_special_tokens=False) for s in ref["samples"]]
        ok = got == ref["ids"]
    except Exception as e:  # noqa: BLE001 (report, then fail)
        print(f"tokenizer: {e}")
        ok = False
    bad += not ok
    print(f"tokenizer: AutoTokenizer loads our folder; sample ids {'equal' if ok else 'DIFFER'}")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "testdata", "llama"),
                    help="output folder (generation) or reference folder (--check-ours)")
    ap.add_argument("--check-ours", metavar="DIR", help="load folders written by our Rust code")
    args = ap.parse_args()
    if args.check_ours:
        sys.exit(check_ours(args.check_ours, args.out))
    generate(args.out)


if __name__ == "__main__":
    main()
