//! Pre-quantized HF checkpoints read as they are: AutoAWQ's GEMM packing, GPTQ's (v1 and v2
//! zero points) and compressed-tensors' `pack-quantized` (W4A16), 4-bit, groups along the input. Their linear weights are exactly kiln's
//! `int4gGz` weight format (`(q − zero) · scale`, f16 scales, one zero point per group), so each
//! `X.qweight`/`X.qzeros`/`X.scales` (`X.g_idx`) triple reads as a virtual tensor `X.weight`
//! `[out, in]` whose packed form ([`PreQuant::packed`]) the build stores without re-quantizing.
//!
//! Layouts (`out` rows, `in` columns of the `nn.Linear`, `G` the group size, codes 4-bit):
//! - AutoAWQ GEMM (`quant_method: "awq"`, `version: "gemm"`): `qweight` i32 `[in, out/8]`, the
//!   code of output column `8j + ORDER[i]` in bits `4i..4i+4` of word `j` (ORDER = 0, 2, 4, 6,
//!   1, 3, 5, 7); `qzeros` i32 `[in/G, out/8]` packed the same way; `scales` f16 `[in/G, out]`.
//! - GPTQ (`quant_method: "gptq"`): `qweight` i32 `[in/8, out]`, the code of input row `8i + b`
//!   in bits `4b..4b+4` of row `i`; `qzeros` i32 `[in/G, out/8]`, column `8j + b` in bits
//!   `4b..`; `scales` f16 `[in/G, out]`; `g_idx` i32 `[in]`. `checkpoint_format: "gptq"` (v1,
//!   the default) stores each zero point minus one, `"gptq_v2"` the zero point itself.
//!   Act-order checkpoints (`desc_act`) whose `g_idx` is `k / G` (static groups) are kiln's
//!   format too; where `g_idx` puts columns in other groups, the groups are not contiguous runs
//!   of columns, which kiln's int4 formats need: such a checkpoint is read dequantized, each
//!   column with its own group's zero point and scale ([`PreQuant::dequantized_act_order`]).
//! - compressed-tensors (`quant_method: "compressed-tensors"`, `format: "pack-quantized"`, one
//!   weight-only config group of 4-bit ints in groups): `X.weight_packed` i32 `[out, in/8]`, the
//!   code + 8 of input column `8i + b` in bits `4b..` of word `i`; `X.weight_scale` `[out, in/G]`
//!   (f16, bf16 or f32: each must be an f16 value, as kiln stores scales); when asymmetric,
//!   `X.weight_zero_point` i32 `[out/8, in/G]` packed along the output rows, zero + 8 likewise;
//!   `X.weight_shape` (and `X.weight_g_idx`, refused: act-order). Symmetric maps to `int4gG`,
//!   asymmetric to `int4gGz` (kiln's zero point is the stored zero + 8).
//! - compressed-tensors FP8 (`format: "float-quantized"`, 8-bit float weights per channel or
//!   per tensor, activations 8-bit float per token and dynamic: W8A8-FP8, RedHatAI's
//!   "FP8-dynamic" checkpoints): `X.weight` E4M3 `[out, in]` as it is, `X.weight_scale` `[out,
//!   1]` (channel) or one value (tensor), any float type: exactly kiln's `fp8` (a scale per
//!   output row, activations rounded to E4M3 per token). Static activation scales
//!   (`X.input_scale`) and FP8 weights with 16-bit activations are refused.

use kiln_runtime::ir::op::INT4_GROUPS;
use kiln_runtime::ir::DType;
use kiln_runtime::quant::Packed;
use safetensors::Dtype;
use serde_json::Value;

/// Which packing a pre-quantized checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// AutoAWQ, GEMM version.
    AwqGemm,
    /// GPTQ; `v2`: zero points stored as they are (else minus one).
    Gptq {
        /// `checkpoint_format: "gptq_v2"`.
        v2: bool,
    },
    /// compressed-tensors `pack-quantized`.
    CompressedTensors {
        /// Symmetric (no zero points stored).
        symmetric: bool,
    },
    /// compressed-tensors `float-quantized`: E4M3 weights, dynamic per-token activations.
    CompressedFp8,
}

/// The quantization a checkpoint's `quantization_config` declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreQuant {
    /// The packing.
    pub method: Method,
    /// Input columns per group (0 for FP8, whose scales are per row).
    pub group: usize,
}

