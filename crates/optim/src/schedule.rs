//! Learning-rate schedules of QLoRA recipes (transformers' `get_*_schedule_with_warmup`).

use crate::error::Error;

/// A multiplicative learning-rate schedule; group `g` uses `initial_lr[g] · factor(k)` for the
/// optimizer step that follows `k` completed steps (transformers' `LambdaLR`: the very first
/// step uses `factor(0)`, which is 0 during warmup).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// Always 1.
    Constant,
    /// Linear warmup from 0, then 1 (QLoRA's default: `constant` with `warmup_ratio = 0.03`).
    ConstantWithWarmup {
        /// Warmup steps.
        warmup_steps: u64,
    },
    /// Linear warmup, then linear decay to 0 at `total_steps`.
    Linear {
        /// Warmup steps.
        warmup_steps: u64,
        /// Total training steps.
        total_steps: u64,
    },
    /// Linear warmup, then cosine decay (`num_cycles = 0.5`: from 1 to 0 at `total_steps`).
    Cosine {
        /// Warmup steps.
        warmup_steps: u64,
        /// Total training steps.
        total_steps: u64,
        /// Number of cosine half-periods times 0.5 (transformers' default 0.5).
        num_cycles: f64,
    },
}

/// transformers' `TrainingArguments.get_warmup_steps`: `ceil(total_steps · ratio)`.
pub fn warmup_steps_from_ratio(total_steps: u64, ratio: f64) -> Result<u64, Error> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(Error::Schedule(format!(
            "warmup ratio {ratio} is outside [0, 1]"
        )));
    }
    Ok((total_steps as f64 * ratio).ceil() as u64)
}

impl LrSchedule {
    /// Check that the schedule can be evaluated (`warmup_steps <= total_steps`, finite cycles).
    pub fn validate(&self) -> Result<(), Error> {
        match *self {
            LrSchedule::Linear {
                warmup_steps,
                total_steps,
            }
            | LrSchedule::Cosine {
                warmup_steps,
                total_steps,
                ..
            } if warmup_steps > total_steps => Err(Error::Schedule(format!(
                "warmup_steps {warmup_steps} exceed total_steps {total_steps}"
            ))),
            LrSchedule::Cosine { num_cycles, .. } if !num_cycles.is_finite() => Err(
                Error::Schedule(format!("num_cycles {num_cycles} is not finite")),
            ),
            _ => Ok(()),
        }
    }

    /// The factor for the step after `k` completed steps (f64, as Python computes it).
    pub fn factor(&self, k: u64) -> f64 {
        let warm = |w: u64| k as f64 / (w.max(1)) as f64;
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup { warmup_steps } => {
                if k < warmup_steps {
                    warm(warmup_steps)
                } else {
                    1.0
                }
            }
            LrSchedule::Linear {
                warmup_steps,
                total_steps,
            } => {
                if k < warmup_steps {
                    warm(warmup_steps)
                } else {
                    let left = total_steps as f64 - k as f64;
                    let span = (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
                    (left / span).max(0.0)
                }
            }
            LrSchedule::Cosine {
                warmup_steps,
                total_steps,
                num_cycles,
            } => {
                if k < warmup_steps {
                    warm(warmup_steps)
                } else {
                    let span = (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
                    let progress = (k - warmup_steps) as f64 / span;
                    (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos()))
                        .max(0.0)
                }
            }
        }
    }
}
