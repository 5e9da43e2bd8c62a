//! The file store's record format, exposed for the fuzz targets (feature
//! `fuzzing`). Not a stable API.

use crate::storage::Record;

/// Encodes a record as [`FileStorage`](crate::FileStorage) writes it.
#[must_use]
pub fn encode_record(record: &Record) -> Vec<u8> {
    crate::file::encode(record)
}

/// Decodes a record file's bytes.
///
/// # Errors
///
/// What is wrong with them.
pub fn decode_record(bytes: &[u8]) -> Result<Record, String> {
    crate::file::decode(bytes)
}