/// The suffixes of the stored parts of one pre-quantized linear weight (AutoAWQ, GPTQ).
const PARTS: [&str; 4] = [".qweight", ".qzeros", ".scales", ".g_idx"];
/// The same for compressed-tensors.
const CT_PARTS: [&str; 5] = [
    ".weight_packed",
    ".weight_scale",
    ".weight_zero_point",
    ".weight_shape",
    ".weight_g_idx",
];

/// A code or zero point by (output row, input column or group).
type Lookup = Box<dyn Fn(usize, usize) -> u8>;

/// One raw stored tensor: element type, shape, bytes (little-endian).
pub type Raw = (Dtype, Vec<usize>, Vec<u8>);

impl PreQuant {
    /// The checkpoint's pre-quantization, from `config.json`'s `quantization_config`: `None`
    /// without one (or for transformers' `gguf` marker: the tensors are floats); an error naming
    /// the setting for a method or variant kiln does not read.
    pub fn from_config(config: &Value) -> Result<Option<PreQuant>, String> {
        let Some(q) = config.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("unnamed");
        let text = |key: &str| q.get(key).and_then(Value::as_str).map(str::to_lowercase);
        let refuse = |what: String| {
            Err(format!(
                "the checkpoint is pre-quantized (quant_method `{method}`) with {what}, which \
                 kiln does not read; kiln reads AutoAWQ GEMM, GPTQ and compressed-tensors \
                 checkpoints of 4 bits in groups of 32, 64 or 128 (GPTQ act-order read \
                 dequantized), and \
                 compressed-tensors FP8 with dynamic per-token activations (or build from the \
                 16-bit checkpoint with --quant)"
            ))
        };
        let method = match method {
            "gguf" => return Ok(None),
            "awq" => {
                let version = text("version").unwrap_or_else(|| "gemm".into());
                if version != "gemm" {
                    return refuse(format!("version `{version}`"));
                }
                if q.get("zero_point").and_then(Value::as_bool) == Some(false) {
                    return refuse("zero_point false".into());
                }
                Method::AwqGemm
            }
            "gptq" => {
                // `desc_act` (act-order) is told by each weight's `g_idx`: `k / G` (static
                // groups) keeps the codes, any other is read dequantized.
                let format = text("checkpoint_format")
                    .or_else(|| text("format"))
                    .unwrap_or_else(|| "gptq".into());
                match format.as_str() {
                    "gptq" => Method::Gptq { v2: false },
                    "gptq_v2" => Method::Gptq { v2: true },
                    other => return refuse(format!("checkpoint_format `{other}`")),
                }
            }
            "compressed-tensors" => return compressed_tensors(q, refuse),
            _ => return refuse("this method".into()),
        };
        let bits = q
            .get("bits")
            .or_else(|| q.get("w_bit"))
            .and_then(Value::as_i64);
        if bits != Some(4) {
            return refuse(format!(
                "bits {}",
                bits.map_or("(absent)".into(), |b| b.to_string())
            ));
        }
        let group = q
            .get("group_size")
            .or_else(|| q.get("q_group_size"))
            .and_then(Value::as_i64)
            .unwrap_or(-1);
        if !INT4_GROUPS.iter().any(|&g| i64::from(g) == group) {
            return refuse(format!("group_size {group}"));
        }
        Ok(Some(PreQuant {
            method,
            group: group as usize,
        }))
    }

    /// The kiln weight format of its linear weights.
    pub fn format(&self) -> DType {
        if self.method == Method::CompressedFp8 {
            return DType::Fp8;
        }
        DType::Int4 {
            group: self.group as u16,
            zero_point: self.method != Method::CompressedTensors { symmetric: true },
        }
    }

