//! Writing to stdout/stderr without panicking on a closed pipe (`taskctl ls | head`).

use std::io::{ErrorKind, Write};

/// Writes one line to stdout; exits quietly when stdout is a closed pipe.
pub(crate) fn line(text: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|_| out.flush()) {
        gone(e);
    }
}

/// Writes raw bytes to stdout.
pub(crate) fn bytes(data: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(data).and_then(|_| out.flush()) {
        gone(e);
    }
}

/// Writes raw bytes to stderr.
pub(crate) fn err_bytes(data: &[u8]) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(data).and_then(|_| err.flush());
}

/// Writes a JSON value as one line.
pub(crate) fn json(value: &serde_json::Value) {
    line(value);
}

fn gone(e: std::io::Error) {
    if e.kind() == ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("taskctl: error: cannot write output: {e}");
    std::process::exit(1);
}
