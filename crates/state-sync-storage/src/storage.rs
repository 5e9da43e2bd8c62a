//! The [`Storage`] trait.

use std::future::Future;

use bytes::Bytes;
use state_sync::{Revision, Topic};

use crate::error::Result;

/// One topic's committed state: its revision and its data as JSON bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The revision of `data`.
    pub revision: Revision,
    /// The data, JSON-encoded once and shared.
    pub data: Bytes,
}

impl Record {
    /// A record.
    #[must_use]
    pub fn new(revision: Revision, data: impl Into<Bytes>) -> Self {
        Record {
            revision,
            data: data.into(),
        }
    }
}

/// Where committed records live.
///
/// Backends must pass the [conformance suite](crate::conformance): a stored
/// record is returned by `load` (also after reopening, for durable
/// backends), the latest `store` wins, and topics are independent.
pub trait Storage: Send + Sync + 'static {
    /// The record of `topic`, if one was stored.
    ///
    /// # Errors
    ///
    /// I/O failures; [`Error::Corrupt`](crate::Error::Corrupt) when the
    /// stored bytes fail their checksum.
    fn load(&self, topic: &Topic) -> impl Future<Output = Result<Option<Record>>> + Send;

    /// Stores `record` as the state of `topic`, replacing the previous one.
    /// When the future resolves the record is as durable as the backend's
    /// durability mode promises.
    ///
    /// # Errors
    ///
    /// I/O failures; the previous record is then still intact.
    fn store(&self, topic: &Topic, record: &Record) -> impl Future<Output = Result<()>> + Send;

    /// Every topic with a stored record.
    ///
    /// # Errors
    ///
    /// I/O failures.
    fn topics(&self) -> impl Future<Output = Result<Vec<Topic>>> + Send;
}
