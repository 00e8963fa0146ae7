//! Text tokenization: a thin, error-typed wrapper over the HuggingFace `tokenizers` crate, built
//! from a checkpoint's `tokenizer.json`, plus an incremental detokenizer for streaming output.
//!
//! Encoding follows what `transformers` does for a chat prompt that was already rendered from
//! its template: no BOS/EOS or other post-processor tokens are added, and special-token text that
//! appears in the prompt (e.g. `<|im_start|>`) becomes that special token's id. Decoding keeps
//! special tokens as their text.

use thiserror::Error;

/// Errors from loading a tokenizer, encoding or decoding.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// The `tokenizer.json` could not be parsed or describes an unsupported tokenizer.
    #[error("cannot load tokenizer.json: {0}")]
    Load(String),
    /// Encoding text failed inside the tokenizer.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// Decoding token ids failed inside the tokenizer.
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    /// A token id has no token in this tokenizer's vocabulary.
    #[error("token id {id} is not in the tokenizer vocabulary (vocabulary size {vocab_size})")]
    UnknownId {
        /// The offending id.
        id: u32,
        /// The tokenizer's vocabulary size, added tokens included.
        vocab_size: usize,
    },
}

/// A text tokenizer built from a HuggingFace `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds a tokenizer from the text of a HuggingFace `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Tokenizer, TokenizerError> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| TokenizerError::Load(format!("{e}")))?;
        Ok(Tokenizer { inner })
    }

    /// Encodes text without adding BOS/EOS or other special tokens; special-token text in the
    /// prompt (e.g. `"<|im_start|>"`) becomes the special token id, as transformers does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(format!("{e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text (special tokens included as their text).
    ///
    /// An id that names no token is an error ([`TokenizerError::UnknownId`]) rather than being
    /// silently dropped. Byte sequences that are not valid UTF-8 (a character cut between tokens)
    /// decode to U+FFFD, as in `transformers`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size(),
            });
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Decode(format!("{e}")))
    }

    /// The id of a token given its exact vocabulary text (e.g. `"<|im_end|>"`), if any.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of the token with this id, if any (the raw vocabulary entry, which for byte-level
    /// BPE is in the byte-to-unicode alphabet, e.g. `"Ġthe"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The number of tokens, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Incremental detokenizer for streaming: push ids one at a time, get the newly completed text
/// (holding back incomplete UTF-8 sequences, as byte-level BPE can split a character across
/// tokens).
///
/// The pieces returned by [`push`](Self::push), followed by [`finish`](Self::finish), concatenate
/// to exactly [`Tokenizer::decode`] of all pushed ids.
///
/// Method: each step decodes a short window of ids that starts at a point where everything before
/// it was already emitted, once without and once with the ids not yet emitted, and returns the
/// difference. Decoding a window rather than each token alone keeps decoders whose output depends
/// on context (a leading-space rule, for instance) correct; text ending in U+FFFD is an
/// incomplete character and waits for the next id.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    state: TextStream,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder with nothing pushed yet.
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            state: TextStream::default(),
        }
    }

    /// Adds one id and returns the text it completes: empty while a character is still cut
    /// between tokens, possibly several characters once it is complete.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.state.push(self.tok, id)
    }

    /// Flushes text held back at the end of the stream (an incomplete character decodes to
    /// U+FFFD, as the full decode does) and returns it. Further pushes continue after it.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        self.state.finish(self.tok)
    }

    /// All text emitted so far (the concatenation of every returned piece).
    pub fn text(&self) -> &str {
        self.state.text()
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.state.ids
    }
}

/// The state of a [`StreamDecoder`] without the tokenizer it decodes with, for holders that
/// cannot borrow one (the serving scheduler keeps one per request); every call takes the
/// tokenizer.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decode window: a character boundary, all text before it already emitted.
    prefix_offset: usize,
    /// End of what has been emitted: ids before this index are in `text`.
    read_offset: usize,
    text: String,
}

