//! [`SharedTopic`]: one way to read and write a topic, whether its hub is in
//! this process ([`HubTopic`]) or in another one (`state_sync_net::RemoteTopic`).

use std::future::Future;

use state_sync::{Revision, Topic};

use crate::error::Result;
use crate::topic::{HubTopic, Snapshot, TopicValue};

/// Reading and writing one topic of a hub, wherever the hub runs.
///
/// Application code written against this trait works unchanged with an
/// in-process [`HubTopic`] and a `RemoteTopic` of `state-sync-net`. Every
/// write returns the committed revision; a compare-and-set that loses
/// returns [`Error::Conflict`](crate::Error::Conflict) with the current
/// revision.
///
/// ```
/// use state_sync_hub::{Hub, Result, SharedTopic};
///
/// /// Works on any hub, in this process or another.
/// async fn toggle(settings: &impl SharedTopic<bool>) -> Result<bool> {
///     settings.update(|on| !on).await?;
///     Ok(*settings.get().await?.value())
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<()> {
/// let hub = Hub::in_memory();
/// let dark = hub.topic("dark", || false).await?;
/// assert!(toggle(&dark).await?);
/// # Ok(())
/// # }
/// ```
///
/// # Cancel safety
///
/// A write whose future is dropped before it resolves may or may not have
/// been committed: on a [`HubTopic`] a write already queued is committed
/// anyway; on a remote topic the request may have reached the hub. Read
/// the topic to know.
pub trait SharedTopic<T: TopicValue>: Send + Sync {
    /// The topic.
    fn topic(&self) -> &Topic;

    /// The current revision and value. A [`HubTopic`] answers from memory;
    /// a remote topic asks its hub.
    fn get(&self) -> impl Future<Output = Result<Snapshot<T>>> + Send;

    /// Replaces the value; resolves with the new revision.
    fn replace(&self, value: T) -> impl Future<Output = Result<Revision>> + Send;

    /// Replaces the value only if the topic is still at `expected`, else
    /// [`Error::Conflict`](crate::Error::Conflict) with the current revision.
    fn compare_and_set(
        &self,
        expected: Revision,
        value: T,
    ) -> impl Future<Output = Result<Revision>> + Send;

    /// Computes the new value from the current one, atomically: when
    /// another writer commits first, `f` runs again on the newer value.
    /// Keep `f` free of side effects.
    fn update<F>(&self, f: F) -> impl Future<Output = Result<Revision>> + Send
    where
        F: FnMut(&T) -> T + Send + 'static;

    /// [`update`](Self::update) in place: `f` changes a copy of the current
    /// value.
    fn update_in_place<F>(&self, mut f: F) -> impl Future<Output = Result<Revision>> + Send
    where
        F: FnMut(&mut T) + Send + 'static,
    {
        self.update(move |current| {
            let mut next = current.clone();
            f(&mut next);
            next
        })
    }
}

impl<T: TopicValue> SharedTopic<T> for HubTopic<T> {
    fn topic(&self) -> &Topic {
        HubTopic::topic(self)
    }

    async fn get(&self) -> Result<Snapshot<T>> {
        Ok(HubTopic::get(self))
    }

    async fn replace(&self, value: T) -> Result<Revision> {
        HubTopic::replace(self, value).await
    }

    async fn compare_and_set(&self, expected: Revision, value: T) -> Result<Revision> {
        HubTopic::compare_and_set(self, expected, value).await
    }

    async fn update<F>(&self, f: F) -> Result<Revision>
    where
        F: FnMut(&T) -> T + Send + 'static,
    {
        HubTopic::update(self, f).await
    }
}
