//! NVRTC: CUDA C++ source → **CUBIN** (SASS for one real architecture, `sm_90` by default).
//!
//! CUBIN rather than PTX because the driver loads a CUBIN in about 0.1 ms where the same module
//! as PTX costs about 370 ms of JIT (`notes/gpu-facts.md`). cudarc's safe NVRTC API only returns
//! PTX, so this module drives `cudarc::nvrtc::{result, sys}` directly: create the program (with
//! in-memory headers), register one name expression per template instance, compile, read the
//! lowered (mangled) names and the CUBIN.
//!
//! Nothing here needs a GPU. What it needs, and how it is found:
//! - `libnvrtc.so.13`: cudarc dlopens it by name (the loader path: `LD_LIBRARY_PATH`, the
//!   executable's RUNPATH, `ld.so.cache`). When that fails, [`ensure_nvrtc`] preloads it by
//!   absolute path from `$KILN_NVRTC_LIB`, `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
//!   `/usr/local/cuda/lib64`, the repository's `.cache/cuda` (`scripts/install-nvrtc.sh`) and
//!   python3's `site-packages/nvidia/cu13/lib`; later dlopens by name then resolve to it.
//! - the CUDA headers (`cuda_bf16.h`; NVRTC 13 has none built in): [`find_cuda_include`] looks in
//!   `$KILN_CUDA_INCLUDE`, `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`,
//!   the repository's `.cache/cuda` and python3's `site-packages/nvidia/cu13/include`.
//!
//! A missing library or header directory is an [`NvrtcError`], never a panic.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

/// The default target: H100 (compute capability 9.0).
pub const DEFAULT_ARCH: &str = "sm_90";

/// What can go wrong while compiling kernels with NVRTC.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    /// `libnvrtc` could not be loaded.
    #[error(
        "NVRTC library (libnvrtc.so.13) not found: not on the loader path (LD_LIBRARY_PATH) nor in \
         {searched}; run scripts/install-nvrtc.sh, install the CUDA 13 toolkit, or set KILN_NVRTC_LIB \
         to the directory that holds it"
    )]
    LibraryMissing {
        /// The directories that were tried.
        searched: String,
    },
    /// No directory with `cuda_bf16.h` was found.
    #[error(
        "CUDA headers (cuda_bf16.h) not found in {searched}; set CUDA_HOME or KILN_CUDA_INCLUDE, \
         install the CUDA 13 toolkit, or run scripts/install-nvrtc.sh"
    )]
    HeadersMissing {
        /// The directories that were tried.
        searched: String,
    },
    /// The source did not compile: the NVRTC log names the line.
    #[error("NVRTC failed to compile {program} (kernel instances: {instances}):\n{log}")]
    Compile {
        /// The program (template file) name.
        program: String,
        /// The name expressions of the kernel instances in that program.
        instances: String,
        /// NVRTC's log.
        log: String,
    },
    /// Another NVRTC call failed.
    #[error("NVRTC {call} failed with {code} ({context})")]
    Api {
        /// The NVRTC function.
        call: &'static str,
        /// Its result code.
        code: String,
        /// What was being done.
        context: String,
    },
}

fn api<'a>(
    call: &'static str,
    context: &'a str,
) -> impl FnOnce(result::NvrtcError) -> NvrtcError + 'a {
    move |e| NvrtcError::Api {
        call,
        code: format!("{:?}", e.0),
        context: context.to_string(),
    }
}

/// The repository's cache folder (`$KILN_CACHE`, else `.cache/` beside the workspace root).
fn repo_cache() -> PathBuf {
    match std::env::var_os("KILN_CACHE") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(".cache"),
    }
}

/// python3's site-packages directories (asked once; empty when there is no python3).
fn python_site_packages() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import site, sysconfig\n\
                 ps = set(site.getsitepackages() + [site.getusersitepackages()])\n\
                 ps.add(sysconfig.get_paths()['purelib'])\n\
                 print('\\n'.join(sorted(ps)))",
            ])
            .stderr(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect(),
            _ => Vec::new(),
        }
    })
}

fn env_dir(var: &str, sub: &str) -> Option<PathBuf> {
    std::env::var_os(var).map(|v| PathBuf::from(v).join(sub))
}

/// Candidate directories for a CUDA component: `explicit_var` as given, the toolkit roots
/// (`CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`) joined with `toolkit_sub`, then the pip packages
/// (`nvidia/cu13/<pip_sub>`) in the repository cache and python3's site-packages.
fn candidate_dirs(explicit_var: &str, toolkit_sub: &str, pip_sub: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os(explicit_var) {
        dirs.push(PathBuf::from(p));
    }
    dirs.extend(env_dir("CUDA_HOME", toolkit_sub));
    dirs.extend(env_dir("CUDA_PATH", toolkit_sub));
    dirs.push(Path::new("/usr/local/cuda").join(toolkit_sub));
    dirs.push(repo_cache().join("cuda/nvidia/cu13").join(pip_sub));
    dirs
}

