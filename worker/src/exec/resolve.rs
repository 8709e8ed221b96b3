//! Finding the program an `argv[0]` names, the way the kernel will run it: PATH lookup for
//! bare names, relative paths against the task's working directory, then `canonicalize`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// PATH used when neither the task nor the worker has one.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Resolves `program` to the canonical absolute path of an executable file.
///
/// A name without `/` is looked up in `path` (the task's `PATH` if it sets one, else the
/// worker's); a relative path is taken from `cwd` (else the worker's directory).
pub(crate) fn resolve(
    program: &str,
    path: Option<&str>,
    cwd: Option<&Path>,
) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("the program name is empty".to_string());
    }
    if program.contains('/') {
        let candidate = match cwd {
            Some(cwd) if Path::new(program).is_relative() => cwd.join(program),
            _ => PathBuf::from(program),
        };
        if !is_executable_file(&candidate) {
            return Err(format!("{program:?} is not an executable file"));
        }
        return candidate
            .canonicalize()
            .map_err(|e| format!("cannot resolve {program:?}: {e}"));
    }
    let worker_path = std::env::var("PATH").ok();
    let search = path.or(worker_path.as_deref()).unwrap_or(DEFAULT_PATH);
    for dir in search.split(':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(dir)
        };
        let dir = match cwd {
            Some(cwd) if dir.is_relative() => cwd.join(dir),
            _ => dir.to_path_buf(),
        };
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return candidate
                .canonicalize()
                .map_err(|e| format!("cannot resolve {}: {e}", candidate.display()));
        }
    }
    Err(format!("{program:?} was not found in PATH ({search})"))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_in_path_and_by_path() {
        let sh = resolve("sh", None, None).unwrap();
        assert!(sh.is_absolute());
        assert_eq!(resolve("/bin/sh", None, None).unwrap(), sh);
        assert!(resolve("no-such-program-xyz", None, None).is_err());
        assert!(resolve("sh", Some("/nonexistent"), None).is_err());
        assert!(resolve("", None, None).is_err());
        // A directory is not a program.
        assert!(resolve("/tmp", None, None).is_err());
        // Relative paths are taken from the task's working directory.
        assert_eq!(resolve("./sh", None, Some(Path::new("/bin"))).unwrap(), sh);
    }
}
