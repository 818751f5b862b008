#!/usr/bin/env python3
"""Write testdata/malformed/: small hand-made broken checkpoints, one defect each.

Every file goes with the substring its error message must contain (EXPECTED.json); the Rust
tests (crates/checkpoint/tests/malformed.rs, crates/cli/tests/cli.rs) open each file and check
that exact error, not a panic. Standard library only; deterministic.

    python3 tools/gen_malformed.py [--out testdata/malformed]
"""
import argparse
import json
import os
import struct

NF4_MAP = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def safetensors(tensors, header_patch=None, tail=b""):
    """tensors: list of (name, dtype, shape, bytes); returns file bytes (offsets in list order)."""
    header = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":"))
    if header_patch:
        text = header_patch(text)
    text = text.encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data + tail


def state(**kw):
    d = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 32]}
    d.update(kw)
    return json.dumps(d).encode()


def group(name="w", blob=None, packed_len=64, absmax_n=2, extra=(), drop=(), suffix="nf4"):
    """A plain (no double quant) 4-bit group for a [4, 32] weight: 128 elements, 2 blocks."""
    blob = state() if blob is None else blob
    t = [
        (name, "U8", [packed_len, 1], bytes(range(packed_len % 256)) * (packed_len // 256) + bytes(range(packed_len % 256))),
        (f"{name}.absmax", "F32", [absmax_n], f32([0.5] * absmax_n)),
        (f"{name}.quant_map", "F32", [16], f32(NF4_MAP)),
        (f"{name}.quant_state.bitsandbytes__{suffix}", "U8", [len(blob)], blob),
    ]
    t = [x for x in t if x[0] not in drop]
    return t + list(extra)


def cases():
    ok = [("x", "F32", [2], f32([1.0, 2.0]))]
    good = safetensors(ok)
    hdr_len = struct.unpack("<Q", good[:8])[0]
    yield "empty.safetensors", b"", "too short for the 8-byte header length"
    yield "not-safetensors.safetensors", b"PK\x03\x04 this is a zip file, not safetensors", "exceeds the limit"
    yield ("header-past-end.safetensors", struct.pack("<Q", 1000) + b"{}" + b" " * 30,
           "runs past the end of the file")
    yield "header-not-json.safetensors", struct.pack("<Q", 8) + b"{nope!!}", "header JSON"
    yield "header-not-utf8.safetensors", struct.pack("<Q", 8) + b"{\"\xff\xfe\": 1}", "not UTF-8"
    yield "truncated-data.safetensors", good[:-3], "truncated"
    yield "trailing-bytes.safetensors", good + b"\0" * 8, "trailing bytes"
    yield ("overlapping-tensors.safetensors",
           safetensors([("a", "F32", [2], f32([1, 2])), ("b", "F32", [2], f32([3, 4]))],
                       header_patch=lambda t: t.replace('"data_offsets":[8,16]', '"data_offsets":[4,12]')),
           "invalid offset")
    yield ("shape-vs-bytes.safetensors",
           safetensors(ok, header_patch=lambda t: t.replace('"shape":[2]', '"shape":[3]')),
           "invalid shape, data type, or offset")
    yield ("unknown-dtype.safetensors",
           safetensors(ok, header_patch=lambda t: t.replace('"F32"', '"Q7"')),
           "unknown variant")
    yield ("duplicate-tensor.safetensors",
           safetensors(ok, header_patch=lambda t: t.replace('"x":', '"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":')),
           "duplicate key \\\"x\\\"")
    yield ("shape-overflow.safetensors",
           safetensors(ok, header_patch=lambda t: t.replace('"shape":[2]', '"shape":[4294967296,4294967296,4294967296]')),
           "overflow")
    del hdr_len
    # 4-bit groups.
    yield "qs-not-json.safetensors", safetensors(group(blob=b"{not json")), "quant state JSON: not a JSON object"
    yield "qs-unknown-quant-type.safetensors", safetensors(group(blob=state(quant_type="nf5"))), "\"quant_type\""
    yield "qs-blocksize-48.safetensors", safetensors(group(blob=state(blocksize=48))), "\"blocksize\""
    yield "qs-blocksize-8192.safetensors", safetensors(group(blob=state(blocksize=8192))), "\"blocksize\""
    yield "qs-unsupported-dtype.safetensors", safetensors(group(blob=state(dtype="int8"))), "\"dtype\""
    yield "qs-huge-shape.safetensors", safetensors(group(blob=state(shape=[1 << 40, 1 << 40]))), "too many elements"
    yield ("qs-nan-offset.safetensors",
           safetensors(group(blob=state(nested_blocksize=256, nested_dtype="float32", nested_offset=float("nan")))),
           "quant state JSON: not a JSON object")
    yield ("qs-duplicate-key.safetensors",
           safetensors(group(blob=state()[:-1] + b", \"blocksize\": 4096}")),
           "duplicate key \\\"blocksize\\\"")
    yield "qs-unknown-key.safetensors", safetensors(group(blob=state(scale=2))), "unexpected key \\\"scale\\\""
    yield ("qs-missing-absmax.safetensors", safetensors(group(drop=("w.absmax",))),
           "missing key \\\"w.absmax\\\"")
    yield ("qs-type-vs-key.safetensors", safetensors(group(suffix="fp4")),
           "quant state says \\\"nf4\\\" but its key says fp4")
    yield ("qs-nested-without-offset.safetensors",
           safetensors(group(extra=[("w.nested_absmax", "F32", [1], f32([1.0]))])),
           "but its quant state has no nested_offset")
    yield ("qs-state-not-u8.safetensors",
           safetensors([("w.quant_state.bitsandbytes__nf4", "F32", [2], f32([1, 2]))] + group()[:3]),
           "quant state must be a 1-D uint8 tensor")
    # Detected when the group is read (checkpoint.quantized / dequantize), not at open.
    yield "qs-packed-length.safetensors", safetensors(group(packed_len=63)), "packed weight has 63 bytes"
    yield "qs-absmax-count.safetensors", safetensors(group(absmax_n=3)), "expected 2 elements"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "testdata", "malformed"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    expected = {}
    for name, data, want in cases():
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(data)
        expected[name] = want.replace('\\"', '"')
    with open(os.path.join(args.out, "EXPECTED.json"), "w") as f:
        json.dump(expected, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(expected)} files to {args.out}")


if __name__ == "__main__":
    main()
