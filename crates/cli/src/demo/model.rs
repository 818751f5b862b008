//! The demo's language model: a character-level MLP over a fixed context window.
//!
//! ```text
//! x0 = concat(embed[c_1], …, embed[c_K])            [n, K·E]
//! a1 = gelu(fc1(x0))                                [n, H]
//! a2 = gelu(fc2(a1))                                [n, H]
//! logits = lm_head(a2)                              [n, V]
//! ```
//!
//! `fc1`/`fc2` are either dense f32 (pretraining, and the merged model) or `LoraLinear`s over a
//! 4-bit NF4 base (QLoRA). The embedding and `lm_head` stay dense and frozen during the fine-tune,
//! as transformers keeps them when it loads a model in 4 bits.

use super::DemoError;
use faer::{Accum, MatMut, MatRef, Par};
use qlora_lora::{ForwardCache, LoraGrads, LoraLinear, Mode};
use qlora_optim::{Adam, ParamId, ParamUpdate, StateStorage, TensorMut, TensorRef};
use rayon::prelude::*;
use std::collections::HashMap;

/// Characters of context the model sees.
pub(crate) const CONTEXT: usize = 8;
/// Embedding width per character.
pub(crate) const EMBED: usize = 32;
/// Width of the hidden layers.
pub(crate) const HIDDEN: usize = 256;
/// Input width of `fc1`: the concatenated embeddings.
pub(crate) const FC1_IN: usize = CONTEXT * EMBED;

/// Module paths, as a transformers model would name them (PEFT keys are built from these).
pub(crate) const EMBED_NAME: &str = "model.embed_tokens";
/// The two hidden layers.
pub(crate) const FC_NAMES: [&str; 2] = ["model.mlp.fc1", "model.mlp.fc2"];
/// The output layer.
pub(crate) const HEAD_NAME: &str = "lm_head";

/// The character vocabulary: every character of the embedded texts, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Vocab {
    chars: Vec<char>,
    index: HashMap<char, u32>,
}

impl Vocab {
    /// The sorted set of characters of `texts`.
    pub(crate) fn from_texts(texts: &[&str]) -> Self {
        let mut chars: Vec<char> = texts.iter().flat_map(|t| t.chars()).collect();
        chars.sort_unstable();
        chars.dedup();
        Self::from_chars(chars)
    }

    /// A vocabulary with exactly these characters, in this order.
    pub(crate) fn from_chars(chars: Vec<char>) -> Self {
        let index = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Vocab { chars, index }
    }

    /// Number of symbols.
    pub(crate) fn len(&self) -> usize {
        self.chars.len()
    }

    /// The characters in index order, as one string (stored in checkpoint metadata).
    pub(crate) fn as_string(&self) -> String {
        self.chars.iter().collect()
    }

    /// Token ids of `text`; a character outside the vocabulary is an error.
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, DemoError> {
        text.chars()
            .map(|c| {
                self.index.get(&c).copied().ok_or_else(|| {
                    DemoError::Invalid(format!("character {c:?} is not in the vocabulary"))
                })
            })
            .collect()
    }

    /// The character of token `t`.
    pub(crate) fn decode(&self, t: u32) -> char {
        self.chars[t as usize]
    }
}

/// A small deterministic generator (SplitMix64): weights, batches and sampling depend only on
/// the seed.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f32 {
        let u1 = self.next_f64().max(1e-300);
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// A dense linear layer `y = x·Wᵀ + b`, `W: [out, in]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DenseLinear {
    pub(crate) w: Vec<f32>,
    pub(crate) b: Vec<f32>,
    pub(crate) out_f: usize,
    pub(crate) in_f: usize,
}

