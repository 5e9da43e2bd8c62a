//! [`FileStorage`]: one crash-safe file per topic, the embedded default.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use state_sync::{Revision, Topic};

use crate::error::{Error, Result};
use crate::platform;
use crate::storage::{Record, Storage};

const MAGIC: &str = "SSR1";
const EXTENSION: &str = "ssr";

/// How hard a store works to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// `fsync` the file and its directory on every store (default): a
    /// stored record survives power loss. Costs two `fsync`s per commit.
    #[default]
    Fsync,
    /// Temp file and rename, without `fsync`: a stored record survives a
    /// crash of the process, not of the machine. Much faster; use it for
    /// state that can be rebuilt.
    NoFsync,
}

/// One crash-safe file per topic under a directory.
///
/// # Format
///
/// ```text
/// SSR1 <crc32 of the rest, 8 hex digits> <revision> <data length>\n<data bytes>
/// ```
///
/// # Writing
///
/// A store writes `<file>.tmp`, `fsync`s it, moves the current file to
/// `<file>.bak` (the last good copy), renames the temp file into place and
/// makes the renames durable: on Unix by `fsync`ing the directory, on
/// Windows by renaming write-through (directories cannot be synced there).
/// A crash at any point leaves either the new file, or the old one, or
/// (between the two renames) only the `.bak` copy, which `load` falls back
/// to.
///
/// Once the temp file is renamed into place the record is stored: a failure
/// after that point (a directory sync refused) is logged as a warning and
/// `store` succeeds, because the next `load` returns the new record.
///
/// # Reading
///
/// A file whose header, length or checksum is wrong is renamed to
/// `<file>.corrupt-<unix ms>` and reported as
/// [`Error::Corrupt`](crate::Error::Corrupt); it is never silently replaced
/// by an empty state.
///
/// # Examples
///
/// ```
/// use state_sync::{Revision, Topic};
/// use state_sync_storage::{FileStorage, Record, Storage};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = std::env::temp_dir().join(format!("ssr-doc-{}", std::process::id()));
/// let storage = FileStorage::open(&dir)?;
/// let topic = Topic::new("settings")?;
/// storage.store(&topic, &Record::new(Revision::new(1), r#"{"theme":"dark"}"#)).await?;
/// let record = storage.load(&topic).await?.unwrap();
/// assert_eq!(record.revision, Revision::new(1));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: Arc<PathBuf>,
    durability: Durability,
    _lock: Arc<platform::DirLock>,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

impl FileStorage {
    /// Opens (creating if needed) a storage directory, fsync-every-store.
    /// On Unix a directory it creates is `0700` and record files are
    /// `0600`: only the user running the process can read them. An existing
    /// directory open to others is used as it is, with a warning.
    ///
    /// The directory is locked (file `.lock`) while any `FileStorage` of
    /// this process uses it; opening it again in this process shares the
    /// lock.
    ///
    /// # Errors
    ///
    /// When the directory cannot be created; [`Error::Locked`] when another
    /// process has it open.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        platform::create_private_dir(dir).map_err(io_error(dir))?;
        let lock = platform::lock_dir(dir)?;
        Ok(FileStorage {
            dir: Arc::new(dir.to_owned()),
            durability: Durability::default(),
            _lock: lock,
        })
    }

    /// Sets the durability mode.
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding `topic`.
    #[must_use]
    pub fn path_of(&self, topic: &Topic) -> PathBuf {
        let mut name = String::with_capacity(2 + topic.len() * 2 + 4);
        name.push_str("t-");
        for b in topic.as_bytes() {
            name.push_str(&format!("{b:02x}"));
        }
        name.push('.');
        name.push_str(EXTENSION);
        self.dir.join(name)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path, Durability) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let dir = self.dir.clone();
        let durability = self.durability;
        tokio::task::spawn_blocking(move || f(&dir, durability))
            .await
            .map_err(Error::Task)?
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn checksum(revision: Revision, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(revision.to_string().as_bytes());
    h.update(b" ");
    h.update(data);
    h.finalize()
}

