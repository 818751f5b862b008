#!/usr/bin/env python3
"""Copy what the Rust tests need from the bitsandbytes CUDA reference vectors (written on an NVIDIA
H200 by bitsandbytes 0.50.2, see ../shared/data/bnb-cuda-sm90/README.md) into testdata/bnb-cuda-sm90/.

* inputs_*.safetensors, quantized_*.safetensors, meta.json: copied unchanged.
* dequantized_*.safetensors: replaced by dequantized_sha256.json (SHA-256 of each tensor's raw
  little-endian bytes), so the tests check bit equality without 6.6 MB of data.
* blockwise8.safetensors: input, codes and absmax kept; the dequantized tensors as SHA-256 in
  blockwise8_sha256.json.
* optim_trajectories.safetensors: p0, grad0..9, NAME.param{0,4,9} and the final states kept.

Deterministic; standard library only (safetensors is parsed and written by hand). Usage:
    python3 tools/gen_bnb_cuda_testdata.py [--src ../shared/data/bnb-cuda-sm90] [--out testdata/bnb-cuda-sm90]
"""
import argparse, glob, hashlib, json, os, shutil, struct


def load_file(path):
    """{name: (dtype, shape, raw bytes)} of a safetensors file, in file order."""
    with open(path, "rb") as fh:
        data = fh.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        s, e = v["data_offsets"]
        out[k] = (v["dtype"], v["shape"], data[base + s:base + e])
    return out


def save_file(tensors, path):
    """Write {name: (dtype, shape, raw bytes)} as safetensors (sorted names, 8-byte aligned header)."""
    header, off, blobs = {}, 0, []
    for k in sorted(tensors):
        dt, shape, raw = tensors[k]
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--src", default=os.path.join(here, "..", "..", "shared", "data", "bnb-cuda-sm90"))
    ap.add_argument("--out", default=os.path.join(here, "..", "testdata", "bnb-cuda-sm90"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for f in sorted(glob.glob(os.path.join(a.src, "inputs_*.safetensors")) +
                    glob.glob(os.path.join(a.src, "quantized_*.safetensors")) + [os.path.join(a.src, "meta.json")]):
        shutil.copyfile(f, os.path.join(a.out, os.path.basename(f)))
        os.chmod(os.path.join(a.out, os.path.basename(f)), 0o644)
    sha = {}
    for f in sorted(glob.glob(os.path.join(a.src, "dequantized_*.safetensors"))):
        t = load_file(f)
        tag = os.path.basename(f)[len("dequantized_"):-len(".safetensors")]
        sha[tag] = {k: hashlib.sha256(v[2]).hexdigest() for k, v in sorted(t.items())}
    with open(os.path.join(a.out, "dequantized_sha256.json"), "w") as fh:
        json.dump(sha, fh, indent=1, sort_keys=True)
        fh.write("\n")
    b8 = load_file(os.path.join(a.src, "blockwise8.safetensors"))
    keep = {k: v for k, v in b8.items() if not k.endswith(".dequantized")}
    save_file(keep, os.path.join(a.out, "blockwise8.safetensors"))
    with open(os.path.join(a.out, "blockwise8_sha256.json"), "w") as fh:
        json.dump({k: hashlib.sha256(v[2]).hexdigest() for k, v in sorted(b8.items())
                   if k.endswith(".dequantized")}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    op = load_file(os.path.join(a.src, "optim_trajectories.safetensors"))
    keep = {k: v for k, v in op.items()
            if not (".param" in k and not k.endswith((".param0", ".param4", ".param9")))}
    save_file(keep, os.path.join(a.out, "optim_trajectories.safetensors"))


if __name__ == "__main__":
    main()