impl DenseLinear {
    /// torch's `nn.Linear` initialization: `W, b ~ U(±1/√in)`.
    fn init(out_f: usize, in_f: usize, rng: &mut SplitMix64) -> Self {
        let bound = 1.0 / (in_f as f64).sqrt();
        let mut u = || ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
        let w = (0..out_f * in_f).map(|_| u()).collect();
        let b = (0..out_f).map(|_| u()).collect();
        DenseLinear { w, b, out_f, in_f }
    }

    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0; n * self.out_f];
        for row in y.chunks_mut(self.out_f) {
            row.copy_from_slice(&self.b);
        }
        gemm(
            &mut y,
            (n, self.out_f),
            view(x, n, self.in_f),
            view(&self.w, self.out_f, self.in_f).transpose(),
            Accum::Add,
        );
        y
    }

    /// ∂L/∂x = G·W.
    fn grad_input(&self, g: &[f32], n: usize) -> Vec<f32> {
        let mut dx = vec![0.0; n * self.in_f];
        gemm(
            &mut dx,
            (n, self.in_f),
            view(g, n, self.out_f),
            view(&self.w, self.out_f, self.in_f),
            Accum::Replace,
        );
        dx
    }

    /// (∂L/∂W, ∂L/∂b) = (Gᵀ·X, Σ_rows G).
    fn grad_params(&self, x: &[f32], g: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut dw = vec![0.0; self.out_f * self.in_f];
        gemm(
            &mut dw,
            (self.out_f, self.in_f),
            view(g, n, self.out_f).transpose(),
            view(x, n, self.in_f),
            Accum::Replace,
        );
        let mut db = vec![0.0f32; self.out_f];
        for row in g.chunks(self.out_f) {
            db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
        }
        (dw, db)
    }
}

/// A hidden layer: dense (pretraining, merged model) or LoRA over a 4-bit base (fine-tune).
#[derive(Debug, Clone)]
pub(crate) enum Hidden {
    Dense(DenseLinear),
    Lora(Box<LoraLinear>),
}

impl Hidden {
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        mode: Mode,
    ) -> Result<(Vec<f32>, Option<ForwardCache>), DemoError> {
        match self {
            Hidden::Dense(d) => Ok((d.forward(x, n), None)),
            Hidden::Lora(l) => {
                let (y, cache) = l.forward(x, n, mode)?;
                Ok((y, Some(cache)))
            }
        }
    }
}

/// The model: embedding, two hidden layers, output head.
#[derive(Debug, Clone)]
pub(crate) struct CharMlp {
    pub(crate) vocab_size: usize,
    /// `[V, E]`.
    pub(crate) embed: Vec<f32>,
    pub(crate) fc: [Hidden; 2],
    pub(crate) head: DenseLinear,
}

/// What a forward pass keeps for the backward pass.
#[derive(Debug)]
pub(crate) struct Activations {
    n: usize,
    x0: Vec<f32>,
    z1: Vec<f32>,
    a1: Vec<f32>,
    z2: Vec<f32>,
    a2: Vec<f32>,
    /// The output logits `[n, V]`.
    pub(crate) logits: Vec<f32>,
    caches: [Option<ForwardCache>; 2],
}

impl Activations {
    /// Bytes of f32 activations held between forward and backward (the LoRA caches hold
    /// `n·r` floats per layer, counted by the caller who knows r).
    pub(crate) fn bytes(&self) -> usize {
        4 * (self.x0.len()
            + self.z1.len()
            + self.a1.len()
            + self.z2.len()
            + self.a2.len()
            + self.logits.len())
    }
}

/// Gradients of every parameter of a dense model (pretraining).
#[derive(Debug)]
pub(crate) struct DenseGrads {
    embed: Vec<f32>,
    fc: [(Vec<f32>, Vec<f32>); 2],
    head: (Vec<f32>, Vec<f32>),
}

/// Optimizer ids of a dense model's parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DenseIds {
    embed: ParamId,
    fc: [(ParamId, ParamId); 2],
    head: (ParamId, ParamId),
}

const GELU_C: f32 = 0.797_884_6; // √(2/π)

