//! The platform-specific steps of a durable file replace, in one place.
//!
//! A record is stored by renaming an `fsync`ed temp file over the current
//! one. What makes the rename itself durable differs by platform:
//!
//! - **Unix**: rename, then `fsync` the directory (POSIX keeps directory
//!   entries in the directory's own data).
//! - **Windows**: a directory cannot be opened as a file (`File::open`
//!   is refused), so there is no directory sync; the rename is done
//!   write-through instead (`MoveFileExW` with `MOVEFILE_WRITE_THROUGH`,
//!   through the `atomicwrites` crate), which returns once the rename is on
//!   disk.

use std::io;
use std::path::Path;

/// Renames `from` to `to`, replacing `to`. With `durable`, the rename is on
/// disk once [`sync_dir`] of the directory has returned too.
pub(crate) fn replace(from: &Path, to: &Path, durable: bool) -> io::Result<()> {
    #[cfg(windows)]
    if durable {
        return atomicwrites::replace_atomic(from, to);
    }
    let _ = durable;
    std::fs::rename(from, to)
}

/// Makes the renames and removals done in `dir` durable.
#[cfg(unix)]
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Makes the renames and removals done in `dir` durable: nothing to do, the
/// renames were write-through.
#[cfg(not(unix))]
pub(crate) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}