pub(crate) fn encode(record: &Record) -> Vec<u8> {
    let header = format!(
        "{MAGIC} {:08x} {} {}\n",
        checksum(record.revision, &record.data),
        record.revision,
        record.data.len()
    );
    let mut out = Vec::with_capacity(header.len() + record.data.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&record.data);
    out
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Record, String> {
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line (truncated?)")?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| "header is not UTF-8")?;
    let mut fields = header.split(' ');
    if fields.next() != Some(MAGIC) {
        return Err("not a state-sync record (bad magic)".into());
    }
    let crc = fields
        .next()
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .ok_or("bad checksum field")?;
    let revision: Revision = fields
        .next()
        .ok_or("missing revision")?
        .parse()
        .map_err(|e| format!("bad revision: {e}"))?;
    let len: usize = fields
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or("bad length field")?;
    let data = &bytes[newline + 1..];
    if data.len() != len {
        return Err(format!(
            "length mismatch: header says {len} bytes, found {} (truncated?)",
            data.len()
        ));
    }
    if checksum(revision, data) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(Record::new(revision, Bytes::copy_from_slice(data)))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// The revision a damaged record's header names, if it can be read.
fn claimed_revision(bytes: &[u8]) -> Option<Revision> {
    let end = bytes.iter().take(64).position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..end]).ok()?;
    header.split(' ').nth(2)?.parse().ok()
}

fn quarantine(path: &Path, reason: String, claimed_revision: Option<Revision>) -> Error {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let quarantined = with_suffix(path, &format!(".corrupt-{millis}"));
    if let Err(e) = fs::rename(path, &quarantined) {
        return io_error(path)(e);
    }
    let backup = with_suffix(path, ".bak");
    let backup = backup.exists().then_some(backup);
    tracing::error!(path = %path.display(), quarantined = %quarantined.display(), %reason, "corrupt record quarantined");
    Error::Corrupt {
        path: path.to_owned(),
        quarantined,
        reason,
        backup,
        claimed_revision,
    }
}

/// Whether a quarantined copy of `path` (or of its backup) exists.
fn has_quarantined_copy(path: &Path) -> Result<Option<PathBuf>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(None);
    };
    let prefix = format!("{name}.");
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if let Some(rest) = file.strip_prefix(&prefix)
            && (rest.starts_with("corrupt-") || rest.starts_with("bak.corrupt-"))
        {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

fn decode_or_quarantine(path: &Path, bytes: &[u8]) -> Result<Record> {
    decode(bytes).map_err(|reason| quarantine(path, reason, claimed_revision(bytes)))
}

fn load_file(path: &Path) -> Result<Option<Record>> {
    if let Some(bytes) = read_optional(path)? {
        return decode_or_quarantine(path, &bytes).map(Some);
    }
    // A crash between the two renames of a store, or a quarantined newest
    // copy, leaves only the backup.
    let backup = with_suffix(path, ".bak");
    if let Some(bytes) = read_optional(&backup)? {
        return decode_or_quarantine(&backup, &bytes).map(Some);
    }
    // Nothing left but quarantined copies: still damaged, never silently
    // a new topic, until an operator restores or removes them.
    match has_quarantined_copy(path)? {
        Some(quarantined) => Err(Error::Corrupt {
            path: path.to_owned(),
            quarantined,
            reason: "only quarantined copies remain".into(),
            backup: None,
            claimed_revision: None,
        }),
        None => Ok(None),
    }
}

/// Syncs the directory after a change that already took effect: `load` sees
/// it whatever the outcome, so a failure is logged, never reported as a
/// failed store (the caller would then treat a stored record as not
/// committed).
fn sync_dir_after_commit(dir: &Path, sync_dir: fn(&Path) -> io::Result<()>) {
    if let Err(error) = sync_dir(dir) {
        tracing::warn!(
            dir = %dir.display(),
            %error,
            "the change is stored, but syncing its directory failed: it survives a crash of the process, maybe not a power loss"
        );
    }
}

fn store_file(dir: &Path, path: &Path, record: &Record, durability: Durability) -> Result<()> {
    store_file_with(dir, path, record, durability, platform::sync_dir)
}

fn store_file_with(
    dir: &Path,
    path: &Path,
    record: &Record,
    durability: Durability,
    sync_dir: fn(&Path) -> io::Result<()>,
) -> Result<()> {
    let durable = durability == Durability::Fsync;
    let tmp = with_suffix(path, ".tmp");
    let mut file = platform::private_file_options()
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(&encode(record)).map_err(io_error(&tmp))?;
    if durable {
        file.sync_all().map_err(io_error(&tmp))?;
    }
    drop(file);
    let backup = with_suffix(path, ".bak");
    match platform::replace(path, &backup, durable) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(path)(e)),
    }
    // The commit point: from here on `load` returns the new record.
    platform::replace(&tmp, path, durable).map_err(io_error(path))?;
    if durable {
        sync_dir_after_commit(dir, sync_dir);
    }
    Ok(())
}