impl TextStream {
    /// [`StreamDecoder::push`] with `tok`.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix_text = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..])?;
        if new_text.len() > prefix_text.len()
            && !new_text.ends_with(char::REPLACEMENT_CHARACTER)
            && new_text.starts_with(&prefix_text)
        {
            let delta = new_text[prefix_text.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.text.push_str(&delta);
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// [`StreamDecoder::finish`] with `tok`.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..])?;
        let delta = new_text
            .strip_prefix(&prefix_text)
            .unwrap_or(&new_text)
            .to_string();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const TOKENIZER_JSON: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smollm2-135m/tokenizer.json"
    ));
    const PUBLIC_JSON: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smollm2-135m/public.json"
    ));

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_json(TOKENIZER_JSON).expect("load tokenizer.json")
    }

    fn public() -> Value {
        serde_json::from_str(PUBLIC_JSON).expect("parse public.json")
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .expect("id array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    }

    #[test]
    fn tokenizer_encodes_reference_cases() {
        let tok = tokenizer();
        let public = public();
        let cases = public["tokenizer_cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text).unwrap(),
                ids(&case["ids"]),
                "text {text:?}"
            );
        }
    }

    #[test]
    fn tokenizer_round_trips_reference_cases() {
        let tok = tokenizer();
        let public = public();
        for case in public["tokenizer_cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(tok.decode(&ids(&case["ids"])).unwrap(), text);
        }
    }

    #[test]
    fn tokenizer_encodes_generation_prompts() {
        let tok = tokenizer();
        let public = public();
        for g in public["generations"].as_array().unwrap() {
            let prompt = g["prompt"].as_str().unwrap();
            assert_eq!(
                tok.encode(prompt).unwrap(),
                ids(&g["input_ids"]),
                "{prompt:?}"
            );
        }
    }

    #[test]
    fn tokenizer_decodes_greedy_generations() {
        let tok = tokenizer();
        let public = public();
        for g in public["generations"].as_array().unwrap() {
            let text = tok.decode(&ids(&g["greedy_new_ids"])).unwrap();
            assert_eq!(text, g["greedy_text"].as_str().unwrap());
        }
    }

    #[test]
    fn tokenizer_special_tokens_and_vocab() {
        let tok = tokenizer();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.token_id("<|im_start|>"), Some(1));
        assert_eq!(tok.token_id("<|im_end|>"), Some(2));
        assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.token_id("no such token at all"), None);
        assert_eq!(
            tok.decode(&[1, 4093, 198, 6004, 2]).unwrap(),
            "<|im_start|>user\nhi<|im_end|>"
        );
        assert!(tok.encode("").unwrap().is_empty());
        assert_eq!(tok.decode(&[]).unwrap(), "");
    }

    #[test]
    fn tokenizer_rejects_bad_input() {
        let tok = tokenizer();
        let err = tok.decode(&[19556, 1_000_000]).unwrap_err();
        assert!(
            matches!(err, TokenizerError::UnknownId { id: 1_000_000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("1000000"));
        let err = Tokenizer::from_json("{not json").unwrap_err();
        assert!(
            err.to_string().starts_with("cannot load tokenizer.json"),
            "{err}"
        );
    }

    /// Streams `ids` one at a time and checks the pieces against the full decode.
    fn check_stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut stream = StreamDecoder::new(tok);
        let mut pieces = Vec::new();
        for &id in ids {
            let piece = stream.push(id).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
            pieces.push(piece);
        }
        pieces.push(stream.finish().unwrap());
        let full = tok.decode(ids).unwrap();
        assert_eq!(pieces.concat(), full);
        assert_eq!(stream.text(), full);
        assert_eq!(stream.ids(), ids);
        pieces
    }

    #[test]
    fn tokenizer_stream_matches_full_decode() {
        let tok = tokenizer();
        let public = public();
        for case in public["tokenizer_cases"].as_array().unwrap() {
            check_stream(&tok, &ids(&case["ids"]));
        }
        for g in public["generations"].as_array().unwrap() {
            let mut all = ids(&g["input_ids"]);
            all.extend(ids(&g["greedy_new_ids"]));
            check_stream(&tok, &all);
        }
    }

    #[test]
    fn tokenizer_stream_holds_back_split_characters() {
        let tok = tokenizer();
        // "emoji 🎉🚀": each emoji is split over several byte-level tokens.
        let emoji = tok.encode("emoji \u{1f389}\u{1f680}").unwrap();
        let pieces = check_stream(&tok, &emoji);
        assert!(pieces.iter().any(|p| p.is_empty()), "{pieces:?}");
        assert!(pieces.iter().any(|p| p == " \u{1f389}"), "{pieces:?}");
        assert!(pieces.iter().any(|p| p == "\u{1f680}"), "{pieces:?}");
        // Japanese: several characters cut between tokens.
        let japanese = tok.encode("日本語のテキスト").unwrap();
        let pieces = check_stream(&tok, &japanese);
        assert!(pieces.iter().any(|p| p.is_empty()), "{pieces:?}");
    }

    #[test]
    fn tokenizer_stream_finish_flushes_incomplete_character() {
        let tok = tokenizer();
        let emoji = tok.encode("\u{1f389}").unwrap();
        assert!(emoji.len() > 1);
        let cut = &emoji[..emoji.len() - 1];
        let mut stream = StreamDecoder::new(&tok);
        for &id in cut {
            assert_eq!(stream.push(id).unwrap(), "");
        }
        let rest = stream.finish().unwrap();
        assert_eq!(rest, tok.decode(cut).unwrap());
        assert!(rest.contains(char::REPLACEMENT_CHARACTER));
        assert_eq!(stream.finish().unwrap(), "");
    }
}
