//! The OpenAI API's request bodies as kiln reads them, and the checks that turn a body into
//! generation settings or a 400 naming the field at fault. Unknown fields are refused (nothing in
//! a request is ignored silently); known fields kiln does not implement are refused by name
//! unless they ask for the default behaviour.

use serde::Deserialize;
use serde_json::{json, Value};

/// Most choices per request (`n`).
pub const MAX_N: usize = 16;
/// Most alternatives per token (`top_logprobs`, completions' `logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// An API error: HTTP status and OpenAI's error object.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `error.type`.
    pub kind: &'static str,
    /// `error.message`.
    pub message: String,
    /// `error.param`: the field at fault.
    pub param: Option<String>,
}

impl ApiError {
    /// 400 for field `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: (!param.is_empty()).then(|| param.to_string()),
        }
    }

    /// Any status without a field.
    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}})
    }
}

/// The fields of [`Common`].
const COMMON_FIELDS: [&str; 15] = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "ignore_eos",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
];

/// Parses a request body: a JSON object whose fields are all in [`Common`] or in `T` (an
/// unknown field is a 400 naming it), read as both; a type error names its field.
pub fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    own_fields: &[&str],
) -> Result<(T, Common), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("", format!("the body is not valid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(ApiError::bad("", "the body must be a JSON object"));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !own_fields.contains(&k.as_str()))
    {
        return Err(ApiError::bad(k, format!("unknown field `{k}`")));
    }
    Ok((typed(&value)?, typed(&value)?))
}

fn typed<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = if path == "." { "" } else { path.as_str() };
        let msg = if param.is_empty() {
            format!("invalid request: {inner}")
        } else {
            format!("`{param}`: {inner}")
        };
        ApiError::bad(param, msg)
    })
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    pub include_usage: Option<bool>,
}