    /// The suffix of the part that marks a pre-quantized linear `X` (`X.qweight`,
    /// `X.weight_packed`, `X.weight_scale` beside an E4M3 `X.weight`).
    pub fn marker(&self) -> &'static str {
        match self.method {
            Method::CompressedTensors { .. } => ".weight_packed",
            Method::CompressedFp8 => ".weight_scale",
            _ => ".qweight",
        }
    }

    /// A one-line description for build notes.
    pub fn describe(&self) -> String {
        let m = match self.method {
            Method::AwqGemm => "AutoAWQ GEMM",
            Method::Gptq { v2: false } => "GPTQ",
            Method::Gptq { v2: true } => "GPTQ v2",
            Method::CompressedTensors { symmetric: true } => "compressed-tensors, symmetric",
            Method::CompressedTensors { symmetric: false } => "compressed-tensors, zero points",
            Method::CompressedFp8 => {
                return "compressed-tensors FP8, E4M3 weights per channel, dynamic per-token \
                        activations"
                    .into()
            }
        };
        format!("{m}, 4-bit, groups of {}", self.group)
    }

    /// The tensors as the model sees them: every `X.qweight` (with its `X.qzeros`, `X.scales`
    /// and `X.g_idx`) becomes `X.weight` `[out, in]`; the other tensors stay.
    pub fn virtual_tensors(
        &self,
        stored: &[(String, Vec<usize>)],
    ) -> Result<Vec<(String, Vec<usize>)>, String> {
        let parts: &[&str] = match self.method {
            Method::CompressedTensors { .. } => &CT_PARTS,
            // `X.weight` is stored as it is; its scale is a part.
            Method::CompressedFp8 => {
                return Ok(stored
                    .iter()
                    .filter(|(n, _)| !n.ends_with(".weight_scale"))
                    .cloned()
                    .collect())
            }
            _ => &PARTS,
        };
        let mut out = Vec::with_capacity(stored.len());
        for (name, shape) in stored {
            if let Some(base) = name.strip_suffix(self.marker()) {
                let (o, i) = self.dims(base, shape)?;
                out.push((format!("{base}.weight"), vec![o, i]));
            } else if !parts.iter().any(|p| name.ends_with(p)) {
                out.push((name.clone(), shape.clone()));
            }
        }
        Ok(out)
    }

    /// `[out, in]` of the linear whose `qweight` has `shape`.
    fn dims(&self, base: &str, shape: &[usize]) -> Result<(usize, usize), String> {
        let [a, b] = shape else {
            return Err(format!(
                "`{base}{}` has shape {shape:?}; expected 2 axes",
                self.marker()
            ));
        };
        Ok(match self.method {
            Method::AwqGemm => (b * 8, *a),
            Method::Gptq { .. } => (*b, a * 8),
            Method::CompressedTensors { .. } => (*a, b * 8),
            Method::CompressedFp8 => (*a, *b),
        })
    }

    /// The linear weight `X.weight` (`base` = `X`) in kiln's packing, exactly as stored:
    /// `read` returns a stored tensor's raw bytes. A GPTQ act-order weight (a `g_idx` other
    /// than `k / G`) is an error: see [`PreQuant::dequantized_act_order`].
    pub fn packed(
        &self,
        base: &str,
        read: impl Fn(&str) -> Result<Raw, String>,
    ) -> Result<Packed, String> {
        self.read_packed(base, &read, false).map(|(p, _)| p)
    }

    /// Whether the GPTQ weight `base` is stored act-order: its `g_idx` puts some input column in
    /// a group other than `k / G` (false for other methods).
    pub fn is_act_order(
        &self,
        base: &str,
        read: impl Fn(&str) -> Result<Raw, String>,
    ) -> Result<bool, String> {
        if !matches!(self.method, Method::Gptq { .. }) {
            return Ok(false);
        }
        let (d, s, b) = read(&format!("{base}.g_idx"))?;
        if d != Dtype::I32 || s.len() != 1 {
            return Err(format!("`{base}.g_idx` is {d:?} {s:?}; expected I32 [in]"));
        }
        Ok(b.chunks_exact(4).enumerate().any(|(k, c)| {
            i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64 != (k / self.group) as i64
        }))
    }

    /// A GPTQ weight `X.weight` `[out, in]` dequantized with each input column's group from
    /// `X.g_idx` (act-order): `w[n, k] = (q[n, k] − zero[n, g]) · scale[g, n]`, `g = g_idx[k]`,
    /// the value AutoGPTQ's and transformers' dequantization gives (f16 scales, exact in f32).
    pub fn dequantized_act_order(
        &self,
        base: &str,
        read: impl Fn(&str) -> Result<Raw, String>,
    ) -> Result<Vec<f32>, String> {
        let (p, g_idx) = self.read_packed(base, &read, true)?;
        let (rows, cols) = (p.rows, p.cols);
        let groups = cols / self.group;
        let mut w = vec![0f32; rows * cols];
        for n in 0..rows {
            for k in 0..cols {
                let g = g_idx.as_ref().map_or(k / self.group, |g| g[k] as usize);
                let code = (p.q[n * cols / 2 + k / 2] >> (4 * (k % 2))) & 15;
                let at = n * groups + g;
                w[n * cols + k] = (f32::from(code) - f32::from(p.zero[at])) * p.scale[at];
            }
        }
        Ok(w)
    }

    /// [`PreQuant::packed`], with a GPTQ weight's group index where `act_order` allows one
    /// other than `k / G` (the packing's groups are then `g_idx`'s, not column runs).
    fn read_packed(
        &self,
        base: &str,
        read: &impl Fn(&str) -> Result<Raw, String>,
        act_order: bool,
    ) -> Result<(Packed, Option<Vec<u32>>), String> {
        let part = |suffix: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>, String> {
            let name = format!("{base}{suffix}");
            let (d, s, bytes) = read(&name)?;
            if d != dtype || s != shape {
                return Err(format!(
                    "`{name}` is {d:?} {s:?}; {} expects {dtype:?} {shape:?}",
                    self.describe()
                ));
            }
            Ok(bytes)
        };
        if self.method == Method::CompressedFp8 {
            return fp8_packed(base, read).map(|p| (p, None));
        }
        let (_, qshape, _) = read(&format!("{base}{}", self.marker()))?;
        let (rows, cols) = self.dims(base, &qshape)?;
        let g = self.group;
        if !rows.is_multiple_of(8) || !cols.is_multiple_of(8) || !cols.is_multiple_of(g) {
            return Err(format!(
                "`{base}`: [{rows}, {cols}] does not split into 8-code words and groups of {g}"
            ));
        }
        let groups = cols / g;
        let words = |b: &[u8]| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let nib = |w: u32, i: usize| ((w >> (4 * i)) & 15) as u8;
        let (code, zero): (Lookup, Lookup);
        let mut act_order_groups = None;
        match self.method {
            Method::AwqGemm => {
                const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
                // Where output column c's code sits in its word.
                let mut slot = [0usize; 8];
                for (i, &c) in ORDER.iter().enumerate() {
                    slot[c] = i;
                }
                let q = words(&part(".qweight", Dtype::I32, &[cols, rows / 8])?);
                let z = words(&part(".qzeros", Dtype::I32, &[groups, rows / 8])?);
                code = Box::new(move |n, k| nib(q[k * (rows / 8) + n / 8], slot[n % 8]));
                zero = Box::new(move |n, gi| nib(z[gi * (rows / 8) + n / 8], slot[n % 8]));
            }
            Method::Gptq { v2 } => {
                let q = words(&part(".qweight", Dtype::I32, &[cols / 8, rows])?);
                let z = words(&part(".qzeros", Dtype::I32, &[groups, rows / 8])?);
                let gidx = words(&part(".g_idx", Dtype::I32, &[cols])?);
                if let Some(k) = (0..cols).find(|&k| gidx[k] as usize >= groups) {
                    return Err(format!(
                        "`{base}.g_idx` puts input column {k} in group {}, beyond its {groups} \
                         groups",
                        gidx[k] as i32
                    ));
                }
                if let Some(k) = (0..cols).find(|&k| gidx[k] as usize != k / g) {
                    if !act_order {
                        return Err(format!(
                            "`{base}.g_idx` puts input column {k} in group {}, not {}: an \
                             act-order (desc_act) weight, whose groups are not runs of columns",
                            gidx[k] as i32,
                            k / g
                        ));
                    }
                    act_order_groups = Some(gidx);
                }
                let offset = u8::from(!v2);
                code = Box::new(move |n, k| nib(q[(k / 8) * rows + n], k % 8));
                // v1 stores zero − 1 in 4 bits: the stored 15 is a zero point of 16, which no
                // 4-bit grid uses; such a checkpoint is malformed (checked below).
                zero = Box::new(move |n, gi| nib(z[gi * (rows / 8) + n / 8], n % 8) + offset);
            }
            Method::CompressedTensors { symmetric } => {
                return self
                    .compressed_tensors(base, read, rows, cols, symmetric)
                    .map(|p| (p, None));
            }
            Method::CompressedFp8 => unreachable!("read above"),
        }
        let scales = part(".scales", Dtype::F16, &[groups, rows])?;
        let mut p = Packed {
            format: self.format(),
            rows,
            cols,
            q: vec![0; rows * cols / 2],
            scale: vec![0.0; rows * groups],
            zero: vec![0; rows * groups],
            col_scale: Vec::new(),
            min: Vec::new(),
        };
        for n in 0..rows {
            for k in 0..cols {
                p.q[n * cols / 2 + k / 2] |= code(n, k) << (4 * (k % 2));
            }
            for gi in 0..groups {
                let z = zero(n, gi);
                if z > 15 {
                    return Err(format!(
                        "`{base}.qzeros`: zero point {z} of row {n}, group {gi} is outside 0..=15"
                    ));
                }
                p.zero[n * groups + gi] = z;
                let at = 2 * (gi * rows + n);
                p.scale[n * groups + gi] =
                    half::f16::from_le_bytes([scales[at], scales[at + 1]]).to_f32();
            }
        }
        Ok((p, act_order_groups))
    }
}

