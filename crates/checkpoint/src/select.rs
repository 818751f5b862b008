//! Which tensors of a checkpoint get quantized.

use crate::{Error, Result};
use regex::Regex;
use safetensors::Dtype as StDtype;

/// The rule choosing tensors to quantize.
///
/// Default (what transformers quantizes in a causal LM): floating-point 2-D tensors whose name ends
/// in `.weight`, except embeddings (`embed`, `wte`, `wpe`), norms (`norm`, `ln_`) and `lm_head`.
/// `--only` patterns replace the default rule (any floating-point tensor matching one is chosen);
/// `--skip` patterns always exclude.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    only: Vec<Regex>,
    skip: Vec<Regex>,
}

impl Selection {
    /// Build from `--only` and `--skip` regular expressions (searched anywhere in the name).
    pub fn new(only: &[String], skip: &[String]) -> Result<Self> {
        let compile = |p: &String| {
            Regex::new(p).map_err(|e| {
                // regex's syntax errors span several lines (pattern, caret, message); keep the
                // message so that errors stay on one line.
                let text = e.to_string();
                let reason = text
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
                    .to_string();
                Error::Option(format!("bad regular expression {p:?}: {reason}"))
            })
        };
        Ok(Selection {
            only: only.iter().map(compile).collect::<Result<_>>()?,
            skip: skip.iter().map(compile).collect::<Result<_>>()?,
        })
    }

    /// Whether the tensor `name` of `dtype` and `shape` is to be quantized.
    pub fn selects(&self, name: &str, dtype: StDtype, shape: &[usize]) -> bool {
        let float = matches!(dtype, StDtype::F32 | StDtype::F16 | StDtype::BF16);
        let numel: usize = shape.iter().product();
        if !float || numel == 0 || self.skip.iter().any(|r| r.is_match(name)) {
            return false;
        }
        if !self.only.is_empty() {
            return self.only.iter().any(|r| r.is_match(name));
        }
        default_rule(name, shape)
    }
}

/// The default rule (see [`Selection`]).
pub fn default_rule(name: &str, shape: &[usize]) -> bool {
    let lower = name.to_ascii_lowercase();
    shape.len() == 2
        && lower.ends_with(".weight")
        && !["embed", "wte", "wpe", "norm", "ln_", "lm_head"]
            .iter()
            .any(|k| lower.contains(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_selection() {
        let s = Selection::default();
        let bf = StDtype::BF16;
        assert!(s.selects("model.layers.0.self_attn.q_proj.weight", bf, &[64, 64]));
        assert!(s.selects(
            "model.layers.0.mlp.down_proj.weight",
            StDtype::F32,
            &[64, 176]
        ));
        assert!(!s.selects("model.embed_tokens.weight", bf, &[256, 64]));
        assert!(!s.selects("lm_head.weight", bf, &[256, 64]));
        assert!(!s.selects("model.layers.0.input_layernorm.weight", bf, &[64]));
        assert!(!s.selects("model.norm.weight", bf, &[64, 2]));
        assert!(!s.selects("model.layers.0.self_attn.q_proj.bias", bf, &[64]));
        assert!(!s.selects("x.weight", StDtype::I32, &[4, 4]));
        let s = Selection::new(&["lm_head".into()], &[]).unwrap();
        assert!(s.selects("lm_head.weight", bf, &[256, 64]));
        assert!(!s.selects("model.layers.0.mlp.up_proj.weight", bf, &[64, 64]));
        let s = Selection::new(&[], &["mlp".into()]).unwrap();
        assert!(!s.selects("model.layers.0.mlp.up_proj.weight", bf, &[64, 64]));
        assert!(Selection::new(&["(".into()], &[]).is_err());
    }
}