fn gelu(z: f32) -> f32 {
    0.5 * z * (1.0 + (GELU_C * (z + 0.044_715 * z * z * z)).tanh())
}

fn gelu_grad(z: f32) -> f32 {
    let t = (GELU_C * (z + 0.044_715 * z * z * z)).tanh();
    0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044_715 * z * z)
}

fn view(s: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(s, rows, cols)
}

/// `dst[m, n] (+)= lhs · rhs`, `dst` row-major and contiguous.
fn gemm(
    dst: &mut [f32],
    dims: (usize, usize),
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    accum: Accum,
) {
    let (m, n) = dims;
    if m == 0 || n == 0 {
        return;
    }
    // A row-major m×n matrix is the transpose of a column-major n×m one.
    let d = MatMut::from_column_major_slice_mut(dst, n, m).transpose_mut();
    faer::linalg::matmul::matmul(d, accum, lhs, rhs, 1.0f32, Par::rayon(0));
}

/// Mean cross-entropy of `logits: [n, V]` against `targets`, and ∂(mean loss)/∂logits.
pub(crate) fn cross_entropy(logits: &[f32], targets: &[u32], v: usize) -> (f64, Vec<f32>) {
    let n = targets.len();
    let mut grad = vec![0.0f32; logits.len()];
    // Per-row losses in parallel, summed sequentially: a parallel `sum` would group the terms by
    // rayon's work stealing, and the reload check compares losses exactly.
    let losses: Vec<f64> = grad
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .map(|((g, l), &t)| {
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f64;
            for (gi, &li) in g.iter_mut().zip(l) {
                let e = ((li - max) as f64).exp();
                *gi = e as f32;
                sum += e;
            }
            for gi in g.iter_mut() {
                *gi = (*gi as f64 / sum / n as f64) as f32;
            }
            g[t as usize] -= 1.0 / n as f32;
            sum.ln() - (l[t as usize] - max) as f64
        })
        .collect();
    let total: f64 = losses.iter().sum();
    (total / n as f64, grad)
}

/// Contexts and targets: for each position `p`, the `CONTEXT` tokens before it and `tokens[p]`.
pub(crate) fn windows(tokens: &[u32], positions: &[usize]) -> (Vec<u32>, Vec<u32>) {
    let mut ctx = Vec::with_capacity(positions.len() * CONTEXT);
    let mut tgt = Vec::with_capacity(positions.len());
    for &p in positions {
        ctx.extend_from_slice(&tokens[p - CONTEXT..p]);
        tgt.push(tokens[p]);
    }
    (ctx, tgt)
}

impl CharMlp {
    /// A freshly initialized dense model (embedding `N(0, 1)` as torch's `nn.Embedding`).
    pub(crate) fn init(vocab_size: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let embed = (0..vocab_size * EMBED).map(|_| rng.normal()).collect();
        let fc1 = DenseLinear::init(HIDDEN, FC1_IN, &mut rng);
        let fc2 = DenseLinear::init(HIDDEN, HIDDEN, &mut rng);
        let head = DenseLinear::init(vocab_size, HIDDEN, &mut rng);
        CharMlp {
            vocab_size,
            embed,
            fc: [Hidden::Dense(fc1), Hidden::Dense(fc2)],
            head,
        }
    }

