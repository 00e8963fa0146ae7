//! Chat prompts: rendering a HuggingFace chat template (Jinja) with minijinja.
//!
//! The environment mirrors the one `transformers` renders templates in: `trim_blocks` and
//! `lstrip_blocks` on, loop controls (`break`/`continue`), a `raise_exception(msg)` function, and
//! python-style methods on strings, lists and maps (`.strip()`, `.startswith()`, `.items()` …)
//! from `minijinja-contrib`'s pycompat layer. The context holds `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`.

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The name the template is registered under; it appears in error messages.
const TEMPLATE_NAME: &str = "chat_template";

/// Errors from compiling or rendering a chat template.
#[derive(Debug, Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("invalid chat template: {0}")]
    Syntax(String),
    /// The template called `raise_exception(msg)`, e.g. for an unsupported role order.
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    /// Rendering failed for another reason (an undefined method, a type error …).
    #[error("chat template rendering failed: {0}")]
    Render(String),
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `"system"`, `"user"` or `"assistant"` (templates may accept others).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `"system"` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `"user"` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `"assistant"` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled HuggingFace chat template with its BOS and EOS token texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// Formats a minijinja error with its location and cause chain on one line.
fn describe(err: &minijinja::Error) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    msg
}

/// The message of a `raise_exception` error, if `err` (or one of its causes) is one.
fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(mj) = e.downcast_ref::<minijinja::Error>() {
            if mj.kind() == ErrorKind::InvalidOperation {
                if let Some(detail) = mj.detail() {
                    if let Some(msg) = detail.strip_prefix(RAISE_PREFIX) {
                        return Some(msg.to_string());
                    }
                }
            }
        }
        current = e.source();
    }
    None
}

/// Marks errors raised by the template's `raise_exception` so they can be told apart.
const RAISE_PREFIX: &str = "raise_exception: ";

impl ChatTemplate {
    /// Compiles a chat template (the `chat_template` string of `tokenizer_config.json`, or a
    /// `chat_template.jinja` file). A syntax error is reported as [`ChatError::Syntax`] with its
    /// line.
    pub fn new(
        template: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISE_PREFIX}{msg}"),
                ))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, template.to_string())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders messages, with the assistant turn opened at the end when `add_generation_prompt`
    /// is set.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match raised_message(&e) {
                Some(msg) => ChatError::Raised(msg),
                None => ChatError::Render(describe(&e)),
            })
    }

    /// The BOS token text the template is rendered with.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS token text the template is rendered with.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2_TEMPLATE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smollm2-135m/chat_template.jinja"
    ));
    const PUBLIC_JSON: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smollm2-135m/public.json"
    ));
    const TOKENIZER_CONFIG: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smollm2-135m/tokenizer_config.json"
    ));

    fn smollm2() -> ChatTemplate {
        let config: serde_json::Value = serde_json::from_str(TOKENIZER_CONFIG).unwrap();
        ChatTemplate::new(
            SMOLLM2_TEMPLATE,
            config["bos_token"].as_str().unwrap(),
            config["eos_token"].as_str().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn chat_smollm2_matches_reference_prompt() {
        let public: serde_json::Value = serde_json::from_str(PUBLIC_JSON).unwrap();
        let expected = public["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["prompt"].as_str().unwrap())
            .find(|p| p.starts_with("<|im_start|>system"))
            .expect("a chat prompt in public.json");
        let messages = [ChatMessage::user(
            "What is the boiling point of water in Celsius?",
        )];
        assert_eq!(smollm2().render(&messages, true).unwrap(), expected);
    }

    #[test]
    fn chat_smollm2_without_generation_prompt_and_with_system() {
        let t = smollm2();
        let messages = [ChatMessage::system("Be brief."), ChatMessage::user("Hi")];
        assert_eq!(
            t.render(&messages, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn chat_syntax_error_is_reported() {
        let err =
            ChatTemplate::new("{% for m in messages %}{{ m.content }", "<s>", "</s>").unwrap_err();
        assert!(matches!(err, ChatError::Syntax(_)), "{err:?}");
        assert!(err.to_string().contains("syntax error"), "{err}");
        assert!(err.to_string().contains("chat_template:1"), "{err}");
    }

    #[test]
    fn chat_raise_exception() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[ChatMessage::user("hi")], true).unwrap_err();
        match &err {
            ChatError::Raised(msg) => assert_eq!(msg, "first message must be system"),
            other => panic!("expected Raised, got {other:?}"),
        }
        assert_eq!(t.render(&[ChatMessage::system("s")], true).unwrap(), "ok");
    }

    #[test]
    fn chat_python_methods_loop_and_tokens() {
        // In the style of Llama/Mistral templates: bos_token, loop variables, string methods,
        // loop controls, and trim_blocks/lstrip_blocks whitespace handling.
        let src = "{{ bos_token }}{% for message in messages %}\n\
            {% if message['role'] == 'skip' %}{% continue %}{% endif %}\n\
                {{ loop.index0 }}:{{ message['role'].upper() }}:{{ message['content'].strip() }}\
            {% if message['content'].startswith('  q') %}?{% endif %}\
            {% if not loop.last %}|{% endif %}\n\
            {% endfor %}\n\
            {% if add_generation_prompt %}>{% endif %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let messages = [
            ChatMessage::user("  question \n"),
            ChatMessage::new("skip", "x"),
            ChatMessage::assistant("answer"),
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<s>0:USER:question?|2:ASSISTANT:answer></s>"
        );
        assert_eq!(t.bos_token(), "<s>");
        assert_eq!(t.eos_token(), "</s>");
    }

    #[test]
    fn chat_render_error_is_reported() {
        let t = ChatTemplate::new("{{ messages[0].content.no_such_method() }}", "", "").unwrap();
        let err = t.render(&[ChatMessage::user("hi")], false).unwrap_err();
        assert!(matches!(err, ChatError::Render(_)), "{err:?}");
    }
}