fn with_site_packages(mut dirs: Vec<PathBuf>, pip_sub: &str) -> Vec<PathBuf> {
    for sp in python_site_packages() {
        dirs.push(sp.join("nvidia/cu13").join(pip_sub));
    }
    dirs
}

fn list(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CUDA include directory (the one holding `cuda_bf16.h`), searched as the module doc says.
pub fn find_cuda_include() -> Result<PathBuf, NvrtcError> {
    let first = candidate_dirs("KILN_CUDA_INCLUDE", "include", "include");
    if let Some(d) = first.iter().find(|d| d.join("cuda_bf16.h").is_file()) {
        return Ok(d.clone());
    }
    let all = with_site_packages(first, "include");
    match all.iter().find(|d| d.join("cuda_bf16.h").is_file()) {
        Some(d) => Ok(d.clone()),
        None => Err(NvrtcError::HeadersMissing {
            searched: list(&all),
        }),
    }
}

fn preload_from(dirs: &[PathBuf]) -> bool {
    for d in dirs {
        let lib = d.join("libnvrtc.so.13");
        let lib = if lib.exists() {
            lib
        } else {
            d.join("libnvrtc.so")
        };
        if !lib.exists() {
            continue;
        }
        // libnvrtc dlopens its builtins library by name; load it first from the same folder so
        // that lookup resolves without LD_LIBRARY_PATH.
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("libnvrtc-builtins.so") {
                    // SAFETY: loading a shared library runs its initializers; this is NVIDIA's
                    // NVRTC builtins library, which has no unusual initialization.
                    if let Ok(l) = unsafe { libloading::Library::new(e.path()) } {
                        std::mem::forget(l);
                    }
                }
            }
        }
        // SAFETY: as above. The handle is leaked so the library stays loaded for the process;
        // cudarc's later dlopen("libnvrtc.so.13") finds it by its SONAME.
        if let Ok(l) = unsafe { libloading::Library::new(&lib) } {
            std::mem::forget(l);
            // SAFETY: only probes dlopen.
            if unsafe { sys::is_culib_present() } {
                return true;
            }
        }
    }
    false
}

/// Makes sure cudarc can load NVRTC, preloading it from the known directories if the loader
/// path does not have it. Cheap after the first call.
pub fn ensure_nvrtc() -> Result<(), NvrtcError> {
    static STATE: OnceLock<Result<(), String>> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        // SAFETY: `is_culib_present` only tries dlopen on cudarc's candidate names.
        if unsafe { sys::is_culib_present() } {
            return Ok(());
        }
        let first = candidate_dirs("KILN_NVRTC_LIB", "lib64", "lib");
        if preload_from(&first) {
            return Ok(());
        }
        let all = with_site_packages(first, "lib");
        if preload_from(&all) {
            return Ok(());
        }
        Err(list(&all))
    });
    state
        .clone()
        .map_err(|searched| NvrtcError::LibraryMissing { searched })
}

/// The NVRTC version as (major, minor).
pub fn version() -> Result<(i32, i32), NvrtcError> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the out-pointers are valid.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(api("nvrtcVersion", "querying the version"))?;
    Ok((major, minor))
}

/// Options of one NVRTC compilation.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// A real architecture (`sm_90`, `sm_90a`, `sm_80`, …): NVRTC only emits a CUBIN for these.
    pub arch: String,
    /// Include directories (the CUDA include directory first).
    pub include_dirs: Vec<PathBuf>,
    /// Further NVRTC options, passed as given.
    pub extra: Vec<String>,
}

