//! A checkpoint, whatever its format: config, tensors by HF name, tokenizer and chat template.

use super::gguf::GgufFile;
use super::prequant::{PreQuant, Raw};
use super::safetensors_dir::SafetensorsDir;
use super::LoadError;
use serde_json::Value;
use std::path::Path;

enum Store {
    Safetensors(SafetensorsDir),
    Gguf(Box<GgufFile>),
}

/// An opened checkpoint: a HF folder or a GGUF file.
pub struct Checkpoint {
    /// HF-style `config.json`.
    pub config: Value,
    /// HF `tokenizer.json` text, if the checkpoint has a tokenizer.
    pub tokenizer_json: Option<String>,
    /// Jinja chat template, if any.
    pub chat_template: Option<String>,
    /// Text of the BOS and EOS tokens for chat templates (`tokenizer_config.json`), if known.
    pub bos_token: Option<String>,
    /// See `bos_token`.
    pub eos_token: Option<String>,
    /// The packing of a pre-quantized HF checkpoint (AutoAWQ, GPTQ), if it is one.
    pub prequant: Option<PreQuant>,
    /// A GPTQ checkpoint stored act-order (some `g_idx` not `k / G`): its linear weights are
    /// read dequantized, none kept as stored.
    act_order: bool,
    store: Store,
}

fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| LoadError::Corrupt {
        file: path.display().to_string(),
        message: e.to_string(),
    })
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Checkpoint {
    /// Opens a HF checkpoint folder or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Checkpoint, LoadError> {
        if path.is_dir() {
            Self::open_hf(path)
        } else if path.is_file() {
            let gguf = GgufFile::open(path)?;
            let config = gguf.hf_config()?;
            let tokenizer_json = Some(gguf.tokenizer_json()?);
            let id_text = |key: &str| {
                let id = config.get(key)?.as_u64()? as usize;
                let tokens = gguf.metadata("tokenizer.ggml.tokens")?.as_array()?;
                tokens.get(id)?.as_str().map(str::to_string)
            };
            Ok(Checkpoint {
                bos_token: id_text("bos_token_id"),
                eos_token: id_text("eos_token_id"),
                chat_template: gguf.chat_template().map(str::to_string),
                tokenizer_json,
                config,
                prequant: None,
                act_order: false,
                store: Store::Gguf(Box::new(gguf)),
            })
        } else if path.exists() {
            Err(LoadError::NotFound(format!(
                "{}: not a regular file or a folder (a checkpoint is a .gguf file or a HF folder)",
                path.display()
            )))
        } else {
            Err(LoadError::NotFound(format!(
                "{}: no such file or folder",
                path.display()
            )))
        }
    }

    fn open_hf(dir: &Path) -> Result<Checkpoint, LoadError> {
        let config = read_json(&dir.join("config.json"))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer_json = if tok_path.exists() {
            Some(std::fs::read_to_string(&tok_path).map_err(|e| LoadError::io(&tok_path, e))?)
        } else {
            None
        };
        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.exists() {
            Some(read_json(&tc_path)?)
        } else {
            None
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| LoadError::io(&jinja, e))?)
        } else {
            tc.as_ref()
                .and_then(|t| t.get("chat_template"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
        };
        // A quantization kiln does not read is refused by the build, naming the setting.
        let prequant = PreQuant::from_config(&config).ok().flatten();
        let store = SafetensorsDir::open(dir)?;
        let mut act_order = false;
        if let Some(p) = &prequant {
            let corrupt = |message| LoadError::Corrupt {
                file: dir.display().to_string(),
                message,
            };
            p.virtual_tensors(&store.tensors()).map_err(corrupt)?;
            for (name, _) in store.tensors() {
                if let Some(base) = name.strip_suffix(p.marker()) {
                    act_order |= p
                        .is_act_order(base, |n| store.read_raw(n).map_err(|e| e.to_string()))
                        .map_err(corrupt)?;
                }
            }
        }
        Ok(Checkpoint {
            prequant,
            act_order,
            bos_token: token_text(tc.as_ref().and_then(|t| t.get("bos_token"))),
            eos_token: token_text(tc.as_ref().and_then(|t| t.get("eos_token"))),
            chat_template,
            tokenizer_json,
            config,
            store: Store::Safetensors(store),
        })
    }

    /// Tensor names (HF naming) and shapes; a pre-quantized linear weight is listed as the
    /// `X.weight` `[out, in]` its parts (`X.qweight`, …) stand for.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        match &self.store {
            Store::Safetensors(s) => match &self.prequant {
                // `open` checked every part's shape through `virtual_tensors` once.
                Some(p) => p.virtual_tensors(&s.tensors()).unwrap_or_default(),
                None => s.tensors(),
            },
            Store::Gguf(g) => g.tensors(),
        }
    }

    /// Reads a tensor as f32 in HF layout (a pre-quantized weight dequantized).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        if self.act_order {
            if let Some(w) =
                self.stored_parts(name, |p, base, read| p.dequantized_act_order(base, read))
            {
                return w;
            }
        }
        if self.prequant.is_some() {
            if let Some(p) = self.packed(name) {
                return Ok(p?.dequantize());
            }
        }
        match &self.store {
            Store::Safetensors(s) => s.read_f32(name),
            Store::Gguf(g) => Ok(g.read_f32(name)?),
        }
    }

    /// The weight format the checkpoint stores linear weights in, where kiln keeps them as they
    /// are, with a description: AutoAWQ/GPTQ int4, or a GGUF's Q4_0, Q4_1 or Q8_0 layer
    /// matrices.
    pub fn stored_quantization(&self) -> Option<(kiln_runtime::ir::DType, String)> {
        match &self.store {
            Store::Safetensors(_) if self.act_order => None,
            Store::Safetensors(_) => self.prequant.map(|p| (p.format(), p.describe())),
            Store::Gguf(g) => g
                .kept_format()
                .map(|(f, ty)| (f, format!("GGUF {ty}: {}", f.name()))),
        }
    }

    /// The pre-quantization this checkpoint stores but kiln reads dequantized, described: GPTQ
    /// act-order (the build notes it).
    pub fn dequantized_quantization(&self) -> Option<String> {
        let p = self.prequant.filter(|_| self.act_order)?;
        Some(format!("{}, act-order (desc_act)", p.describe()))
    }

    /// True for a GGUF file (whose blocks are dequantized unless kept: [`Checkpoint::packed`]).
    pub fn is_gguf(&self) -> bool {
        matches!(self.store, Store::Gguf(_))
    }

    /// Whether [`Checkpoint::packed`] reads this tensor (without unpacking it).
    pub fn stores_packed(&self, name: &str) -> bool {
        match &self.store {
            Store::Gguf(g) => g.is_kept_matrix(name),
            Store::Safetensors(_) if self.act_order => false,
            Store::Safetensors(s) => self.prequant.is_some_and(|p| {
                name.strip_suffix(".weight")
                    .is_some_and(|b| s.contains(&format!("{b}{}", p.marker())))
            }),
        }
    }

    /// A pre-quantized linear weight `X.weight` (or a GGUF Q4_0/Q4_1/Q8_0 matrix) in kiln's packing,
    /// exactly as stored; `None` for any other tensor.
    pub fn packed(&self, name: &str) -> Option<Result<kiln_runtime::quant::Packed, LoadError>> {
        match &self.store {
            Store::Gguf(g) => g.packed_matrix(name).map(|r| r.map_err(LoadError::from)),
            Store::Safetensors(_) if self.act_order => None,
            Store::Safetensors(_) => self.stored_parts(name, |p, base, read| p.packed(base, read)),
        }
    }

    /// `read` of the pre-quantized linear weight `name` (`X.weight`) from its stored parts
    /// (`X.qweight`, …); `None` when `name` is not one.
    fn stored_parts<T>(
        &self,
        name: &str,
        read: impl Fn(&PreQuant, &str, &dyn Fn(&str) -> Result<Raw, String>) -> Result<T, String>,
    ) -> Option<Result<T, LoadError>> {
        let (Store::Safetensors(s), Some(p)) = (&self.store, &self.prequant) else {
            return None;
        };
        let base = name.strip_suffix(".weight")?;
        let qweight = format!("{base}{}", p.marker());
        s.contains(&qweight).then(|| {
            read(p, base, &|n| s.read_raw(n).map_err(|e| e.to_string())).map_err(|message| {
                LoadError::Corrupt {
                    file: qweight.clone(),
                    message,
                }
            })
        })
    }
}