/// A completions prompt: text, token ids, or a list of either (one choice set per prompt).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// One prompt as token ids.
    Ids(Vec<u32>),
    /// Several texts.
    Texts(Vec<String>),
    /// Several prompts as token ids.
    IdLists(Vec<Vec<u32>>),
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct Common {
    /// Must name the served model, if given.
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Softmax temperature (default 1).
    pub temperature: Option<f32>,
    /// Nucleus mass (default 1).
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens; 0 or -1 keeps all (vLLM's extension).
    pub top_k: Option<i64>,
    /// Choices per prompt.
    pub n: Option<u32>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Keep generating past stop tokens (vLLM's extension).
    pub ignore_eos: Option<bool>,
    /// An end-user id (recorded nowhere; accepted as OpenAI does).
    pub user: Option<String>,
    /// Not implemented: refused unless 0.
    pub presence_penalty: Option<f32>,
    /// Not implemented: refused unless 0.
    pub frequency_penalty: Option<f32>,
    /// Not implemented: refused unless empty.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

/// `POST /v1/completions`: its own fields (the shared ones are in [`Common`]).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt(s).
    pub prompt: Prompt,
    /// Log-probabilities of each token and this many alternatives (0..=20).
    pub logprobs: Option<u32>,
    /// Not implemented: refused if true.
    pub echo: Option<bool>,
    /// Not implemented: refused.
    pub suffix: Option<String>,
    /// Not implemented: refused unless equal to `n`.
    pub best_of: Option<u32>,
}

impl CompletionRequest {
    /// Its own fields.
    pub const FIELDS: [&'static str; 5] = ["prompt", "logprobs", "echo", "suffix", "best_of"];
}

/// Chat message content: text or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `{"type": "text", "text": …}` is supported.
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// Must be `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: Content,
    /// A participant name (accepted, not rendered).
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`: its own fields (the shared ones are in [`Common`]).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Report log-probabilities.
    pub logprobs: Option<bool>,
    /// Alternatives per token (0..=20), with `logprobs`.
    pub top_logprobs: Option<u32>,
}

impl ChatRequest {
    /// Its own fields.
    pub const FIELDS: [&'static str; 4] = [
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
    ];
}

/// Generation settings read from a request.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Most tokens (None: up to the context).
    pub max_tokens: Option<usize>,
    /// Temperature.
    pub temperature: f32,
    /// Top-p.
    pub top_p: f32,
    /// Top-k (0 = off).
    pub top_k: usize,
    /// Choices per prompt.
    pub n: usize,
    /// Streaming.
    pub stream: bool,
    /// Usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Seed (None: random).
    pub seed: Option<u64>,
    /// Ignore stop tokens.
    pub ignore_eos: bool,
    /// Alternatives per token when log-probabilities are asked for.
    pub logprobs: Option<usize>,
}

/// Checks the shared fields against the served model's name; `logprobs` is the endpoint's
/// already-checked setting.
pub fn settings(
    c: &Common,
    served: &str,
    max_tokens: Option<u32>,
    logprobs: Option<usize>,
) -> Result<Settings, ApiError> {
    if let Some(m) = &c.model {
        if m != served {
            return Err(ApiError {
                status: 404,
                kind: "not_found_error",
                message: format!("the model `{m}` does not exist; this server serves `{served}`"),
                param: Some("model".into()),
            });
        }
    }
    for (name, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(
                name,
                format!("`{name}` is not supported by kiln (only 0)"),
            ));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::bad(
            "logit_bias",
            "`logit_bias` is not supported by kiln",
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad(
            "temperature",
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::bad(
                "top_k",
                format!("`top_k` must be ≥ 1 (or 0 / -1 for all tokens), got {k}"),
            ))
        }
    };
    let n = c.n.unwrap_or(1) as usize;
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad(
            "n",
            format!("`n` must be in 1..={MAX_N}, got {n}"),
        ));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::bad(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::bad(
            "stream_options",
            "`stream_options` needs `stream: true`",
        ));
    }
    let stop = match &c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::bad(
            "stop",
            format!("`stop` takes at most 4 strings, got {}", stop.len()),
        ));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad("stop", "`stop` strings must not be empty"));
    }
    Ok(Settings {
        max_tokens: max_tokens.map(|m| m as usize),
        temperature,
        top_p,
        top_k,
        n,
        stream,
        include_usage: c
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        stop,
        seed: c.seed,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        logprobs,
    })
}

/// The completions endpoint's own checks, then the shared ones.
pub fn completion_settings(
    r: &CompletionRequest,
    c: &Common,
    served: &str,
) -> Result<Settings, ApiError> {
    if r.echo == Some(true) {
        return Err(ApiError::bad("echo", "`echo` is not supported by kiln"));
    }
    if r.suffix.is_some() {
        return Err(ApiError::bad("suffix", "`suffix` is not supported by kiln"));
    }
    let logprobs = r.logprobs.map(|k| k as usize);
    if logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return Err(ApiError::bad(
            "logprobs",
            format!("`logprobs` must be in 0..={MAX_TOP_LOGPROBS}"),
        ));
    }
    let s = settings(c, served, c.max_tokens.or(Some(16)), logprobs)?;
    if r.best_of.is_some_and(|b| b as usize != s.n) {
        return Err(ApiError::bad(
            "best_of",
            "`best_of` other than `n` is not supported by kiln",
        ));
    }
    Ok(s)
}

/// The chat endpoint's own checks.
pub fn chat_settings(r: &ChatRequest, c: &Common, served: &str) -> Result<Settings, ApiError> {
    if r.messages.is_empty() {
        return Err(ApiError::bad("messages", "`messages` must not be empty"));
    }
    if r.max_completion_tokens.is_some() && c.max_tokens.is_some() {
        return Err(ApiError::bad(
            "max_tokens",
            "give `max_tokens` or `max_completion_tokens`, not both",
        ));
    }
    let top = r.top_logprobs.map(|k| k as usize);
    if top.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return Err(ApiError::bad(
            "top_logprobs",
            format!("`top_logprobs` must be in 0..={MAX_TOP_LOGPROBS}"),
        ));
    }
    if top.is_some() && r.logprobs != Some(true) {
        return Err(ApiError::bad(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let logprobs = (r.logprobs == Some(true)).then(|| top.unwrap_or(0));
    settings(
        c,
        served,
        r.max_completion_tokens.or(c.max_tokens),
        logprobs,
    )
}

/// The messages as the chat template takes them.
pub fn chat_messages(
    messages: &[Message],
) -> Result<Vec<kiln_runtime::chat::ChatMessage>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].role"),
                        format!(
                            "role `{other}` is not supported (system, developer, user, assistant)"
                        ),
                    ))
                }
            };
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!(
                                    "content part of type `{}` is not supported (only text parts)",
                                    p.kind
                                ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(kiln_runtime::chat::ChatMessage {
                role: role.into(),
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Settings, ApiError> {
        let (r, c): (ChatRequest, Common) = parse(body.as_bytes(), &ChatRequest::FIELDS)?;
        chat_settings(&r, &c, "m")
    }

    fn completion(body: &str) -> Result<Settings, ApiError> {
        let (r, c): (CompletionRequest, Common) =
            parse(body.as_bytes(), &CompletionRequest::FIELDS)?;
        completion_settings(&r, &c, "m")
    }

    const HI: &str = r#""messages": [{"role": "user", "content": "hi"}]"#;

    #[test]
    fn defaults_follow_openai() {
        let s = chat(&format!("{{{HI}}}")).unwrap();
        assert_eq!((s.temperature, s.top_p, s.top_k, s.n), (1.0, 1.0, 0, 1));
        assert_eq!(s.max_tokens, None, "chat: up to the context");
        assert!(!s.stream && s.logprobs.is_none());
        assert_eq!(
            completion(r#"{"prompt": "x"}"#).unwrap().max_tokens,
            Some(16)
        );
        let s = chat(&format!(
            r#"{{{HI}, "logprobs": true, "top_logprobs": 3, "top_k": -1, "stop": "x",
                "max_completion_tokens": 7, "stream": true, "stream_options": {{"include_usage": true}}}}"#
        ))
        .unwrap();
        assert_eq!(s.logprobs, Some(3));
        assert_eq!(s.top_k, 0);
        assert_eq!(s.stop, vec!["x".to_string()]);
        assert_eq!(s.max_tokens, Some(7));
        assert!(s.include_usage);
    }

    #[test]
    fn each_bad_field_is_named() {
        let param = |body: String| chat(&body).unwrap_err().param.unwrap_or_default();
        assert_eq!(param(format!(r#"{{{HI}, "n": 0}}"#)), "n");
        assert_eq!(
            param(format!(r#"{{{HI}, "temperature": 2.5}}"#)),
            "temperature"
        );
        assert_eq!(param(format!(r#"{{{HI}, "top_k": -2}}"#)), "top_k");
        assert_eq!(
            param(format!(r#"{{{HI}, "stop": ["a","b","c","d","e"]}}"#)),
            "stop"
        );
        assert_eq!(param(format!(r#"{{{HI}, "stop": [""]}}"#)), "stop");
        assert_eq!(
            param(format!(r#"{{{HI}, "top_logprobs": 2}}"#)),
            "top_logprobs"
        );
        assert_eq!(
            param(format!(r#"{{{HI}, "presence_penalty": 0.5}}"#)),
            "presence_penalty"
        );
        assert_eq!(
            param(format!(r#"{{{HI}, "logit_bias": {{"5": 1}}}}"#)),
            "logit_bias"
        );
        assert_eq!(
            param(format!(r#"{{{HI}, "stream_options": {{}}}}"#)),
            "stream_options"
        );
        assert_eq!(
            param(format!(
                r#"{{{HI}, "max_tokens": 3, "max_completion_tokens": 3}}"#
            )),
            "max_tokens"
        );
        assert_eq!(param(format!(r#"{{{HI}, "seed": -1}}"#)), "seed");
        assert_eq!(
            param(r#"{"messages": [{"role": "user"}]}"#.into()),
            "messages[0]"
        );
        let e = chat(&format!(r#"{{{HI}, "model": "other"}}"#)).unwrap_err();
        assert_eq!(e.status, 404);
        // Known but unimplemented fields asking for the default are accepted.
        chat(&format!(
            r#"{{{HI}, "presence_penalty": 0, "logit_bias": {{}}, "user": "u"}}"#
        ))
        .unwrap();
        let c = |body: &str| completion(body).unwrap_err().param.unwrap_or_default();
        assert_eq!(c(r#"{"prompt": "x", "echo": true}"#), "echo");
        assert_eq!(c(r#"{"prompt": "x", "suffix": "y"}"#), "suffix");
        assert_eq!(c(r#"{"prompt": "x", "best_of": 3}"#), "best_of");
        assert_eq!(c(r#"{"prompt": "x", "logprobs": 21}"#), "logprobs");
        assert_eq!(c(r#"{"prompt": {"a": 1}}"#), "prompt");
    }

    #[test]
    fn chat_content_parts_and_roles() {
        let (r, _): (ChatRequest, Common) = parse(
            br#"{"messages": [{"role": "developer", "content": "be brief"},
                              {"role": "user", "content": [{"type": "text", "text": "a"},
                                                           {"type": "text", "text": "b"}]}]}"#,
            &ChatRequest::FIELDS,
        )
        .unwrap();
        let m = chat_messages(&r.messages).unwrap();
        assert_eq!(m[0].role, "system");
        assert_eq!(m[1].content, "ab");
        let (r, _): (ChatRequest, Common) = parse(
            br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            &ChatRequest::FIELDS,
        )
        .unwrap();
        let e = chat_messages(&r.messages).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
        assert!(e.message.contains("image_url"), "{}", e.message);
    }
}
