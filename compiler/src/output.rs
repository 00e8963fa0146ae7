//! Output files that never cost the user an input: a path is refused when it is (or, through a
//! symlink or a hard link, names the same file as) an input, lies inside the checkpoint folder,
//! or exists as something other than a regular file; the contents go to a unique temporary file
//! beside the destination, are flushed to disk, and are renamed over it only when complete. A
//! failed write removes its temporary file, and so does Ctrl-C (`remove_partials`, called by the
//! CLI's signal handler). Two writers of the same destination never share a temporary file: the
//! last rename wins and the destination is always one complete file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporary files being written, removed by `remove_partials` on Ctrl-C.
static PARTIALS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes every temporary output file still being written (for a signal handler: the process
/// is about to exit and no destructor will run).
pub fn remove_partials() {
    if let Ok(mut list) = PARTIALS.lock() {
        for p in list.drain(..) {
            let _ = fs::remove_file(p);
        }
    }
}

fn canonical_or_self(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Where `out` will land once written: its canonical path (the file a symlink points to, if it
/// exists), or its canonical folder joined with its name.
fn resolve(out: &Path) -> Result<PathBuf, String> {
    if let Ok(p) = fs::canonicalize(out) {
        return Ok(p);
    }
    let name = out
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = fs::canonicalize(parent).map_err(|e| {
        format!(
            "{}: the output folder cannot be used: {e}",
            parent.display()
        )
    })?;
    if !dir.is_dir() {
        return Err(format!("{}: not a folder", parent.display()));
    }
    Ok(dir.join(name))
}

#[cfg(unix)]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &fs::Metadata, _: &fs::Metadata) -> bool {
    false
}

/// Checks that writing `out` loses nothing: it is not one of `inputs` (files, or folders whose
/// whole content is input, such as a checkpoint folder), not inside an input folder, and not an
/// existing non-regular file (a folder, a device, a FIFO). Returns the resolved destination.
pub fn check_output(out: &Path, inputs: &[&Path]) -> Result<PathBuf, String> {
    let dest = resolve(out)?;
    let existing = fs::metadata(&dest).ok();
    if let Some(m) = &existing {
        if !m.is_file() {
            return Err(format!(
                "{}: exists and is not a regular file (a folder or a device); choose another \
                 output path",
                out.display()
            ));
        }
    }
    for input in inputs {
        let canon = canonical_or_self(input);
        let Ok(meta) = fs::metadata(&canon) else {
            continue;
        };
        if meta.is_dir() {
            if dest.starts_with(&canon) {
                return Err(format!(
                    "{}: inside the input folder {}; kiln never writes into its inputs",
                    out.display(),
                    input.display()
                ));
            }
        } else if dest == canon || existing.as_ref().is_some_and(|m| same_file(m, &meta)) {
            return Err(format!(
                "{}: is the input {} (it would be overwritten); choose another output path",
                out.display(),
                input.display()
            ));
        }
    }
    Ok(dest)
}

/// Writes `out` atomically after `check_output(out, inputs)`: `write` fills a unique temporary
/// file in the destination folder (it gets the temporary path; it may reopen it), which is then
/// flushed to disk and renamed over `out`. On any error the temporary file is removed and `out`
/// is untouched.
pub fn write_output(
    out: &Path,
    inputs: &[&Path],
    write: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let dest = check_output(out, inputs)?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|e| format!("{}: cannot create a temporary file: {e}", dir.display()))?;
    let tmp_path = tmp.path().to_path_buf();
    if let Ok(mut list) = PARTIALS.lock() {
        list.push(tmp_path.clone());
    }
    let result = write(&tmp_path)
        .and_then(|()| {
            fs::File::open(&tmp_path)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("{}: {e}", tmp_path.display()))
        })
        .and_then(|()| {
            tmp.persist(&dest)
                .map(|_| ())
                .map_err(|e| format!("{}: {}", dest.display(), e.error))
        });
    if let Ok(mut list) = PARTIALS.lock() {
        list.retain(|p| p != &tmp_path);
    }
    // A failed `persist` hands the file back inside the error, which removes it when dropped.
    if result.is_ok() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    result
}

/// Writes `bytes` to `out` with `write_output`.
pub fn write_bytes(out: &Path, inputs: &[&Path], bytes: &[u8]) -> Result<(), String> {
    write_output(out, inputs, |tmp| {
        fs::File::create(tmp)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| format!("{}: {e}", tmp.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_inputs_links_folders_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        fs::create_dir(&ckpt).unwrap();
        let weights = ckpt.join("model.safetensors");
        fs::write(&weights, b"weights").unwrap();
        let gguf = dir.path().join("m.gguf");
        fs::write(&gguf, b"gguf").unwrap();
        let err = check_output(&gguf, &[&gguf]).unwrap_err();
        assert!(err.contains("is the input"), "{err}");
        assert!(check_output(&weights, &[&ckpt])
            .unwrap_err()
            .contains("inside"));
        assert!(check_output(&ckpt.join("new.kiln"), &[&ckpt]).is_err());
        #[cfg(unix)]
        {
            let link = dir.path().join("link.gguf");
            std::os::unix::fs::symlink(&gguf, &link).unwrap();
            assert!(check_output(&link, &[&gguf]).is_err());
            let hard = dir.path().join("hard.gguf");
            fs::hard_link(&gguf, &hard).unwrap();
            assert!(check_output(&hard, &[&gguf]).is_err());
            let err = check_output(Path::new("/dev/null"), &[&gguf]).unwrap_err();
            assert!(err.contains("not a regular file"), "{err}");
        }
        assert!(check_output(&ckpt, &[&gguf]).is_err(), "a folder as output");
        assert!(check_output(&dir.path().join("out.kiln"), &[&gguf, &ckpt]).is_ok());
        assert!(check_output(&dir.path().join("absent/out.kiln"), &[]).is_err());
    }

    #[test]
    fn failed_writes_leave_nothing_and_keep_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.kiln");
        fs::write(&out, b"old").unwrap();
        let err = write_output(&out, &[], |tmp| {
            fs::write(tmp, b"half").unwrap();
            Err("disk full".into())
        })
        .unwrap_err();
        assert_eq!(err, "disk full");
        assert_eq!(fs::read(&out).unwrap(), b"old");
        write_bytes(&out, &[], b"new").unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left: {names:?}");
    }
}
