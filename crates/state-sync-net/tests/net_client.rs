//! The client's reconnect state machine and subscriptions, against real
//! servers and against scripted hubs on real Unix sockets.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use state_sync::testkit::{Recorder, WithinLimit};
use state_sync::{RetryPolicy, SyncHandle};
use state_sync_hub::{Hub, SharedTopic};
use state_sync_net::{
    AccessConfig, Client, ClientOptions, ConnectionStatus, Endpoint, Server, ServerConfig,
};
use tokio::net::UnixListener;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

fn quick(name: &str, attempts: u32) -> ClientOptions {
    ClientOptions::new(name).reconnect(
        RetryPolicy::default()
            .max_attempts(attempts)
            .initial_delay(Duration::from_millis(20))
            .max_delay(Duration::from_secs(5)),
    )
}

#[tokio::test]
async fn a_finite_reconnect_policy_gives_up_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("no-hub.sock");
    let client = Client::connect(Endpoint::Unix(nowhere), quick("c", 3));
    let status = client.wait_connected().within_limit().await;
    assert!(
        matches!(&status, ConnectionStatus::GaveUp(why) if why.contains("3 reconnect attempts")),
        "{status:?}"
    );
    assert_eq!(client.status(), status, "and stays so");
}

/// A scripted hub: answers `hello` with `welcome`, then runs `script` on
/// each connection. Counts connections.
fn scripted_hub<F, Fut>(path: &std::path::Path, script: F) -> Arc<AtomicUsize>
where
    F: Fn(usize, Framed<tokio::net::UnixStream, LengthDelimitedCodec>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = UnixListener::bind(path).unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let mut conn = Framed::new(stream, LengthDelimitedCodec::new());
            let Some(Ok(_hello)) = conn.next().await else {
                continue;
            };
            let welcome = json!({"type": "welcome", "version": 1, "serverId": "scripted"});
            if conn
                .send(bytes::Bytes::from(welcome.to_string()))
                .await
                .is_err()
            {
                continue;
            }
            tokio::spawn(script(n, conn));
        }
    });
    connections
}

#[tokio::test]
async fn a_hub_that_drops_every_connection_after_the_handshake_is_not_hammered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flaky.sock");
    let connections = scripted_hub(&path, |_, conn| async move { drop(conn) });
    let _client = Client::connect(Endpoint::Unix(path), quick("c", u32::MAX));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Backing off from 20 ms: about 20+40+80+160+320+640 ms, so 6 or 7
    // connections. Resetting at every welcome would make one every 20 ms.
    let made = connections.load(Ordering::SeqCst);
    assert!(made <= 12, "{made} connections in 1.2 s");
    assert!(made >= 2, "it does reconnect: {made}");
}

