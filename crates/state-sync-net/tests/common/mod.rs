//! Helpers shared by the network tests: raw protocol connections, served
//! hubs, replicas.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use state_sync::SyncHandle;
use state_sync::testkit::{Recorder, WithinLimit};
use state_sync_hub::{Hub, HubTopic};
use state_sync_net::{AccessConfig, Client, ClientOptions, Endpoint, Server, ServerConfig};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

pub type Raw = Framed<UnixStream, LengthDelimitedCodec>;

pub async fn raw(path: &Path) -> Raw {
    Framed::new(
        UnixStream::connect(path).await.unwrap(),
        LengthDelimitedCodec::new(),
    )
}

pub async fn send(conn: &mut Raw, message: &str) {
    conn.send(Bytes::from(message.to_owned())).await.unwrap();
}

pub async fn recv(conn: &mut Raw) -> Value {
    let frame = tokio::time::timeout(Duration::from_secs(10), conn.next())
        .await
        .expect("no answer")
        .expect("connection closed")
        .unwrap();
    serde_json::from_slice(&frame).unwrap()
}

/// Sends `message`, expects an error with `code`.
pub async fn expect_error(conn: &mut Raw, message: &str, code: &str) {
    send(conn, message).await;
    let answer = recv(conn).await;
    assert_eq!(answer["type"], "error", "{message} → {answer}");
    assert_eq!(answer["code"], code, "{message} → {answer}");
}

pub async fn closed(conn: &mut Raw) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(10), conn.next()).await,
        Ok(None | Some(Err(_)))
    )
}

pub async fn hello(conn: &mut Raw, token: Option<&str>) -> Value {
    let hello = json!({"type": "hello", "version": 1, "clientId": "raw", "token": token});
    send(conn, &hello.to_string()).await;
    recv(conn).await
}

pub fn options(name: &str) -> ClientOptions {
    ClientOptions::new(name).reconnect(
        state_sync::RetryPolicy::default()
            .max_attempts(u32::MAX)
            .initial_delay(Duration::from_millis(20))
            .max_delay(Duration::from_millis(200)),
    )
}

pub async fn replica<T>(client: &Client, topic: &str) -> (SyncHandle, Recorder<T>)
where
    T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let remote = client.topic::<T>(topic).unwrap();
    let recorder = Recorder::with_data();
    let handle = SyncHandle::builder(remote.clone(), recorder.clone())
        .retry(
            state_sync::RetryPolicy::default()
                .max_attempts(50)
                .initial_delay(Duration::from_millis(20)),
        )
        .build();
    handle.start().await.unwrap();
    (handle, recorder)
}

pub async fn served(
    hub: Hub,
    config: ServerConfig,
    access: AccessConfig,
) -> (Server, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::with_config(hub, config, access);
    let path = server
        .listen_unix(dir.path().join("hub.sock"))
        .await
        .unwrap();
    (server, path, dir)
}

/// A server with defaults and open access for a hub with one `u64` topic,
/// `doc`.
pub async fn served_doc() -> (HubTopic<u64>, Server, PathBuf, tempfile::TempDir) {
    let hub = Hub::in_memory();
    let doc = hub.topic("doc", || 0u64).await.unwrap();
    let (server, path, dir) = served(hub, ServerConfig::default(), AccessConfig::open()).await;
    (doc, server, path, dir)
}

/// `count` clients on `path`, each with one replica of `doc`.
pub async fn replicas_on(
    path: &Path,
    count: usize,
    options_of: impl Fn(usize) -> ClientOptions,
) -> Vec<(Client, SyncHandle, Recorder<u64>)> {
    let mut replicas = Vec::with_capacity(count);
    for i in 0..count {
        let client = Client::connect(Endpoint::Unix(path.to_owned()), options_of(i));
        client.wait_connected().within_limit().await;
        let (handle, recorder) = replica(&client, "doc").await;
        replicas.push((client, handle, recorder));
    }
    replicas
}