    /// Forward pass over `n = ctx.len() / CONTEXT` contexts.
    pub(crate) fn forward(&self, ctx: &[u32], mode: Mode) -> Result<Activations, DemoError> {
        let n = ctx.len() / CONTEXT;
        let mut x0 = vec![0.0f32; n * FC1_IN];
        for (row, &t) in x0.chunks_mut(EMBED).zip(ctx) {
            let t = t as usize;
            row.copy_from_slice(&self.embed[t * EMBED..(t + 1) * EMBED]);
        }
        let mode_for = |layer: u64| match mode {
            Mode::Train { seed } => Mode::Train {
                seed: seed.wrapping_mul(0x100_0000_01B3).wrapping_add(layer),
            },
            Mode::Eval => Mode::Eval,
        };
        let (z1, c1) = self.fc[0].forward(&x0, n, mode_for(1))?;
        let a1: Vec<f32> = z1.par_iter().map(|&z| gelu(z)).collect();
        let (z2, c2) = self.fc[1].forward(&a1, n, mode_for(2))?;
        let a2: Vec<f32> = z2.par_iter().map(|&z| gelu(z)).collect();
        let logits = self.head.forward(&a2, n);
        Ok(Activations {
            n,
            x0,
            z1,
            a1,
            z2,
            a2,
            logits,
            caches: [c1, c2],
        })
    }

    /// ∂L/∂a2 → ∂L/∂z2 (through the frozen or trained head and the nonlinearity).
    fn grad_z2(&self, act: &Activations, dlogits: &[f32]) -> Vec<f32> {
        let mut dz2 = self.head.grad_input(dlogits, act.n);
        dz2.par_iter_mut()
            .zip(act.z2.par_iter())
            .for_each(|(d, &z)| *d *= gelu_grad(z));
        dz2
    }

    /// Backward pass of a dense model: gradients of every parameter.
    pub(crate) fn backward_dense(
        &self,
        ctx: &[u32],
        act: &Activations,
        dlogits: &[f32],
    ) -> Result<DenseGrads, DemoError> {
        let (Hidden::Dense(fc1), Hidden::Dense(fc2)) = (&self.fc[0], &self.fc[1]) else {
            return Err(DemoError::Invalid("backward_dense on a LoRA model".into()));
        };
        let n = act.n;
        let head = self.head.grad_params(&act.a2, dlogits, n);
        let dz2 = self.grad_z2(act, dlogits);
        let g2 = fc2.grad_params(&act.a1, &dz2, n);
        let mut dz1 = fc2.grad_input(&dz2, n);
        dz1.par_iter_mut()
            .zip(act.z1.par_iter())
            .for_each(|(d, &z)| *d *= gelu_grad(z));
        let g1 = fc1.grad_params(&act.x0, &dz1, n);
        let dx0 = fc1.grad_input(&dz1, n);
        let mut embed = vec![0.0f32; self.embed.len()];
        for (row, &t) in dx0.chunks(EMBED).zip(ctx) {
            let t = t as usize;
            embed[t * EMBED..(t + 1) * EMBED]
                .iter_mut()
                .zip(row)
                .for_each(|(e, d)| *e += d);
        }
        Ok(DenseGrads {
            embed,
            fc: [g1, g2],
            head,
        })
    }

    /// Backward pass of a QLoRA model: the LoRA gradients of `fc1` and `fc2` (everything else
    /// is frozen; ∂L/∂x0 is computed by the layer but not needed).
    pub(crate) fn backward_lora(
        &self,
        act: &Activations,
        dlogits: &[f32],
    ) -> Result<[LoraGrads; 2], DemoError> {
        let (Hidden::Lora(fc1), Hidden::Lora(fc2)) = (&self.fc[0], &self.fc[1]) else {
            return Err(DemoError::Invalid("backward_lora on a dense model".into()));
        };
        let [Some(c1), Some(c2)] = &act.caches else {
            return Err(DemoError::Invalid("forward caches are missing".into()));
        };
        let dz2 = self.grad_z2(act, dlogits);
        let g2 = fc2.backward(&act.a1, c2, &dz2)?;
        let mut dz1 = g2.x.clone();
        dz1.par_iter_mut()
            .zip(act.z1.par_iter())
            .for_each(|(d, &z)| *d *= gelu_grad(z));
        let g1 = fc1.backward(&act.x0, c1, &dz1)?;
        Ok([g1, g2])
    }

