//! The runtime arguments of every kernel template, one struct per signature: fields named as the
//! template's parameters, in their order, typed as they are passed (`u64` device pointers,
//! `i32`, `f32`). The executor, `kernel_check` and the signature test below all use these
//! structs, so a kernel's argument list is written once; the test reads the `__global__`
//! signatures in `kernels_templates/` and fails when a struct and its template disagree.

use crate::kernels::{KernelFamily, KernelInstance};

/// Most parameters a kernel template takes (attention_decode: 15).
pub const MAX_ARGS: usize = 16;

/// How a parameter is passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// A device pointer (`const T*`, `T*`, `void*`), as a `u64`.
    Ptr,
    /// `int`
    Int,
    /// `float`
    Float,
}

/// Addresses of a launch's argument values, as `cuLaunchKernel` takes them: the first `len`
/// entries point at the fields of the argument struct they were taken from (valid while it is).
pub struct ArgAddresses {
    /// One address per parameter, then nulls.
    pub ptrs: [*mut std::ffi::c_void; MAX_ARGS],
    /// Parameters in use.
    pub len: usize,
}

/// The arguments of one kernel signature.
pub trait KernelArgs {
    /// The templates with this signature.
    const FAMILIES: &'static [KernelFamily];
    /// Parameter names (lower case) and kinds, in the template's order.
    const PARAMS: &'static [(&'static str, ArgKind)];
    /// The addresses of the values, in order.
    fn addresses(&self) -> ArgAddresses;

    /// Whether these are `k`'s arguments: an error naming both signatures when `k`'s template
    /// has another.
    fn check(k: &KernelInstance) -> Result<(), String> {
        if Self::FAMILIES.contains(&k.family()) {
            Ok(())
        } else {
            Err(format!(
                "kernel `{}` launched with the arguments of `{}`",
                k.name_expr,
                Self::FAMILIES[0].function()
            ))
        }
    }
}

macro_rules! arg_type {
    (Ptr) => {
        u64
    };
    (Int) => {
        i32
    };
    (Float) => {
        f32
    };
}

macro_rules! kernel_args {
    ($(
        $(#[$doc:meta])*
        $name:ident for [$($family:ident),+] {
            $($field:ident: $kind:ident),* $(,)?
        }
    )*) => {$(
        $(#[$doc])*
        ///
        /// Fields: the template's parameters (its header comment says what each holds).
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub struct $name {
            $(pub $field: arg_type!($kind),)*
        }

        impl KernelArgs for $name {
            const FAMILIES: &'static [KernelFamily] = &[$(KernelFamily::$family),+];
            const PARAMS: &'static [(&'static str, ArgKind)] =
                &[$((stringify!($field), ArgKind::$kind)),*];
            fn addresses(&self) -> ArgAddresses {
                const _: () = assert!(<$name as KernelArgs>::PARAMS.len() <= MAX_ARGS);
                let mut ptrs = [std::ptr::null_mut(); MAX_ARGS];
                let mut len = 0;
                $(
                    ptrs[len] = &self.$field as *const _ as *mut std::ffi::c_void;
                    len += 1;
                )*
                ArgAddresses { ptrs, len }
            }
        }
    )*};
}

