//! Chat prompts for ChatML templates (Qwen2.5, SmolLM2) without a Jinja engine.
//!
//! Both shipped models use ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per turn, then
//! `<|im_start|>assistant\n` to ask for an answer. Their templates embed a default system message
//! as a string literal (`'<|im_start|>system\nYou are ...<|im_end|>\n'`), used when the
//! conversation has no system turn; [`default_system_prompt`] extracts that literal, so the
//! prompt matches what `apply_chat_template` would produce for one user message.
//!
//! A checkpoint without a template, or with a non-ChatML one, is an error
//! ([`ModelError::UnsupportedConfig`]) rather than a silently unformatted prompt: a chat request
//! that reaches the model as raw text produces plausible-looking but wrong answers, and callers
//! that want raw completion have a plain-text path (tokenize the prompt as is).

use crate::error::{ModelError, Result};
use crate::loader::TokenizerBundle;

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

/// True when `template` uses ChatML turn markers.
pub fn is_chatml(template: &str) -> bool {
    template.contains(IM_START)
}

/// The prompt for one user message, formatted for the checkpoint's chat template.
///
/// ChatML: `<|im_start|>system\n{default}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n`,
/// the system turn present only when the template embeds a default system message. Any other
/// template, or none, is [`ModelError::UnsupportedConfig`].
pub fn format_chat(bundle: &TokenizerBundle, user: &str) -> Result<String> {
    match bundle.chat_template.as_deref() {
        Some(template) if is_chatml(template) => Ok(chatml_prompt(default_system_prompt(template).as_deref(), user)),
        Some(_) => Err(ModelError::UnsupportedConfig(
            "the chat template is not ChatML (only ChatML templates are supported); \
             use plain text generation instead"
                .into(),
        )),
        None => Err(ModelError::UnsupportedConfig(
            "the checkpoint has no chat template; use plain text generation instead".into(),
        )),
    }
}

/// A ChatML prompt with an optional system turn, ending with the assistant header.
pub fn chatml_prompt(system: Option<&str>, user: &str) -> String {
    let mut out = String::new();
    if let Some(system) = system {
        out.push_str(&format!("{IM_START}system\n{system}{IM_END}\n"));
    }
    out.push_str(&format!("{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"));
    out
}

/// The default system message a ChatML template embeds as a string literal, if any.
///
/// Looks for `<|im_start|>system` followed by a newline (written raw or as the escape `\n`) and
/// literal text up to `<|im_end|>`; candidates containing template code (`{{`, `{%`) or leaving the
/// string literal (an unescaped quote) are skipped, e.g. `'<|im_start|>system\n' + messages[0]...`.
pub fn default_system_prompt(template: &str) -> Option<String> {
    let marker = format!("{IM_START}system");
    let mut search = 0;
    while let Some(found) = template[search..].find(&marker) {
        let start = search + found;
        search = start + marker.len();
        let quote = template[..start].chars().next_back().filter(|c| matches!(c, '\'' | '"'));
        let rest = &template[search..];
        let body = if let Some(r) = rest.strip_prefix("\\n") {
            r
        } else if let Some(r) = rest.strip_prefix('\n') {
            r
        } else {
            continue;
        };
        let Some(end) = body.find(IM_END) else {
            continue;
        };
        let literal = &body[..end];
        if literal.contains("{{") || literal.contains("{%") || has_unescaped_quote(literal, quote) {
            continue;
        }
        let text = unescape(literal);
        if !text.trim().is_empty() {
            return Some(text);
        }
    }
    None
}

/// True when `text` would close the string literal it sits in (any quote when the quote is unknown).
fn has_unescaped_quote(text: &str, quote: Option<char>) -> bool {
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if quote.map_or(matches!(c, '\'' | '"'), |q| c == q) {
            return true;
        }
    }
    false
}

/// Resolves the escapes of a Jinja string literal (`\n`, `\t`, `\\`, `\'`, `\"`).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    // Abridged from the Qwen2.5 template: the tools branch and the system-message branch come
    // first and must be skipped.
    const QWEN25: &str = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    #[test]
    fn extracts_embedded_system_prompts() {
        assert_eq!(
            default_system_prompt(SMOLLM2).as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        assert_eq!(
            default_system_prompt(QWEN25).as_deref(),
            Some("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
        );
        let plain = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}";
        assert_eq!(default_system_prompt(plain), None);
        assert_eq!(
            default_system_prompt("{{ \"<|im_start|>system\\nIt\\'s \\\"fine\\\"<|im_end|>\\n\" }}").as_deref(),
            Some("It's \"fine\"")
        );
    }

    #[test]
    fn chatml_layout() {
        assert_eq!(
            chatml_prompt(Some("S"), "What is the capital of France?"),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(chatml_prompt(None, "hi"), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert!(is_chatml(SMOLLM2) && is_chatml(QWEN25) && !is_chatml("[INST] {{ x }} [/INST]"));
    }

    #[test]
    fn templates_other_than_chatml_are_errors() {
        let tokenizer = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        let none = TokenizerBundle::new(tokenizer.clone(), None, None, vec![]);
        assert!(matches!(format_chat(&none, "hi"), Err(ModelError::UnsupportedConfig(_))));
        let other = TokenizerBundle::new(tokenizer.clone(), Some("[INST] {{ m }} [/INST]".into()), None, vec![]);
        assert!(matches!(format_chat(&other, "hi"), Err(ModelError::UnsupportedConfig(_))));
        let chatml = TokenizerBundle::new(tokenizer, Some(SMOLLM2.into()), None, vec![]);
        assert!(format_chat(&chatml, "hi").is_ok_and(|p| p.starts_with("<|im_start|>system\nYou are")));
    }
}
