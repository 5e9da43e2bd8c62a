//! Printing that never panics: `println!` and `eprintln!` panic when the
//! stream is closed or full (`2>/dev/full`, a reader that went away), and a
//! hub must keep serving whatever happens to its terminal.

use std::fmt::Display;
use std::io::Write;

/// Prints one line on stdout, flushed; errors are ignored.
pub(crate) fn say(line: impl Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints one line on stderr; errors are ignored.
pub(crate) fn complain(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