impl PreQuant {
    /// [`PreQuant::packed`] for compressed-tensors `pack-quantized`.
    fn compressed_tensors(
        &self,
        base: &str,
        read: &impl Fn(&str) -> Result<Raw, String>,
        rows: usize,
        cols: usize,
        symmetric: bool,
    ) -> Result<Packed, String> {
        let groups = cols / self.group;
        let words = |name: &str, shape: &[usize]| -> Result<Vec<u32>, String> {
            let (d, s, b) = read(name)?;
            if d != Dtype::I32 || s != shape {
                return Err(format!("`{name}` is {d:?} {s:?}; expected I32 {shape:?}"));
            }
            Ok(b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let q = words(&format!("{base}.weight_packed"), &[rows, cols / 8])?;
        let scale_name = format!("{base}.weight_scale");
        let (d, s, b) = read(&scale_name)?;
        if s != [rows, groups] {
            return Err(format!(
                "`{scale_name}` has shape {s:?}; expected {:?}",
                [rows, groups]
            ));
        }
        let scales = kiln_runtime::engine::widen_to_f32(d, &b)
            .ok_or_else(|| format!("`{scale_name}` is {d:?}; expected a float type"))?;
        if let Some(bad) = scales
            .iter()
            .find(|&&v| half::f16::from_f32(v).to_f32() != v)
        {
            return Err(format!(
                "`{scale_name}` holds {bad:e}, which is not an f16 value (kiln stores int4 \
                 scales in f16)"
            ));
        }
        let zeros = if symmetric {
            Vec::new()
        } else {
            words(&format!("{base}.weight_zero_point"), &[rows / 8, groups])?
        };
        let mut p = Packed {
            format: self.format(),
            rows,
            cols,
            q: vec![0; rows * cols / 2],
            scale: scales
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect(),
            zero: Vec::new(),
            col_scale: Vec::new(),
            min: Vec::new(),
        };
        for n in 0..rows {
            for k in 0..cols {
                let c = ((q[n * cols / 8 + k / 8] >> (4 * (k % 8))) & 15) as u8;
                p.q[n * cols / 2 + k / 2] |= c << (4 * (k % 2));
            }
        }
        if !symmetric {
            p.zero = (0..rows)
                .flat_map(|n| (0..groups).map(move |g| (n, g)))
                .map(|(n, g)| ((zeros[(n / 8) * groups + g] >> (4 * (n % 8))) & 15) as u8)
                .collect();
        }
        Ok(p)
    }
}

/// An FP8 checkpoint's linear weight `X.weight` (`base` = `X`) as kiln's `fp8`: the E4M3
/// codes as they are, the per-channel (`[out, 1]`) or per-tensor scale as one f32 per row.
fn fp8_packed(base: &str, read: &impl Fn(&str) -> Result<Raw, String>) -> Result<Packed, String> {
    let name = format!("{base}.weight");
    let (d, shape, q) = read(&name)?;
    let [rows, cols] = shape[..] else {
        return Err(format!("`{name}` has shape {shape:?}; expected 2 axes"));
    };
    if d != Dtype::F8_E4M3 {
        return Err(format!(
            "`{name}` is {d:?}; an FP8 checkpoint stores F8_E4M3 weights"
        ));
    }
    let scale_name = format!("{base}.weight_scale");
    let (sd, sshape, sb) = read(&scale_name)?;
    let values = kiln_runtime::engine::widen_to_f32(sd, &sb)
        .ok_or_else(|| format!("`{scale_name}` is {sd:?}; expected a float type"))?;
    let scale = match (sshape.as_slice(), values.len()) {
        ([] | [1] | [1, 1], 1) => vec![values[0]; rows],
        ([r] | [r, 1], n) if *r == rows && n == rows => values,
        _ => {
            return Err(format!(
                "`{scale_name}` has shape {sshape:?}; expected [{rows}, 1] (per channel) or one \
                 value (per tensor)"
            ))
        }
    };
    let parts: Vec<Vec<u8>> = vec![q, scale.iter().flat_map(|s| s.to_le_bytes()).collect()];
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Packed::from_bytes(DType::Fp8, rows, cols, &refs).map_err(|e| format!("`{name}`: {e}"))
}

/// The `quantization_config` of a compressed-tensors checkpoint: one weight-only config group
/// of 4-bit ints in groups of 32, 64 or 128, packed (`pack-quantized`), without act-order; or
/// FP8 weights with dynamic FP8 activations (`float-quantized`).
fn compressed_tensors(
    q: &Value,
    refuse: impl Fn(String) -> Result<Option<PreQuant>, String>,
) -> Result<Option<PreQuant>, String> {
    let format = q
        .get("format")
        .and_then(Value::as_str)
        .unwrap_or("(absent)");
    if format != "pack-quantized" && format != "float-quantized" {
        return refuse(format!("format `{format}`"));
    }
    let groups: Vec<&Value> = q
        .get("config_groups")
        .and_then(Value::as_object)
        .map(|m| m.values().collect())
        .unwrap_or_default();
    let [group] = groups.as_slice() else {
        return refuse(format!("{} config groups (kiln reads one)", groups.len()));
    };
    if format == "float-quantized" {
        return compressed_fp8(group, refuse);
    }
    if group.get("input_activations").is_some_and(|v| !v.is_null()) {
        return refuse("quantized input activations".into());
    }
    let w = group.get("weights").cloned().unwrap_or(Value::Null);
    let text = |k: &str| w.get(k).and_then(Value::as_str).unwrap_or("(absent)");
    if w.get("num_bits").and_then(Value::as_i64) != Some(4) || text("type") != "int" {
        return refuse(format!(
            "weights of {} bits of type `{}`",
            w.get("num_bits")
                .map_or("(absent)".into(), |v| v.to_string()),
            text("type")
        ));
    }
    if text("strategy") != "group" {
        return refuse(format!("strategy `{}`", text("strategy")));
    }
    if w.get("actorder")
        .is_some_and(|v| !v.is_null() && v != false)
    {
        return refuse("actorder".into());
    }
    let size = w.get("group_size").and_then(Value::as_i64).unwrap_or(-1);
    if !INT4_GROUPS.iter().any(|&g| i64::from(g) == size) {
        return refuse(format!("group_size {size}"));
    }
    Ok(Some(PreQuant {
        method: Method::CompressedTensors {
            symmetric: w.get("symmetric").and_then(Value::as_bool).unwrap_or(true),
        },
        group: size as usize,
    }))
}

/// The one config group of a compressed-tensors FP8 checkpoint: 8-bit float weights per
/// channel or per tensor with 8-bit float activations, dynamic per token.
fn compressed_fp8(
    group: &Value,
    refuse: impl Fn(String) -> Result<Option<PreQuant>, String>,
) -> Result<Option<PreQuant>, String> {
    let field = |part: &str, k: &str| group.get(part).and_then(|p| p.get(k)).cloned();
    let text = |part: &str, k: &str| {
        field(part, k)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "(absent)".into())
    };
    let bits = |part: &str| field(part, "num_bits").and_then(|v| v.as_i64());
    if bits("weights") != Some(8) || text("weights", "type") != "float" {
        return refuse(format!(
            "float-quantized weights of {} bits of type `{}`",
            bits("weights").map_or("(absent)".into(), |b| b.to_string()),
            text("weights", "type")
        ));
    }
    let strategy = text("weights", "strategy");
    if strategy != "channel" && strategy != "tensor" {
        return refuse(format!("FP8 weights with strategy `{strategy}`"));
    }
    if group.get("input_activations").is_none_or(Value::is_null) {
        return refuse(
            "FP8 weights and 16-bit activations (kiln's fp8 rounds the activations to E4M3 too)"
                .into(),
        );
    }
    if bits("input_activations") != Some(8) || text("input_activations", "type") != "float" {
        return refuse("activations that are not 8-bit floats".into());
    }
    if field("input_activations", "dynamic").and_then(|v| v.as_bool()) != Some(true) {
        return refuse("static activation scales (input_scale)".into());
    }
    let act = text("input_activations", "strategy");
    if act != "token" {
        return refuse(format!(
            "activation strategy `{act}` (kiln scales per token)"
        ));
    }
    Ok(Some(PreQuant {
        method: Method::CompressedFp8,
        group: 0,
    }))
}

#[cfg(test)]
#[path = "prequant_tests.rs"]
mod tests;
