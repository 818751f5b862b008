//! Training data for causal LMs: a byte-level BPE tokenizer (trained, saved and loaded as Hugging
//! Face `tokenizer.json` through the `tokenizers` crate) and token datasets read from `.txt`
//! (packed into `seq_len` chunks) or `.jsonl` (`text`, or `prompt` + `completion` with the prompt
//! not scored), batched in a seeded shuffled order.
//!
//! ```
//! use candle_core::Device;
//! use qlora_candle::data::{BpeTokenizer, TokenDataset};
//!
//! let text = "the cat sat on the mat. the cat ate the rat. ".repeat(20);
//! let tok = BpeTokenizer::train(&[text.as_str()], 300, &["<|endoftext|>"])?;
//! assert_eq!(tok.decode(&tok.encode("the cat")?)?, "the cat");
//! let data = TokenDataset::from_text(&tok, &text, 16)?;
//! let batches = data.batches(4, 7, 0, &Device::Cpu)?;
//! assert_eq!(batches[0].input_ids.dims()[0], 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::llama::IGNORE_INDEX;

/// What can go wrong reading, tokenizing or batching data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A `.jsonl` line is not a JSON object of strings.
    #[error("line {line}: {msg}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A `.jsonl` record has a field other than `text`, `prompt`, `completion`.
    #[error("line {line}: unknown field {field:?} (a record has \"text\", or \"prompt\" and \"completion\")")]
    UnknownField {
        /// 1-based line number.
        line: usize,
        /// The field.
        field: String,
    },
    /// The data holds no trainable tokens.
    #[error("no training data: {0}")]
    Empty(String),
    /// The data file's extension is neither `.txt` nor `.jsonl`.
    #[error("{0}: unsupported data file (expected .txt or .jsonl)")]
    UnsupportedFile(PathBuf),
    /// An error from the `tokenizers` crate (training, loading, encoding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A bad argument (sequence length, batch size, vocabulary size).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn tok_err(e: tokenizers::Error) -> DataError {
    DataError::Tokenizer(e.to_string())
}

/// A Hugging Face tokenizer (`tokenizer.json`), with training of a GPT-2-style byte-level BPE.
#[derive(Debug, Clone)]
pub struct BpeTokenizer {
    inner: Tokenizer,
}

impl BpeTokenizer {
    /// Trains a byte-level BPE (GPT-2's pre-tokenizer and decoder, no prefix space; all 256 byte
    /// symbols in the base alphabet, so any text encodes) of `vocab_size` tokens on `texts`, with
    /// `special_tokens` given the first ids. Merges need a pair to occur at least twice.
    /// The same texts and settings give the same tokenizer as Python `tokenizers` (tested).
    pub fn train(
        texts: &[&str],
        vocab_size: usize,
        special_tokens: &[&str],
    ) -> Result<Self, DataError> {
        let min = 256 + special_tokens.len();
        if vocab_size < min {
            return Err(DataError::InvalidArgument(format!(
                "vocab_size {vocab_size} is below the {min} byte and special tokens"
            )));
        }
        if texts.iter().all(|t| t.is_empty()) {
            return Err(DataError::Empty(
                "no text to train the tokenizer on".to_string(),
            ));
        }
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                special_tokens
                    .iter()
                    .map(|s| AddedToken::from(s.to_string(), true))
                    .collect(),
            )
            .initial_alphabet(alphabet)
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        let mut inner = Tokenizer::new(BPE::default());
        let byte_level = ByteLevel::new(false, true, true);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_post_processor(Some(byte_level));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner
            .train(&mut trainer, texts.iter().copied())
            .map_err(tok_err)?;
        Ok(Self { inner })
    }

    /// Loads a `tokenizer.json` (any model the `tokenizers` crate reads: BPE, Unigram,
    /// WordPiece, ...).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let inner = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Writes `tokenizer.json` to `path` (loadable by Python `tokenizers.Tokenizer.from_file`
    /// and transformers' `PreTrainedTokenizerFast(tokenizer_file=...)`).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), DataError> {
        let path = path.as_ref();
        self.inner
            .save(path, false)
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` naming `eos_token` (if any) into
    /// the folder `dir`, so that `AutoTokenizer.from_pretrained(dir)` loads it.
    pub fn save_pretrained(
        &self,
        dir: impl AsRef<Path>,
        eos_token: Option<&str>,
        model_max_length: usize,
    ) -> Result<(), DataError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        self.save(dir.join("tokenizer.json"))?;
        let mut cfg = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
        });
        if let Some(eos) = eos_token {
            cfg["eos_token"] = eos.into();
            cfg["bos_token"] = eos.into();
            cfg["unk_token"] = eos.into();
        }
        let path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&cfg).unwrap_or_default() + "\n";
        std::fs::write(&path, text).map_err(|source| DataError::Io { path, source })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Number of tokens, special tokens included (the model's `vocab_size` must be at least this).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token (e.g. a special token), if it exists.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// One training sequence: token ids and their labels (the id, or -100 where not scored). The loss
/// shifts labels itself (see [`causal_lm_loss`](crate::llama::causal_lm_loss)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; -100 for positions not scored.
    pub labels: Vec<i64>,
}

/// A padded batch: `input_ids` `[batch, len]` u32 and `labels` `[batch, len]` i64, `len` the longest
/// example of the batch; padding is id `pad_id` with label -100 (on the right, so the causal mask
/// keeps it out of every real position).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids.
    pub input_ids: Tensor,
    /// Labels (-100 = ignored).
    pub labels: Tensor,
}

/// A list of [`Example`]s no longer than `seq_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDataset {
    examples: Vec<Example>,
    seq_len: usize,
    pad_id: u32,
}

