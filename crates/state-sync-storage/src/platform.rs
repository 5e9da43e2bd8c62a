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
//!
//! Files are private to the user running the process: on Unix a directory
//! the store creates is `0700` and record files are `0600`, whatever the
//! umask; on
//! Windows they inherit the ACL of the directory they are created in (by
//! default, the user's profile is private to them).

use std::fs::OpenOptions;
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

/// Creates `dir` and its missing parents, `0700` on Unix. An existing
/// directory is left as it is (it may be shared on purpose), with a warning
/// when other users may read it.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "the storage directory is open to other users; `chmod 700` it to keep them from listing topics"
            );
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Options that create (or truncate) a file only this user can read: `0600`
/// on Unix.
pub(crate) fn private_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// An exclusive lock on a storage directory, held while any
/// [`FileStorage`](crate::FileStorage) of this process uses it: a second
/// process opening the directory is refused. Through the standard library's
/// file locks (`flock` on Unix, `LockFileEx` on Windows), released by the
/// operating system if the process dies.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: std::fs::File,
}

/// Locks `dir`, or shares the lock this process already holds on it.
pub(crate) fn lock_dir(dir: &Path) -> Result<std::sync::Arc<DirLock>, crate::Error> {
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::{Arc, Mutex, PoisonError, Weak};

    static HELD: Mutex<Option<HashMap<std::path::PathBuf, Weak<DirLock>>>> = Mutex::new(None);
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| crate::Error::Io { path, source }
    };
    let canonical = dir.canonicalize().map_err(io_error(dir))?;
    let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    let held = held.get_or_insert_with(HashMap::new);
    if let Some(lock) = held.get(&canonical).and_then(Weak::upgrade) {
        return Ok(lock);
    }
    let path = canonical.join(".lock");
    let mut file = private_file_options()
        .truncate(false)
        .open(&path)
        .map_err(io_error(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(crate::Error::Locked {
                dir: canonical,
                holder: holder.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_error(&path)(e)),
    }
    // Who holds it, for the error another process will show.
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    let lock = Arc::new(DirLock { _file: file });
    held.retain(|_, lock| lock.strong_count() > 0);
    held.insert(canonical, Arc::downgrade(&lock));
    Ok(lock)
}