impl CompileOptions {
    /// Options for `arch` with the CUDA include directory found by [`find_cuda_include`].
    pub fn for_arch(arch: &str) -> Result<Self, NvrtcError> {
        Ok(Self {
            arch: arch.to_string(),
            include_dirs: vec![find_cuda_include()?],
            extra: Vec::new(),
        })
    }

    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--gpu-architecture={}", self.arch),
            "-std=c++17".to_string(),
        ];
        for d in &self.include_dirs {
            args.push(format!("--include-path={}", d.display()));
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// The result of compiling one program.
#[derive(Debug, Clone)]
pub struct Cubin {
    /// The CUBIN image (load with `cuModuleLoadData`, cudarc `Ptx::from_binary`).
    pub image: Vec<u8>,
    /// (name expression, lowered name) for every registered name expression, in order.
    pub lowered_names: Vec<(String, String)>,
    /// NVRTC's log (warnings), empty when there were none.
    pub log: String,
}

/// Destroys the program when dropped.
struct ProgramGuard(sys::nvrtcProgram);

impl Drop for ProgramGuard {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn cstring(s: &str, what: &str) -> Result<CString, NvrtcError> {
    CString::new(s).map_err(|_| NvrtcError::Api {
        call: "nvrtcCreateProgram",
        code: "interior NUL byte".into(),
        context: what.to_string(),
    })
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `source` (named `program` in messages) with in-memory `headers` (include name,
/// contents) to a CUBIN, registering each of `name_exprs` (e.g. `"rmsnorm<4096>"`) so its
/// template instance is emitted and its lowered name returned.
pub fn compile_cubin(
    program: &str,
    source: &str,
    headers: &[(&str, &str)],
    name_exprs: &[String],
    opts: &CompileOptions,
) -> Result<Cubin, NvrtcError> {
    ensure_nvrtc()?;
    let src = cstring(source, program)?;
    let prog_name = cstring(program, program)?;
    let header_srcs: Vec<CString> = headers
        .iter()
        .map(|(_, s)| cstring(s, program))
        .collect::<Result<_, _>>()?;
    let header_names: Vec<CString> = headers
        .iter()
        .map(|(n, _)| cstring(n, program))
        .collect::<Result<_, _>>()?;
    let header_src_ptrs: Vec<*const c_char> = header_srcs.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();

    let mut raw = std::mem::MaybeUninit::<sys::nvrtcProgram>::uninit();
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the program (they live
    // until the end of this function, and the guard destroys the program before that).
    unsafe {
        sys::nvrtcCreateProgram(
            raw.as_mut_ptr(),
            src.as_ptr(),
            prog_name.as_ptr(),
            headers.len() as i32,
            if headers.is_empty() {
                std::ptr::null()
            } else {
                header_src_ptrs.as_ptr()
            },
            if headers.is_empty() {
                std::ptr::null()
            } else {
                header_name_ptrs.as_ptr()
            },
        )
    }
    .result()
    .map_err(api("nvrtcCreateProgram", program))?;
    // SAFETY: nvrtcCreateProgram succeeded, so the program handle is initialized.
    let guard = ProgramGuard(unsafe { raw.assume_init() });

    let exprs: Vec<CString> = name_exprs
        .iter()
        .map(|e| cstring(e, program))
        .collect::<Result<_, _>>()?;
    for (e, c) in name_exprs.iter().zip(&exprs) {
        // SAFETY: valid program and string.
        unsafe { sys::nvrtcAddNameExpression(guard.0, c.as_ptr()) }
            .result()
            .map_err(api("nvrtcAddNameExpression", e))?;
    }

    let args = opts.to_args();
    // SAFETY: valid program; the options are plain strings without NUL bytes.
    let compiled = unsafe { result::compile_program(guard.0, &args) };
    // SAFETY: valid program.
    let log = unsafe { result::get_program_log(guard.0) }
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_default();
    if let Err(e) = compiled {
        let log = if log.trim().is_empty() {
            format!("{:?} (no log)", e.0)
        } else {
            log
        };
        return Err(NvrtcError::Compile {
            program: program.to_string(),
            instances: name_exprs.join(", "),
            log: format!("{log}\noptions: {}", args.join(" ")),
        });
    }

    let mut lowered_names = Vec::with_capacity(name_exprs.len());
    for (e, c) in name_exprs.iter().zip(&exprs) {
        let mut lowered: *const c_char = std::ptr::null();
        // SAFETY: valid program, the expression was registered before compiling.
        unsafe { sys::nvrtcGetLoweredName(guard.0, c.as_ptr(), &mut lowered) }
            .result()
            .map_err(api("nvrtcGetLoweredName", e))?;
        // SAFETY: NVRTC returns a NUL-terminated string owned by the program, copied here
        // before the program is destroyed.
        let name = unsafe { CStr::from_ptr(lowered) }
            .to_string_lossy()
            .into_owned();
        lowered_names.push((e.clone(), name));
    }

    let mut size = 0usize;
    // SAFETY: valid, compiled program.
    unsafe { sys::nvrtcGetCUBINSize(guard.0, &mut size) }
        .result()
        .map_err(api("nvrtcGetCUBINSize", program))?;
    if size == 0 {
        return Err(NvrtcError::Api {
            call: "nvrtcGetCUBIN",
            code: "empty CUBIN".into(),
            context: format!("{program}: is `{}` a real architecture (sm_XX)?", opts.arch),
        });
    }
    let mut image = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes as NVRTC asked.
    unsafe { sys::nvrtcGetCUBIN(guard.0, image.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(api("nvrtcGetCUBIN", program))?;
    drop(guard);
    Ok(Cubin {
        image,
        lowered_names,
        log: log.trim().to_string(),
    })
}
