//! [`MemoryStorage`]: records in memory, for tests and ephemeral hubs.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use state_sync::Topic;

use crate::error::Result;
use crate::storage::{Record, Storage};

/// Records in memory; lost when the last clone is dropped. Clones share
/// the records.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    records: Arc<Mutex<HashMap<Topic, Record>>>,
}

impl MemoryStorage {
    /// Empty storage.
    #[must_use]
    pub fn new() -> Self {
        MemoryStorage::default()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<Topic, Record>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Storage for MemoryStorage {
    fn load(&self, topic: &Topic) -> impl Future<Output = Result<Option<Record>>> + Send {
        std::future::ready(Ok(self.records().get(topic).cloned()))
    }

    fn store(&self, topic: &Topic, record: &Record) -> impl Future<Output = Result<()>> + Send {
        self.records().insert(topic.clone(), record.clone());
        std::future::ready(Ok(()))
    }

    fn remove(&self, topic: &Topic) -> impl Future<Output = Result<()>> + Send {
        self.records().remove(topic);
        std::future::ready(Ok(()))
    }

    fn topics(&self) -> impl Future<Output = Result<Vec<Topic>>> + Send {
        std::future::ready(Ok(self.records().keys().cloned().collect()))
    }
}