fn check_seq_len(seq_len: usize) -> Result<(), DataError> {
    if seq_len < 2 {
        return Err(DataError::InvalidArgument(format!(
            "seq_len {seq_len} is below 2 (a causal LM needs a next token)"
        )));
    }
    Ok(())
}

/// Splits `ids` into examples of at most `seq_len` tokens, labels = ids; a final piece shorter
/// than 2 tokens has nothing to predict and is dropped.
fn pack(ids: &[u32], seq_len: usize, out: &mut Vec<Example>) {
    for chunk in ids.chunks(seq_len) {
        if chunk.len() >= 2 {
            out.push(Example {
                input_ids: chunk.to_vec(),
                labels: chunk.iter().map(|&i| i64::from(i)).collect(),
            });
        }
    }
}

impl TokenDataset {
    /// Tokenizes `text` as one stream and packs it into consecutive `seq_len`-token examples (the
    /// last one may be shorter). Errors if fewer than 2 tokens result.
    pub fn from_text(tok: &BpeTokenizer, text: &str, seq_len: usize) -> Result<Self, DataError> {
        check_seq_len(seq_len)?;
        let ids = tok.encode(text)?;
        let mut examples = Vec::new();
        pack(&ids, seq_len, &mut examples);
        Self::new(examples, seq_len, tok)
    }

    /// Reads JSON Lines: each non-blank line is an object with either `"text"` (tokenized, `eos`
    /// appended if given, packed into `seq_len` pieces like [`from_text`](Self::from_text)) or
    /// `"prompt"` and `"completion"` (one example: prompt tokens labelled -100, then completion
    /// tokens and `eos`, truncated to `seq_len`). Errors name the line: invalid JSON, a non-string
    /// value, an unknown field, a missing field, or a prompt that leaves no completion token.
    pub fn from_jsonl(
        tok: &BpeTokenizer,
        content: &str,
        seq_len: usize,
        eos: Option<u32>,
    ) -> Result<Self, DataError> {
        check_seq_len(seq_len)?;
        let mut examples = Vec::new();
        for (i, line) in content.lines().enumerate() {
            let line_no = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: String| DataError::BadLine { line: line_no, msg };
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            let obj = value
                .as_object()
                .ok_or_else(|| bad("not a JSON object".to_string()))?;
            let field = |name: &str| -> Result<Option<&str>, DataError> {
                match obj.get(name) {
                    None => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
                    Some(_) => Err(bad(format!("field {name:?} is not a string"))),
                }
            };
            let (text, prompt, completion) =
                (field("text")?, field("prompt")?, field("completion")?);
            if let Some(unknown) = obj
                .keys()
                .find(|k| !matches!(k.as_str(), "text" | "prompt" | "completion"))
            {
                return Err(DataError::UnknownField {
                    line: line_no,
                    field: unknown.clone(),
                });
            }
            match (text, prompt, completion) {
                (Some(text), None, None) => {
                    let mut ids = tok.encode(text)?;
                    ids.extend(eos);
                    pack(&ids, seq_len, &mut examples);
                }
                (None, Some(prompt), Some(completion)) => {
                    let p = tok.encode(prompt)?;
                    let mut c = tok.encode(completion)?;
                    c.extend(eos);
                    if c.is_empty() {
                        return Err(bad("empty completion".to_string()));
                    }
                    if p.len() >= seq_len {
                        return Err(bad(format!(
                            "the prompt has {} tokens, seq_len is {seq_len}: no completion token would be trained on",
                            p.len()
                        )));
                    }
                    let mut input_ids = p.clone();
                    input_ids.extend(&c);
                    input_ids.truncate(seq_len);
                    let mut labels = vec![IGNORE_INDEX; p.len()];
                    labels.extend(input_ids[p.len()..].iter().map(|&i| i64::from(i)));
                    examples.push(Example { input_ids, labels });
                }
                (Some(_), _, _) => {
                    return Err(bad(
                        "\"text\" cannot be combined with \"prompt\"/\"completion\"".to_string(),
                    ))
                }
                _ => {
                    return Err(bad(
                        "a record needs \"text\", or both \"prompt\" and \"completion\""
                            .to_string(),
                    ))
                }
            }
        }
        Self::new(examples, seq_len, tok)
    }