kernel_args! {
    /// `embedding`: rows of `table` by the ids, times `scale`.
    EmbeddingArgs for [Embedding] { table: Ptr, ids: Ptr, out: Ptr, t: Int, scale: Float }

    /// `rmsnorm`: `out = rmsnorm(x) · w` over `t` rows.
    RmsNormArgs for [RmsNorm] { x: Ptr, w: Ptr, out: Ptr, t: Int, eps: Float }

    /// `add_rmsnorm`: `residual += x`, then `out = rmsnorm(residual) · w`.
    AddRmsNormArgs for [AddRmsNorm] {
        residual: Ptr, x: Ptr, w: Ptr, out: Ptr, t: Int, eps: Float,
    }

    /// `gemv` (CUDA cores): `out = epi(x · wᵀ)` for `m` rows, `n` outputs; `norm_w`/`eps` the
    /// folded RMSNorm (null/0 without); `residual` the residual or bias operand (or null).
    GemvArgs for [Gemv] {
        x: Ptr, m: Int, w: Ptr, n: Int, residual: Ptr, out: Ptr, norm_w: Ptr, eps: Float,
    }

    /// `gemv_tc` (tensor cores): the `gemv` contract without a folded norm.
    GemvTcArgs for [GemvTc] { x: Ptr, m: Int, w: Ptr, n: Int, residual: Ptr, out: Ptr }

    /// `gemv_q`: the `gemv` contract over a quantized weight (`q` codes, `scale`, `zero` or
    /// null; `gemv_q.cu`'s header gives each format's parts).
    GemvQArgs for [GemvQ] {
        x: Ptr, m: Int, q: Ptr, scale: Ptr, zero: Ptr, n: Int, residual: Ptr, out: Ptr,
        norm_w: Ptr, eps: Float,
    }

    /// `dequant`: `r` rows of a quantized weight to bf16 `out`.
    DequantArgs for [Dequant] { q: Ptr, scale: Ptr, zero: Ptr, r: Int, out: Ptr }

    /// `act_fp8`: `t` rows of `x` rounded to E4M3 per row, back in bf16 (`out` may alias `x`;
    /// `scales` unused) or as E4M3 codes in `out` with the row scales in `scales`.
    ActFp8Args for [ActFp8] { x: Ptr, out: Ptr, scales: Ptr, t: Int }

    /// `silu_mul`, `gelu_mul`: `out = act(gate) · up` over `t` rows of `gu` = `[gate | up]`.
    GatedRowsArgs for [SiluMul, GeluMul] { gu: Ptr, out: Ptr, t: Int }

    /// `bias_rows`: each of `t` rows of `out` set to `bias`.
    BiasRowsArgs for [BiasRows] { bias: Ptr, out: Ptr, t: Int }

    /// `rope_append`: RoPE on the q and k columns of `t` rows of `qkv`, k and v appended to the
    /// caches at `slot_mapping`.
    RopeAppendArgs for [RopeAppend] {
        qkv: Ptr, positions: Ptr, slot_mapping: Ptr, k_cache: Ptr, v_cache: Ptr, t: Int,
        inv_freq: Ptr,
    }

    /// `attention_decode`: one query row per sequence (`b` of them), RoPE and the cache append
    /// of its token included, split over `max_splits` KV ranges into `partial_o`/`partial_ml`
    /// (or straight into `out` with one split).
    AttentionDecodeArgs for [AttentionDecode] {
        qkv: Ptr, k_cache: Ptr, v_cache: Ptr, block_tables: Ptr, max_blocks: Int, seq_lens: Ptr,
        slot_mapping: Ptr, inv_freq: Ptr, out: Ptr, b: Int, scale: Float, partial_o: Ptr,
        partial_ml: Ptr, max_splits: Int, window: Int,
    }

    /// `attention_decode_merge`: the splits of `attention_decode` combined into `out`.
    DecodeMergeArgs for [AttentionDecodeMerge] {
        partial_o: Ptr, partial_ml: Ptr, seq_lens: Ptr, out: Ptr, b: Int, max_splits: Int,
        window: Int,
    }

    /// The prefill attention kernels: causal attention of each sequence's query rows
    /// (`query_start`) over its paged cache.
    AttentionPrefillArgs for [AttentionPrefill, AttentionPrefillSimple, AttentionPrefillSm90] {
        qkv: Ptr, k_cache: Ptr, v_cache: Ptr, block_tables: Ptr, max_blocks: Int, seq_lens: Ptr,
        query_start: Ptr, out: Ptr, b: Int, scale: Float, window: Int,
    }

    /// `argmax`: each row's largest logit's index.
    ArgmaxArgs for [Argmax] { logits: Ptr, v: Int, out: Ptr }

    /// `sample`: a token per row with its request's temperature, top-k, top-p and seed.
    SampleArgs for [Sample] {
        logits: Ptr, v: Int, temperature: Ptr, top_k: Ptr, top_p: Ptr, seed_and_step: Ptr,
        out: Ptr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameters of `__global__ void ... name(...)` in the template sources, as
    /// (lower-case name, kind); `None` when no such kernel exists.
    fn signature(sources: &str, name: &str) -> Option<Vec<(String, ArgKind)>> {
        let mut rest = sources;
        while let Some(at) = rest.find("__global__") {
            rest = &rest[at + "__global__".len()..];
            let open = rest.find('(')?;
            // `__launch_bounds__(...)` comes first: the kernel's name precedes the second `(`.
            let head_end = if rest[..open].contains("__launch_bounds__") {
                let close = open + rest[open..].find(')')?;
                close + 1 + rest[close + 1..].find('(')?
            } else {
                open
            };
            let fname = rest[..head_end].split_whitespace().last()?;
            if fname != name {
                continue;
            }
            let body = &rest[head_end + 1..];
            let params = &body[..body.find(')')?];
            return Some(
                params
                    .split(',')
                    .map(|p| {
                        let p = p.trim();
                        let ident = p
                            .rsplit(|c: char| c.is_whitespace() || c == '*')
                            .next()
                            .unwrap_or("");
                        let kind = if p.contains('*') {
                            ArgKind::Ptr
                        } else if p.starts_with("int ") {
                            ArgKind::Int
                        } else if p.starts_with("float ") {
                            ArgKind::Float
                        } else {
                            panic!("{name}: unknown parameter type in `{p}`")
                        };
                        (ident.to_lowercase(), kind)
                    })
                    .collect(),
            );
        }
        None
    }

    fn check<A: KernelArgs>(sources: &str) {
        for family in A::FAMILIES {
            let name = family.function();
            let found = signature(sources, name)
                .unwrap_or_else(|| panic!("no __global__ {name} in kernels_templates/"));
            let want: Vec<(String, ArgKind)> =
                A::PARAMS.iter().map(|(n, k)| (n.to_string(), *k)).collect();
            assert_eq!(
                found, want,
                "{name}: template signature vs its argument struct"
            );
        }
    }

    #[test]
    fn argument_structs_match_the_template_signatures() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernels_templates");
        let mut sources = String::new();
        for entry in std::fs::read_dir(dir).expect("kernels_templates/") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cu") {
                sources += &std::fs::read_to_string(&path).unwrap();
            }
        }
        check::<EmbeddingArgs>(&sources);
        check::<RmsNormArgs>(&sources);
        check::<AddRmsNormArgs>(&sources);
        check::<GemvArgs>(&sources);
        check::<GemvTcArgs>(&sources);
        check::<GemvQArgs>(&sources);
        check::<DequantArgs>(&sources);
        check::<ActFp8Args>(&sources);
        check::<GatedRowsArgs>(&sources);
        check::<BiasRowsArgs>(&sources);
        check::<RopeAppendArgs>(&sources);
        check::<AttentionDecodeArgs>(&sources);
        check::<DecodeMergeArgs>(&sources);
        check::<AttentionPrefillArgs>(&sources);
        check::<ArgmaxArgs>(&sources);
        check::<SampleArgs>(&sources);
    }

    #[test]
    fn a_mismatched_signature_is_caught() {
        let src = "__global__ void __launch_bounds__(128) argmax(const float* logits, int V, int* out, int extra) {}";
        let found = signature(src, "argmax").unwrap();
        assert_eq!(found.len(), 4);
        assert_ne!(
            found,
            ArgmaxArgs::PARAMS
                .iter()
                .map(|(n, k)| (n.to_string(), *k))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn addresses_point_at_the_fields_in_order() {
        let a = ArgmaxArgs {
            logits: 7,
            v: 3,
            out: 9,
        };
        let addr = a.addresses();
        assert_eq!(addr.len, 3);
        // SAFETY: the addresses point at `a`'s fields, alive here, of these types.
        unsafe {
            assert_eq!(*(addr.ptrs[0] as *const u64), 7);
            assert_eq!(*(addr.ptrs[1] as *const i32), 3);
            assert_eq!(*(addr.ptrs[2] as *const u64), 9);
        }
        assert!(addr.ptrs[3].is_null());
    }
}