#[tokio::test]
async fn handles_joining_a_failing_subscribe_fail_too_and_a_retry_subscribes() {
    let hub = Hub::in_memory();
    let config = ServerConfig {
        create_topics: false,
        ..ServerConfig::default()
    };
    let (server, path, _dir) = served(hub.clone(), config, AccessConfig::open()).await;
    let client = Client::connect(Endpoint::Unix(path), quick("c", u32::MAX));
    client.wait_connected().within_limit().await;
    let handle = |client: &Client| {
        let remote = client.topic::<Value>("late").unwrap();
        let recorder = Recorder::with_data();
        let handle = SyncHandle::builder(remote.clone(), recorder.clone())
            .retry(RetryPolicy::none())
            .build();
        (handle, recorder)
    };
    let (a, _) = handle(&client);
    let (b, b_seen) = handle(&client);
    // The topic does not exist yet: both starts fail, neither claims Live.
    let (first, second) = tokio::join!(a.start(), b.start());
    assert!(first.is_err() && second.is_err(), "{first:?} {second:?}");

    // Once it exists, a retried start subscribes for real.
    let late = hub.json_topic("late").await.unwrap();
    b.start().within_limit().await.unwrap();
    let revision = late.replace(json!("hello")).await.unwrap();
    b.wait_for_revision(revision).within_limit().await.unwrap();
    assert_eq!(b_seen.last_data(), Some(json!("hello")));
    server.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_subscribe_lets_the_next_handle_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scripted.sock");
    let subscribes = Arc::new(AtomicUsize::new(0));
    let seen = subscribes.clone();
    scripted_hub(&path, move |_, mut conn| {
        let seen = seen.clone();
        async move {
            while let Some(Ok(frame)) = conn.next().await {
                let request: Value = serde_json::from_slice(&frame).unwrap();
                let id = request["id"].clone();
                let answer = match request["type"].as_str().unwrap() {
                    // The first subscribe is never answered.
                    "subscribe" if seen.fetch_add(1, Ordering::SeqCst) == 0 => continue,
                    "subscribe" => {
                        json!({"type": "subscribed", "id": id, "topic": "t", "revision": "1"})
                    }
                    "get" => {
                        json!({"type": "snapshot", "id": id, "topic": "t", "revision": "1", "data": 7})
                    }
                    "ping" => json!({"type": "pong", "id": id}),
                    _ => continue,
                };
                if conn
                    .send(bytes::Bytes::from(answer.to_string()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    let client = Client::connect(Endpoint::Unix(path), quick("c", u32::MAX));
    client.wait_connected().within_limit().await;
    let remote = client.topic::<u64>("t").unwrap();
    let start =
        |recorder: &Recorder<u64>| SyncHandle::builder(remote.clone(), recorder.clone()).build();
    let first = start(&Recorder::with_data());
    let cancelled = tokio::time::timeout(Duration::from_millis(200), first.start()).await;
    assert!(cancelled.is_err(), "the unanswered subscribe hangs");
    drop(first);

    let recorder = Recorder::with_data();
    let second = start(&recorder);
    second.start().within_limit().await.unwrap();
    assert_eq!(recorder.last_data(), Some(7));
    assert_eq!(
        subscribes.load(Ordering::SeqCst),
        2,
        "the second handle subscribed itself instead of trusting the cancelled one"
    );
}

#[tokio::test]
async fn a_hub_that_stops_reading_and_answering_is_noticed_while_a_write_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deaf.sock");
    // Says welcome, then holds the connection without reading or writing.
    let connections = scripted_hub(&path, |_, conn| async move {
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(conn);
    });
    let mut options = quick("c", u32::MAX);
    options.ping_interval = Duration::from_millis(100);
    options.request_timeout = Duration::from_secs(600);
    let client = Client::connect(Endpoint::Unix(path), options);
    client.wait_connected().within_limit().await;
    // Enough to fill the socket buffers: the writer blocks in a send.
    let big = format!("\"{}\"", "x".repeat(512 * 1024));
    for _ in 0..16 {
        let client = client.clone();
        let big = big.clone();
        tokio::spawn(async move { client.set_json("t", big, None).await });
    }
    // Noticed: the client gave the connection up and made a new one.
    async {
        while connections.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    .within_limit()
    .await;
}

/// Application code that does not care where the hub is.
async fn add_one(counter: &impl SharedTopic<u64>) -> Result<u64, state_sync_hub::Error> {
    counter.update_in_place(|n| *n += 1).await?;
    Ok(*counter.get().await?.value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_topic_reads_and_writes_like_a_hub_topic() {
    let (doc, server, path, _dir) = served_doc().await;
    // Short requests: the last check waits for a hub that is gone.
    let client = Client::connect(
        Endpoint::Unix(path),
        options("shared-topic").request_timeout(Duration::from_secs(2)),
    );
    let remote = client.topic::<u64>("doc").unwrap();

    // The same function on both.
    assert_eq!(add_one(&doc).within_limit().await.unwrap(), 1);
    assert_eq!(add_one(&remote).within_limit().await.unwrap(), 2);

    let at = SharedTopic::get(&remote).await.unwrap().revision();
    assert_eq!(at, doc.revision());
    let won = SharedTopic::compare_and_set(&remote, at, 10).await.unwrap();
    let lost = SharedTopic::compare_and_set(&remote, at, 11)
        .await
        .unwrap_err();
    assert!(
        matches!(lost, state_sync_hub::Error::Conflict { current, expected, .. } if current == won && expected == at),
        "{lost}"
    );
    let lost_locally = SharedTopic::compare_and_set(&doc, at, 11)
        .await
        .unwrap_err();
    assert_eq!(lost.code(), lost_locally.code());
    assert_eq!(
        SharedTopic::replace(&remote, 20).await.unwrap(),
        doc.revision()
    );
    assert_eq!(*doc.get().value(), 20);

    // Concurrent updates from both sides: every increment lands.
    let local = tokio::spawn({
        let doc = doc.clone();
        async move {
            for _ in 0..50 {
                SharedTopic::update(&doc, |n| n + 1).await.unwrap();
            }
        }
    });
    for _ in 0..50 {
        remote.update(|n| n + 1).await.unwrap();
    }
    local.await.unwrap();
    assert_eq!(*doc.get().value(), 120);

    let missing = client.topic::<u64>("missing").unwrap();
    let error = SharedTopic::get(&missing).await.unwrap_err();
    assert_eq!(error.code(), "unknown_topic");
    server.shutdown().await;
    let gone = SharedTopic::get(&remote).await.unwrap_err();
    assert_eq!(gone.code(), "unreachable", "{gone}");
}

#[test]
fn the_default_endpoint_is_the_one_statesync_serve_listens_on() {
    let default = Endpoint::default();
    assert_eq!(default, Endpoint::in_data_dir(Endpoint::default_data_dir()));
    assert!(Endpoint::default_data_dir().ends_with("state-sync"));
    if cfg!(unix) {
        assert_eq!(
            Endpoint::in_data_dir("/data/a"),
            Endpoint::Unix("/data/a/hub.sock".into())
        );
    }
    assert_ne!(
        Endpoint::in_data_dir("/data/a"),
        Endpoint::in_data_dir("/data/b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_within_waits_for_a_hub_and_a_topic_that_come_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.sock");
    let client = Client::connect(
        Endpoint::Unix(path.clone()),
        options("early").request_timeout(Duration::from_millis(500)),
    );
    let (applier, seen) = tokio::sync::watch::channel(0u64);
    let handle = SyncHandle::builder(client.topic::<u64>("doc").unwrap(), applier).build();
    let starting = tokio::spawn(async move {
        let started = handle.start_within(Duration::from_secs(30)).await;
        started.map(|()| handle)
    });

    // No hub yet; then a hub without the topic; then the topic.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hub = Hub::in_memory();
    let server = Server::new(hub.clone());
    server.listen_unix(&path).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!starting.is_finished(), "started before the topic existed");
    let doc = hub.topic("doc", || 7u64).await.unwrap();

    let handle = starting.within_limit().await.unwrap().unwrap();
    assert_eq!(handle.local_revision(), doc.revision());
    assert_eq!(*seen.borrow(), 7);

    // A limit that passes gives the last failure.
    let (applier, _) = tokio::sync::watch::channel(0u64);
    let never = SyncHandle::builder(client.topic::<u64>("never").unwrap(), applier).build();
    let error = never
        .start_within(Duration::from_millis(300))
        .within_limit()
        .await
        .unwrap_err();
    assert_eq!(error.phase(), state_sync::Phase::Subscribe, "{error}");
    server.shutdown().await;
}

/// A document over the inline limit: while one field changes per write,
/// replicas that ask for deltas get the change and the others whole
/// snapshots or fetches; a change of the whole document goes whole.
/// All hold the same data throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_documents_travel_as_deltas_and_every_replica_converges_on_the_same_data() {
    let hub = Hub::in_memory();
    let payload = "x".repeat(40_000);
    let document = |seq: usize, spread: bool| {
        let mut payload = payload.clone();
        if spread {
            // All of it changes, alternately.
            payload = ["y", "z"][seq % 2].repeat(40_000);
        }
        json!({"payload": payload, "seq": seq, "tail": "é"})
    };
    let doc = hub.topic("big", || document(0, false)).await.unwrap();
    let (server, path, _dir) = served(hub, ServerConfig::default(), AccessConfig::open()).await;
    let endpoint = Endpoint::Unix(path);
    let with_deltas = Client::connect(endpoint.clone(), options("deltas"));
    let whole = Client::connect(endpoint.clone(), options("whole").delta_snapshots(false));
    let pulling = Client::connect(endpoint, options("pull").inline_snapshots(false));
    let mut replicas = Vec::new();
    for client in [&with_deltas, &whole, &pulling] {
        client.wait_connected().within_limit().await;
        replicas.push(replica::<Value>(client, "big").await);
    }

    let mut seq = 0;
    let mut write = async |spread: bool| {
        let before = server.stats();
        let mut last = state_sync::Revision::ZERO;
        for _ in 0..30 {
            seq += 1;
            last = doc.replace(document(seq, spread)).await.unwrap();
            // Paced, so each revision is announced on its own.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (handle, recorder) in &replicas {
            handle.wait_for_revision(last).within_limit().await.unwrap();
            assert_eq!(recorder.last_data(), Some(document(seq, spread)));
            assert!(recorder.is_strictly_increasing());
        }
        let after = server.stats();
        (
            after.snapshots_as_deltas - before.snapshots_as_deltas,
            (after.bytes_sent - before.bytes_sent) / 30,
            after.deltas_computed - before.deltas_computed,
        )
    };
    let (deltas, per_write, computed) = write(false).await;
    // The first push after subscribing starts from what the replica
    // fetched; then each write is one delta, to the one replica that asked.
    assert!((25..=30).contains(&deltas), "{deltas} deltas");
    assert_eq!(server.stats().deltas_too_large, 0);
    assert!(computed >= deltas, "{computed} computed");
    // The pulling replica fetches 40 KB per write; the delta costs ~200 B.
    assert!(per_write < 2 * 41_000, "{per_write} bytes per write");
    // The whole document changes: no delta pays, and nothing is lost.
    let (deltas, _, computed) = write(true).await;
    assert!(deltas <= 1, "{deltas} deltas");
    // Each diff that runs is refused for its size; after refusals in a row
    // the next revisions skip it (1, 2, 3… of them): 7 diffs in 30 writes.
    let stats = server.stats();
    assert!((1..=8).contains(&computed), "{computed} diffs computed");
    assert_eq!(stats.deltas_too_large, computed);
    assert!(stats.delta_micros > 0, "{stats:?}");
    // One field changes again: deltas come back once a diff pays.
    let (deltas, _, _) = write(false).await;
    assert!(deltas >= 10, "{deltas} deltas after the rewrites");
    server.shutdown().await;
}

/// A hub restarted without its state reuses revisions for other content:
/// a replica that took deltas from the first hub must never patch the
/// second hub's snapshots with what the first one sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_hub_restarts_without_its_state_deltas_start_from_the_new_hub_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.sock");
    let document = |tag: &str, seq: usize| json!({"payload": tag.repeat(20_000), "seq": seq});
    let write = async |doc: &state_sync_hub::HubTopic<Value>, tag: &str| {
        let mut last = state_sync::Revision::ZERO;
        for seq in 1..=12 {
            last = doc.replace(document(tag, seq)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        last
    };

    let first = Hub::in_memory();
    let doc = first.topic("big", || document("a", 0)).await.unwrap();
    let server = Server::new(first);
    server.listen_unix(&path).await.unwrap();
    let client = Client::connect(Endpoint::Unix(path.clone()), options("deltas"));
    client.wait_connected().within_limit().await;
    let (handle, recorder) = replica::<Value>(&client, "big").await;
    let last = write(&doc, "a").await;
    handle.wait_for_revision(last).within_limit().await.unwrap();
    assert_eq!(recorder.last_data(), Some(document("a", 12)));
    assert!(server.stats().snapshots_as_deltas >= 10);
    server.shutdown().await;

    // The same revisions again, with other content.
    let second = Hub::in_memory();
    let doc = second.topic("big", || document("b", 0)).await.unwrap();
    let server = Server::new(second);
    server.listen_unix(&path).await.unwrap();
    let last = write(&doc, "b").await;
    let converged = async {
        while recorder.last_data() != Some(document("b", 12)) || handle.local_revision() != last {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    converged.within_limit().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_written_during_a_storm_of_invalidations_on_the_same_connection() {
    let hub = Hub::in_memory();
    let doc = hub.topic("doc", String::new).await.unwrap();
    let (server, path, _dir) = served(hub, ServerConfig::default(), AccessConfig::open()).await;
    let client = Client::connect(Endpoint::Unix(path), options("storm"));
    let (handle, _recorder) = replica::<String>(&client, "doc").await;
    let remote = client.topic::<String>("doc").unwrap();

    // Four writers keep the hub writing invalidations, each with the
    // document inline, to this connection without a pause.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm: Vec<_> = (0..4)
        .map(|writer| {
            let (doc, stop) = (doc.clone(), stop.clone());
            tokio::spawn(async move {
                let mut writes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("{writer}-{writes}-{}", "x".repeat(16 * 1024));
                    SharedTopic::replace(&doc, text).await.unwrap();
                    writes += 1;
                }
                writes
            })
        })
        .collect();
    // Every answer on that connection still arrives.
    for _ in 0..100 {
        SharedTopic::get(&remote).within_limit().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for writer in storm {
        writes += writer.within_limit().await.unwrap();
    }
    assert!(writes >= 10, "the storm wrote {writes} revisions");
    handle
        .wait_for_revision(doc.revision())
        .within_limit()
        .await
        .unwrap();
    server.shutdown().await;
}