    /// Reads `path` by extension: `.txt` ([`from_text`](Self::from_text)) or `.jsonl`
    /// ([`from_jsonl`](Self::from_jsonl)).
    pub fn from_file(
        tok: &BpeTokenizer,
        path: impl AsRef<Path>,
        seq_len: usize,
        eos: Option<u32>,
    ) -> Result<Self, DataError> {
        let path = path.as_ref();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "txt" && ext != "jsonl" {
            return Err(DataError::UnsupportedFile(path.to_path_buf()));
        }
        let content = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let result = if ext == "txt" {
            Self::from_text(tok, &content, seq_len)
        } else {
            Self::from_jsonl(tok, &content, seq_len, eos)
        };
        result.map_err(|e| match e {
            DataError::BadLine { line, msg } => DataError::BadLine {
                line,
                msg: format!("{}: {msg}", path.display()),
            },
            DataError::Empty(msg) => DataError::Empty(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    fn new(examples: Vec<Example>, seq_len: usize, tok: &BpeTokenizer) -> Result<Self, DataError> {
        if examples.is_empty() {
            return Err(DataError::Empty(
                "the data gives no sequence of 2 or more tokens".to_string(),
            ));
        }
        // Padding is never attended to by real positions nor scored; any valid id will do.
        let pad_id = tok
            .token_id("<|endoftext|>")
            .or_else(|| tok.token_id("<pad>"))
            .unwrap_or(0);
        Ok(Self {
            examples,
            seq_len,
            pad_id,
        })
    }

    /// The examples, in file order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples (never true for a constructed dataset).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The longest example length.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of labelled (scored) positions over all examples.
    pub fn num_labelled(&self) -> usize {
        self.examples
            .iter()
            .map(|e| e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }

    /// The example order of epoch `epoch` for `seed`: a Fisher–Yates shuffle driven by ChaCha8
    /// seeded with `seed` on stream `epoch` (same seed and epoch, same order; on any platform).
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        order
    }

    /// The batches of epoch `epoch` in [`epoch_order`](Self::epoch_order), each of `batch_size`
    /// examples (the last may be smaller), padded on the right to its longest example.
    pub fn batches(
        &self,
        batch_size: usize,
        seed: u64,
        epoch: u64,
        device: &Device,
    ) -> Result<Vec<Batch>, DataError> {
        if batch_size == 0 {
            return Err(DataError::InvalidArgument("batch_size is 0".to_string()));
        }
        let order = self.epoch_order(seed, epoch);
        order
            .chunks(batch_size)
            .map(|idx| self.batch(idx, device))
            .collect()
    }

    /// One padded batch of the examples at `indices`.
    ///
    /// # Panics
    /// If an index is out of range (a caller bug).
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch, DataError> {
        let len = indices
            .iter()
            .map(|&i| self.examples[i].input_ids.len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(indices.len() * len);
        let mut labels = Vec::with_capacity(indices.len() * len);
        for &i in indices {
            let e = &self.examples[i];
            ids.extend(&e.input_ids);
            ids.extend(std::iter::repeat_n(self.pad_id, len - e.input_ids.len()));
            labels.extend(&e.labels);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, len - e.labels.len()));
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (indices.len(), len), device)?,
            labels: Tensor::from_vec(labels, (indices.len(), len), device)?,
        })
    }
}