fn remove_file(dir: &Path, path: &Path, durability: Durability) -> Result<()> {
    // The current file first: a crash in between leaves the backup, which
    // `load` would return, so remove that too before reporting success.
    for file in [path.to_owned(), with_suffix(path, ".bak")] {
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&file)(e)),
        }
    }
    if durability == Durability::Fsync {
        sync_dir_after_commit(dir, platform::sync_dir);
    }
    Ok(())
}

/// The topic a file of the store belongs to: its current copy, backup, or
/// a quarantined copy of either.
fn decode_topic(name: &str) -> Option<Topic> {
    let name = match name.find(".ssr") {
        Some(end) => &name[..end],
        None => return None,
    };
    let hex = name.strip_prefix("t-")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    Topic::new(String::from_utf8(bytes?).ok()?).ok()
}

impl Storage for FileStorage {
    async fn load(&self, topic: &Topic) -> Result<Option<Record>> {
        let path = self.path_of(topic);
        self.blocking(move |_, _| load_file(&path)).await
    }

    async fn store(&self, topic: &Topic, record: &Record) -> Result<()> {
        let path = self.path_of(topic);
        let record = record.clone();
        self.blocking(move |dir, durability| store_file(dir, &path, &record, durability))
            .await
    }

    async fn remove(&self, topic: &Topic) -> Result<()> {
        let path = self.path_of(topic);
        self.blocking(move |dir, durability| remove_file(dir, &path, durability))
            .await
    }

    async fn topics(&self) -> Result<Vec<Topic>> {
        self.blocking(|dir, _| {
            // A backup alone counts (a crash mid-store can leave only it),
            // and so does a quarantined copy (the topic is damaged, not gone).
            let mut topics = std::collections::BTreeSet::new();
            for entry in fs::read_dir(dir).map_err(io_error(dir))? {
                let name = entry.map_err(io_error(dir))?.file_name();
                if let Some(topic) = name.to_str().and_then(decode_topic) {
                    topics.insert(topic);
                }
            }
            Ok(topics.into_iter().collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_detect_damage() {
        let record = Record::new(Revision::new(42), &b"{\"a\":1}"[..]);
        let bytes = encode(&record);
        assert_eq!(decode(&bytes).unwrap(), record);
        assert!(
            decode(&bytes[..bytes.len() - 1])
                .unwrap_err()
                .contains("length")
        );
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(decode(&flipped).unwrap_err().contains("checksum"));
        assert!(decode(b"").is_err());
        assert!(decode(&[0u8; 64]).is_err());
    }

    #[test]
    fn a_failed_directory_sync_after_the_rename_does_not_fail_a_stored_record() {
        // What Windows did with `File::open` on a directory, and what any
        // platform may do: the record is already in place, so the store
        // must succeed (or the hub would report a stored write as lost).
        fn refused(_: &Path) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        }
        let dir = tempfile::tempdir().unwrap();
        let storage = FileStorage::open(dir.path()).unwrap();
        let topic = Topic::new("settings").unwrap();
        let path = storage.path_of(&topic);
        for revision in 1..=2 {
            let record = Record::new(Revision::new(revision), &b"{}"[..]);
            store_file_with(dir.path(), &path, &record, Durability::Fsync, refused).unwrap();
            assert_eq!(load_file(&path).unwrap(), Some(record));
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_directory_and_record_files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("a/store");
        let storage = FileStorage::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&parent.path().join("a")), 0o700);
        let topic = Topic::new("settings").unwrap();
        let path = storage.path_of(&topic);
        for revision in 1..=2 {
            let record = Record::new(Revision::new(revision), &b"{}"[..]);
            store_file(&dir, &path, &record, Durability::Fsync).unwrap();
        }
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&with_suffix(&path, ".bak")), 0o600);
    }

    #[test]
    fn topic_file_names_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FileStorage::open(dir.path()).unwrap();
        for name in ["settings", "cart:user:42", "é / ..", " x"] {
            let topic = Topic::new(name).unwrap();
            let path = storage.path_of(&topic);
            let file = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(decode_topic(file), Some(topic));
        }
    }
}
