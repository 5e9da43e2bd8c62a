//! An object-safe view of [`Storage`], so a [`Hub`](crate::Hub) is not
//! generic over its backend.

use state_sync::Topic;
use state_sync_storage::{Record, Result, Storage};

use crate::topic::BoxFuture;

pub(crate) trait DynStorage: Send + Sync + 'static {
    fn load<'a>(&'a self, topic: &'a Topic) -> BoxFuture<'a, Result<Option<Record>>>;
    fn store<'a>(&'a self, topic: &'a Topic, record: &'a Record) -> BoxFuture<'a, Result<()>>;
    fn topics(&self) -> BoxFuture<'_, Result<Vec<Topic>>>;
}

impl<S: Storage> DynStorage for S {
    fn load<'a>(&'a self, topic: &'a Topic) -> BoxFuture<'a, Result<Option<Record>>> {
        Box::pin(Storage::load(self, topic))
    }

    fn store<'a>(&'a self, topic: &'a Topic, record: &'a Record) -> BoxFuture<'a, Result<()>> {
        Box::pin(Storage::store(self, topic, record))
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<Topic>>> {
        Box::pin(Storage::topics(self))
    }
}