    /// Register every dense parameter with an optimizer (group 0).
    pub(crate) fn register_dense<S: StateStorage>(
        &self,
        opt: &mut Adam<S>,
    ) -> Result<DenseIds, DemoError> {
        let (Hidden::Dense(fc1), Hidden::Dense(fc2)) = (&self.fc[0], &self.fc[1]) else {
            return Err(DemoError::Invalid("register_dense on a LoRA model".into()));
        };
        let mut pair = |l: &DenseLinear| -> Result<(ParamId, ParamId), DemoError> {
            Ok((opt.add_param(0, l.w.len())?, opt.add_param(0, l.b.len())?))
        };
        let fc = [pair(fc1)?, pair(fc2)?];
        let head = pair(&self.head)?;
        Ok(DenseIds {
            embed: opt.add_param(0, self.embed.len())?,
            fc,
            head,
        })
    }

    /// One optimizer step over every dense parameter.
    pub(crate) fn step_dense<S: StateStorage>(
        &mut self,
        opt: &mut Adam<S>,
        ids: &DenseIds,
        grads: &DenseGrads,
    ) -> Result<(), DemoError> {
        let [Hidden::Dense(fc1), Hidden::Dense(fc2)] = &mut self.fc else {
            return Err(DemoError::Invalid("step_dense on a LoRA model".into()));
        };
        let mut updates = vec![ParamUpdate {
            id: ids.embed,
            param: TensorMut::F32(&mut self.embed),
            grad: TensorRef::F32(&grads.embed),
        }];
        for ((layer, id), g) in [fc1, fc2, &mut self.head]
            .into_iter()
            .zip([ids.fc[0], ids.fc[1], ids.head])
            .zip([&grads.fc[0], &grads.fc[1], &grads.head])
        {
            updates.push(ParamUpdate {
                id: id.0,
                param: TensorMut::F32(&mut layer.w),
                grad: TensorRef::F32(&g.0),
            });
            updates.push(ParamUpdate {
                id: id.1,
                param: TensorMut::F32(&mut layer.b),
                grad: TensorRef::F32(&g.1),
            });
        }
        opt.step(&mut updates)?;
        Ok(())
    }

    /// Mean cross-entropy (nats per character) over every position of `tokens` that has a full
    /// context, in evaluation mode.
    pub(crate) fn mean_loss(&self, tokens: &[u32]) -> Result<f64, DemoError> {
        const CHUNK: usize = 1024;
        if tokens.len() <= CONTEXT {
            return Err(DemoError::Invalid(format!(
                "text of {} characters is shorter than the context plus one ({})",
                tokens.len(),
                CONTEXT + 1
            )));
        }
        let positions: Vec<usize> = (CONTEXT..tokens.len()).collect();
        let mut total = 0.0f64;
        for chunk in positions.chunks(CHUNK) {
            let (ctx, tgt) = windows(tokens, chunk);
            let act = self.forward(&ctx, Mode::Eval)?;
            let (loss, _) = cross_entropy(&act.logits, &tgt, self.vocab_size);
            total += loss * chunk.len() as f64;
        }
        Ok(total / positions.len() as f64)
    }

