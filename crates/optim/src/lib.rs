//! Will own AdamW with 32-bit and 8-bit blockwise states (bitsandbytes-exact) and its paged variants.
//! Nothing is implemented here yet.
#![forbid(unsafe_code)]
