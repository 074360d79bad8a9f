//! Building a `tokenizers::Tokenizer` from GGUF metadata (byte-level BPE only).
//!
//! The GGUF stores the vocabulary (`tokenizer.ggml.tokens`), the merges, each token's type
//! (`token_type`: 1 normal, 3 control, 4 user-defined, 5 unused, 6 byte) and the name of the
//! pre-tokenizer (`tokenizer.ggml.pre`). We rebuild the pipeline the HF `tokenizer.json` of the same
//! model declares: `smollm` = Digits(individual) + ByteLevel; `qwen2` = NFC + a Split on the Qwen2
//! regex + ByteLevel without its own regex; anything else falls back to GPT-2's ByteLevel. No BOS
//! is added automatically (neither model asks for one).

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The Qwen2 pre-tokenizer regex, as Qwen2's `tokenizer.json` writes it.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer plus what generation needs to know about it.
#[derive(Clone)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    /// The Jinja chat template shipped with the checkpoint, if any.
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation: the declared EOS, plus `<|im_end|>` and `<|endoftext|>`
    /// when the template is ChatML and the vocabulary has them.
    pub eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for TokenizerBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerBundle")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("has_chat_template", &self.chat_template.is_some())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

impl TokenizerBundle {
    /// Wraps a tokenizer, completing `eos_token_ids` for ChatML templates (see the field doc).
    pub fn new(
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        let mut eos = Vec::new();
        for id in eos_token_ids {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        if chat_template.as_deref().is_some_and(crate::chat::is_chatml) {
            for token in ["<|im_end|>", "<|endoftext|>"] {
                if let Some(id) = tokenizer.token_to_id(token).filter(|id| !eos.contains(id)) {
                    eos.push(id);
                }
            }
        }
        Self { tokenizer, chat_template, bos_token_id, eos_token_ids: eos }
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// True when `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }
}

fn err(message: impl Into<String>) -> ModelError {
    ModelError::Tokenizer(message.into())
}

fn get<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata.get(key).ok_or_else(|| err(format!("GGUF metadata has no `{key}`")))
}

fn string_array(metadata: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let values = get(metadata, key)?.to_vec().map_err(|_| err(format!("`{key}` is not an array")))?;
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| err(format!("`{key}` holds a non-string value"))))
        .collect()
}

/// An integer metadata value of any width, as i64.
pub(crate) fn as_int(value: &Value) -> Option<i64> {
    Some(match value {
        Value::U8(v) => *v as i64,
        Value::I8(v) => *v as i64,
        Value::U16(v) => *v as i64,
        Value::I16(v) => *v as i64,
        Value::U32(v) => *v as i64,
        Value::I32(v) => *v as i64,
        Value::U64(v) => i64::try_from(*v).ok()?,
        Value::I64(v) => *v,
        _ => return None,
    })
}

fn token_id(metadata: &HashMap<String, Value>, key: &str, vocab: usize) -> Option<u32> {
    let id = metadata.get(key).and_then(as_int)?;
    u32::try_from(id).ok().filter(|&id| (id as usize) < vocab)
}

/// Builds the tokenizer bundle from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
pub fn tokenizer_from_gguf(metadata: &HashMap<String, Value>) -> Result<TokenizerBundle> {
    let model = get(metadata, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|_| err("`tokenizer.ggml.model` is not a string"))?;
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer.ggml.model is `{model}`; only `gpt2` (byte-level BPE) is supported \
             (SentencePiece `llama` tokenizers are not)"
        )));
    }
    let tokens = string_array(metadata, "tokenizer.ggml.tokens")?;
    let merges = string_array(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(err(format!("merge `{m}` is not two space-separated pieces"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| err(format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let pre = metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str);
    match pre {
        Some("smollm") => {
            let digits = Digits::new(true);
            let byte_level = ByteLevel::new(false, true, true);
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![digits.into(), byte_level.into()])));
        }
        Some("qwen2") => {
            let split = Split::new(SplitPattern::Regex(QWEN2_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| err(format!("qwen2 pre-tokenizer regex: {e}")))?;
            let byte_level = ByteLevel::new(false, false, false);
            tokenizer
                .with_normalizer(Some(NFC))
                .map_err(|e| err(e.to_string()))?
                .with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
        }
        other => {
            if let Some(name) = other.filter(|p| *p != "gpt2" && *p != "default") {
                tracing::warn!("unknown tokenizer.ggml.pre `{name}`: using GPT-2 byte-level splitting");
            }
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));

    add_special_tokens(&mut tokenizer, metadata, &tokens)?;

    let bos_token_id = token_id(metadata, "tokenizer.ggml.bos_token_id", tokens.len());
    let eos = token_id(metadata, "tokenizer.ggml.eos_token_id", tokens.len());
    let chat_template = metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    Ok(TokenizerBundle::new(tokenizer, chat_template, bos_token_id, eos.into_iter().collect()))
}

/// Control tokens (and BOS/EOS/padding) become special added tokens, user-defined ones plain added
/// tokens: both are matched whole in the input, so `<|im_start|>` encodes to one id.
fn add_special_tokens(tokenizer: &mut Tokenizer, metadata: &HashMap<String, Value>, tokens: &[String]) -> Result<()> {
    let mut special = Vec::new();
    let mut user = Vec::new();
    if let Some(Value::Array(types)) = metadata.get("tokenizer.ggml.token_type") {
        if types.len() != tokens.len() {
            return Err(err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        for (token, ty) in tokens.iter().zip(types) {
            match as_int(ty) {
                Some(TOKEN_TYPE_CONTROL) => special.push(token.clone()),
                Some(TOKEN_TYPE_USER_DEFINED) => user.push(token.clone()),
                _ => {}
            }
        }
    }
    for key in ["bos", "eos", "padding"] {
        if let Some(id) = token_id(metadata, &format!("tokenizer.ggml.{key}_token_id"), tokens.len()) {
            let token = &tokens[id as usize];
            if !special.contains(token) && !user.contains(token) {
                special.push(token.clone());
            }
        }
    }
    let added = |content: String, is_special: bool| AddedToken::from(content, is_special).normalized(false);
    tokenizer
        .add_special_tokens(special.into_iter().map(|t| added(t, true)))
        .map_err(|e| err(format!("adding special tokens: {e}")))?;
    tokenizer
        .add_tokens(user.into_iter().map(|t| added(t, false)))
        .map_err(|e| err(format!("adding user-defined tokens: {e}")))?;
    Ok(())
}