    /// Sample `len` tokens after `prompt` (its last `CONTEXT` tokens are the first context), at
    /// `temperature`, with a seeded generator: the same seed gives the same text.
    pub(crate) fn generate(
        &self,
        prompt: &[u32],
        len: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<u32>, DemoError> {
        if prompt.len() < CONTEXT {
            return Err(DemoError::Invalid(format!(
                "prompt needs at least {CONTEXT} characters"
            )));
        }
        let mut rng = SplitMix64::new(seed);
        let mut ctx = prompt[prompt.len() - CONTEXT..].to_vec();
        let mut out = Vec::with_capacity(len);
        for _ in 0..len {
            let act = self.forward(&ctx, Mode::Eval)?;
            let l = &act.logits;
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let p: Vec<f64> = l
                .iter()
                .map(|&x| ((x as f64 - max) / temperature).exp())
                .collect();
            let mut u = rng.next_f64() * p.iter().sum::<f64>();
            let mut next = p.len() - 1;
            for (i, pi) in p.iter().enumerate() {
                if u < *pi {
                    next = i;
                    break;
                }
                u -= pi;
            }
            out.push(next as u32);
            ctx.remove(0);
            ctx.push(next as u32);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The analytic gradients of the dense model match central finite differences.
    #[test]
    fn dense_gradients_match_finite_differences() {
        let v = 7;
        let mut model = CharMlp::init(v, 3);
        let ctx: Vec<u32> = (0..3 * CONTEXT as u32)
            .map(|i| (i * 5 + 1) % v as u32)
            .collect();
        let tgt = vec![1u32, 4, 6];
        let loss_of = |m: &CharMlp| -> f64 {
            let act = m.forward(&ctx, Mode::Eval).unwrap();
            cross_entropy(&act.logits, &tgt, v).0
        };
        let act = model.forward(&ctx, Mode::Eval).unwrap();
        let (_, dl) = cross_entropy(&act.logits, &tgt, v);
        let g = model.backward_dense(&ctx, &act, &dl).unwrap();
        let h = 1e-2f32;
        // A few coordinates of each parameter kind.
        let checks: Vec<(&str, usize, f32)> = vec![
            ("embed", 5, g.embed[5]),
            ("embed", EMBED + 3, g.embed[EMBED + 3]),
            ("w1", 17, g.fc[0].0[17]),
            ("b1", 9, g.fc[0].1[9]),
            ("w2", 300, g.fc[1].0[300]),
            ("head", 40, g.head.0[40]),
            ("bh", 2, g.head.1[2]),
        ];
        for (what, i, analytic) in checks {
            let mut numeric = 0.0f64;
            for sign in [1.0f32, -1.0] {
                let mut m = model.clone();
                let slot = match what {
                    "embed" => &mut m.embed[i],
                    "w1" | "b1" | "w2" => {
                        let layer = if what == "w2" { 1 } else { 0 };
                        let Hidden::Dense(d) = &mut m.fc[layer] else {
                            unreachable!()
                        };
                        if what == "b1" {
                            &mut d.b[i]
                        } else {
                            &mut d.w[i]
                        }
                    }
                    "head" => &mut m.head.w[i],
                    _ => &mut m.head.b[i],
                };
                *slot += sign * h;
                numeric += sign as f64 * loss_of(&m);
            }
            numeric /= 2.0 * h as f64;
            let err = (numeric - analytic as f64).abs();
            assert!(
                err <= 2e-3 + 2e-2 * numeric.abs(),
                "{what}[{i}]: analytic {analytic}, numeric {numeric}"
            );
        }
        // And one Adam step on these gradients lowers the loss.
        let before = loss_of(&model);
        let mut opt = Adam::new(qlora_optim::AdamConfig::adam32bit().lr(1e-2)).unwrap();
        let ids = model.register_dense(&mut opt).unwrap();
        model.step_dense(&mut opt, &ids, &g).unwrap();
        assert!(loss_of(&model) < before);
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_v() {
        let (loss, grad) = cross_entropy(&[0.0; 8], &[3, 0], 4);
        assert!((loss - 4f64.ln()).abs() < 1e-9);
        assert!((grad[3] - (0.25 - 1.0) / 2.0).abs() < 1e-7);
        assert!((grad[4] + 0.75 / 2.0).abs() < 1e-7);
    }

    #[test]
    fn vocab_round_trips_and_rejects_unknown_characters() {
        let v = Vocab::from_texts(&["abca", "b\n"]);
        assert_eq!(v.as_string(), "\nabc");
        let ids = v.encode("cab\n").unwrap();
        assert_eq!(ids, vec![3, 1, 2, 0]);
        assert_eq!(
            ids.iter().map(|&t| v.decode(t)).collect::<String>(),
            "cab\n"
        );
        assert!(v.encode("z").is_err());
    }
}
