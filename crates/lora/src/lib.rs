//! Will own LoRA/DoRA adapter math over a 4-bit base (forward, backward, merge, init) and the PEFT
//! adapter file format. Nothing is implemented here yet.
#![forbid(unsafe_code)]
