//! [`RemoteTopic`]: one topic of a [`Client`], typed — an engine's
//! subscriber and provider (implemented beside the connection, in
//! `client.rs`), and a [`SharedTopic`] like the in-process `HubTopic`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use state_sync::{BoxError, Revision, Topic};
use state_sync_hub::{Error as HubError, SharedTopic, Snapshot, TopicValue};

use crate::client::Client;
use crate::error::Error;
use crate::protocol::ErrorCode;

/// Compare-and-set attempts of [`SharedTopic::update`] before it gives up
/// with the last conflict.
const UPDATE_ATTEMPTS: u32 = 64;

/// One topic of a [`Client`], typed: the [`Subscriber`](state_sync::Subscriber) and [`Provider`](state_sync::Provider) of
/// an engine replicating it. Fetches are conditional, and answered without
/// a round trip when the newest invalidation carried the snapshot (see
/// [`ClientOptions::inline_snapshots`](crate::ClientOptions::inline_snapshots)).
pub struct RemoteTopic<T> {
    pub(crate) client: Client,
    pub(crate) topic: Topic,
    _value: PhantomData<fn() -> T>,
}

impl<T> Clone for RemoteTopic<T> {
    fn clone(&self) -> Self {
        RemoteTopic {
            client: self.client.clone(),
            topic: self.topic.clone(),
            _value: PhantomData,
        }
    }
}

impl<T> RemoteTopic<T> {
    pub(crate) fn new(client: Client, topic: Topic) -> Self {
        RemoteTopic {
            client,
            topic,
            _value: PhantomData,
        }
    }

    /// The topic.
    #[must_use]
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The client.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl<T> fmt::Debug for RemoteTopic<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteTopic")
            .field("topic", &self.topic)
            .finish()
    }
}

impl<T: DeserializeOwned + Send + Sync + 'static> state_sync::Source for RemoteTopic<T> {
    fn topic(&self) -> &Topic {
        &self.topic
    }
}

impl<T: TopicValue> SharedTopic<T> for RemoteTopic<T> {
    fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Asks the hub.
    ///
    /// # Errors
    ///
    /// [`HubError::Unreachable`] when the hub cannot be reached;
    /// [`HubError::InvalidData`] when its data does not decode as `T`; the
    /// hub's refusals as their [`HubError`] variants.
    async fn get(&self) -> Result<Snapshot<T>, HubError> {
        let (revision, json) = self
            .client
            .get_json(self.topic.as_str())
            .await
            .map_err(|e| self.hub_error(e, None))?;
        let value = crate::protocol::from_json(&json).map_err(|e| HubError::InvalidData {
            topic: self.topic.clone(),
            source: Arc::new(e),
        })?;
        Ok(Snapshot::new(revision, value, json))
    }

    async fn replace(&self, value: T) -> Result<Revision, HubError> {
        self.write(&value, None).await
    }

    async fn compare_and_set(&self, expected: Revision, value: T) -> Result<Revision, HubError> {
        self.write(&value, Some(expected)).await
    }

    /// Reads, computes, and compare-and-sets; on a conflict reads the newer
    /// value and runs `f` again, up to 64 times, with a short jittered pause
    /// after the first few.
    async fn update<F>(&self, mut f: F) -> Result<Revision, HubError>
    where
        F: FnMut(&T) -> T + Send + 'static,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.get().await?;
            let next = f(current.value());
            match self.compare_and_set(current.revision(), next).await {
                Err(HubError::Conflict { .. }) if attempt < UPDATE_ATTEMPTS => {
                    if attempt > 3 {
                        let pause = fastrand::u64(1..=u64::from(attempt.min(20)));
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
                outcome => return outcome,
            }
        }
    }
}

impl<T: TopicValue> RemoteTopic<T> {
    async fn write(&self, value: &T, expected: Option<Revision>) -> Result<Revision, HubError> {
        let json = serde_json::to_string(value).map_err(|e| HubError::Encode {
            topic: self.topic.clone(),
            source: Arc::new(e),
        })?;
        self.client
            .set_json(self.topic.as_str(), json, expected)
            .await
            .map_err(|e| self.hub_error(e, expected))
    }

    /// The hub's error for what the client reported, with the same variant
    /// an in-process hub would give where there is one.
    fn hub_error(&self, error: Error, expected: Option<Revision>) -> HubError {
        let topic = self.topic.clone();
        match error {
            Error::Conflict { current } => HubError::Conflict {
                topic,
                expected: expected.unwrap_or(Revision::ZERO),
                current,
            },
            Error::Server { code, message } => match code {
                ErrorCode::UnknownTopic => HubError::UnknownTopic { topic },
                ErrorCode::Damaged => HubError::Damaged {
                    topic,
                    reason: message,
                },
                ErrorCode::InvalidData => HubError::InvalidData {
                    topic,
                    source: Arc::new(<serde_json::Error as serde::de::Error>::custom(message)),
                },
                ErrorCode::ShuttingDown | ErrorCode::Internal => HubError::Unreachable {
                    topic,
                    source: Arc::new(BoxError::from(message)),
                },
                other => HubError::Refused {
                    topic,
                    code: other.as_str().to_owned(),
                    message,
                },
            },
            other => HubError::Unreachable {
                topic,
                source: Arc::new(BoxError::from(other)),
            },
        }
    }
}
