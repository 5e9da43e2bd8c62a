//! Server and client over real Unix sockets and WebSocket on 127.0.0.1.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use state_sync::Revision;
use state_sync::testkit::WithinLimit;
use state_sync_hub::Hub;
use state_sync_net::{
    AccessConfig, Client, ClientAccess, ConnectionStatus, Endpoint, Error as ClientError, Server,
    ServerConfig,
};
use state_sync_storage::{FileStorage, Storage};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_over_unix_sockets_and_websocket_converge() {
    let (doc, server, path, _dir) = served_doc().await;
    let addr = server.listen_websocket("127.0.0.1:0").await.unwrap();

    let unix = Client::connect(Endpoint::Unix(path.clone()), options("unix"));
    let ws = Client::connect(Endpoint::WebSocket(format!("ws://{addr}")), options("ws"));
    assert_eq!(
        unix.wait_connected().within_limit().await,
        ConnectionStatus::Connected
    );
    assert_eq!(
        ws.wait_connected().within_limit().await,
        ConnectionStatus::Connected
    );
    // Several handles share each client's one connection.
    let mut replicas = Vec::new();
    for client in [&unix, &ws] {
        for _ in 0..3 {
            replicas.push(replica(client, "doc").await);
        }
    }
    assert_eq!(server.stats().connections, 2);

    let mut last = Revision::ZERO;
    for i in 1..=200u64 {
        last = if i % 2 == 0 {
            doc.replace(i).await.unwrap()
        } else {
            unix.set("doc", &i, None).await.unwrap()
        };
    }
    for (handle, recorder) in &replicas {
        handle.wait_for_revision(last).within_limit().await.unwrap();
        assert_eq!(recorder.last_data(), Some(200));
        assert!(recorder.is_strictly_increasing());
    }

    // An up-to-date replica's fetch transfers no data.
    let sent = server.stats().snapshots_sent;
    for (handle, _) in &replicas {
        handle.refresh().await.unwrap();
    }
    assert_eq!(server.stats().snapshots_sent, sent);
    server.shutdown().await;
}

#[tokio::test]
async fn compare_and_set_conflicts_carry_the_current_revision() {
    let hub = Hub::in_memory();
    hub.json_topic("settings").await.unwrap();
    let (server, path, _dir) = served(hub, ServerConfig::default(), AccessConfig::open()).await;
    let client = Client::connect(Endpoint::Unix(path), options("cas"));
    client.wait_connected().within_limit().await;

    let (base, _) = client.get_json("settings").await.unwrap();
    let won = client
        .set_json("settings", r#"{"v":1}"#, Some(base))
        .await
        .unwrap();
    let lost = client
        .set_json("settings", r#"{"v":2}"#, Some(base))
        .await
        .unwrap_err();
    assert!(
        matches!(lost, ClientError::Conflict { current } if current == won),
        "{lost}"
    );
    let (now, data) = client.get_json("settings").await.unwrap();
    assert_eq!((now, &data[..]), (won, &br#"{"v":1}"#[..]));
    server.shutdown().await;
}

#[tokio::test]
async fn status_reports_only_the_topics_a_client_may_read() {
    let hub = Hub::in_memory();
    let public = hub.json_topic("public:news").await.unwrap();
    let revision = public.replace(json!({"headline": "hi"})).await.unwrap();
    hub.json_topic("secret").await.unwrap();
    let access = AccessConfig::open()
        .with_client(ClientAccess::new("admin").read("*").write("*"))
        .with_client(ClientAccess::new("reader").read("public:*"));
    let (server, path, _dir) = served(hub, ServerConfig::default(), access).await;
    let admin = Client::connect(
        Endpoint::Unix(path.clone()),
        options("admin").token("admin"),
    );
    let reader = Client::connect(Endpoint::Unix(path), options("reader").token("reader"));
    let (_replica, _) = replica::<Value>(&reader, "public:news").await;

    let seen = admin.hub_status().within_limit().await.unwrap();
    let names: Vec<&str> = seen.topics.iter().map(|t| t.topic.as_str()).collect();
    assert_eq!(names, ["public:news", "secret"]);
    assert_eq!(seen.topics[0].revision, revision);
    assert_eq!(seen.topics[0].bytes, br#"{"headline":"hi"}"#.len());
    assert_eq!(seen.topics[0].subscribers, 1);
    assert_eq!(seen.stats.connections, 2);
    assert_eq!(seen.stats.subscriptions, 1);
    assert!(!seen.stale && !seen.shared_storage);

    let seen = reader.hub_status().within_limit().await.unwrap();
    let names: Vec<&str> = seen.topics.iter().map(|t| t.topic.as_str()).collect();
    assert_eq!(names, ["public:news"]);
    server.shutdown().await;
}

#[tokio::test]
async fn every_bad_input_gets_its_error_code_and_the_server_keeps_serving() {
    let hub = Hub::in_memory();
    let counter = hub.topic("counter", || 5u64).await.unwrap();
    hub.json_topic("private").await.unwrap();
    let access = AccessConfig::open().with_client(
        ClientAccess::new("good")
            .read("counter")
            .read("missing")
            .write("counter")
            .write("big"),
    );
    let config = ServerConfig {
        max_frame_bytes: 4096,
        max_snapshot_bytes: 1024,
        ..ServerConfig::default()
    };
    let (server, path, _dir) = served(hub.clone(), config, access).await;
    let before = counter.get().revision();

    // Handshake failures close the connection.
    let mut conn = raw(&path).await;
    expect_error(&mut conn, r#"{"type":"ping","id":1}"#, "not_authenticated").await;
    assert!(closed(&mut conn).await);
    let mut conn = raw(&path).await;
    assert_eq!(hello(&mut conn, Some("bad")).await["code"], "unauthorized");
    assert!(closed(&mut conn).await);
    let mut conn = raw(&path).await;
    assert_eq!(hello(&mut conn, None).await["code"], "unauthorized");
    let mut conn = raw(&path).await;
    expect_error(
        &mut conn,
        r#"{"type":"hello","version":99,"clientId":"x","token":"good"}"#,
        "unsupported_version",
    )
    .await;
    let mut conn = raw(&path).await;
    expect_error(&mut conn, "{not json", "bad_request").await;

    // Request errors keep the connection open.
    let mut conn = raw(&path).await;
    assert_eq!(hello(&mut conn, Some("good")).await["type"], "welcome");
    for (message, code) in [
        ("{not json", "bad_request"),
        (r#"{"type":"frobnicate","id":1}"#, "unknown_message"),
        (r#"{"type":"get","id":2}"#, "bad_request"),
        (
            r#"{"type":"get","id":3,"topic":"counter","ifNewerThan":"01"}"#,
            "invalid_revision",
        ),
        (
            r#"{"type":"get","id":4,"topic":"counter","ifNewerThan":5}"#,
            "bad_request",
        ),
        (
            r#"{"type":"set","id":5,"topic":"counter","data":6,"expectedRevision":"1.0"}"#,
            "invalid_revision",
        ),
        (
            r#"{"type":"get","id":6,"topic":"missing"}"#,
            "unknown_topic",
        ),
        (r#"{"type":"get","id":7,"topic":"  "}"#, "invalid_topic"),
        (r#"{"type":"get","id":8,"topic":"private"}"#, "forbidden"),
        (
            r#"{"type":"subscribe","id":9,"topic":"private"}"#,
            "forbidden",
        ),
        (
            r#"{"type":"set","id":10,"topic":"private","data":1}"#,
            "forbidden",
        ),
        (
            r#"{"type":"set","id":11,"topic":"counter","data":"six"}"#,
            "invalid_data",
        ),
    ] {
        expect_error(&mut conn, message, code).await;
    }
    let big = format!(
        r#"{{"type":"set","id":12,"topic":"big","data":"{}"}}"#,
        "x".repeat(2000)
    );
    expect_error(&mut conn, &big, "too_large").await;
    let answer = recv_after(&mut conn, r#"{"type":"get","id":13,"topic":"counter"}"#).await;
    assert_eq!(answer["id"], 13, "errors carry the request id");
    assert_eq!(answer["data"], 5);
    // An oversized frame closes this connection only.
    let huge = format!(
        r#"{{"type":"set","id":14,"topic":"big","data":"{}"}}"#,
        "x".repeat(8000)
    );
    expect_error(&mut conn, &huge, "too_large").await;
    assert!(closed(&mut conn).await);

    // Nothing was committed, and everyone else is still served.
    assert_eq!(counter.get().revision(), before);
    assert!(!hub.is_open(&state_sync::Topic::new("big").unwrap()));
    let client = Client::connect(Endpoint::Unix(path), options("after").token("good"));
    client.wait_connected().within_limit().await;
    let revision = client.set("counter", &6u64, Some(before)).await.unwrap();
    assert_eq!(revision, before.next());
    assert_eq!(server.stats().connections, 1);
    server.shutdown().await;
}

async fn recv_after(conn: &mut Raw, message: &str) -> Value {
    send(conn, message).await;
    recv(conn).await
}

#[tokio::test]
async fn a_refused_client_stops_retrying_and_says_why() {
    let access = AccessConfig::open().with_client(ClientAccess::new("right").read("*"));
    let (server, path, _dir) = served(Hub::in_memory(), ServerConfig::default(), access).await;
    let client = Client::connect(Endpoint::Unix(path), options("intruder").token("wrong"));
    let status = client.wait_connected().within_limit().await;
    assert!(
        matches!(&status, ConnectionStatus::Refused(why) if why.contains("unauthorized")),
        "{status:?}"
    );
    assert!(matches!(
        client.get_json("x").await,
        Err(ClientError::Disconnected)
    ));
    server.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_a_reason() {
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let (server, path, _dir) = served(Hub::in_memory(), config, AccessConfig::open()).await;
    let mut conn = raw(&path).await;
    hello(&mut conn, None).await;
    assert_eq!(recv(&mut conn).await["code"], "idle_timeout");
    assert!(closed(&mut conn).await);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_costs_one_pending_invalidation_per_topic() {
    let (doc, server, path, _dir) = served_doc().await;

    // Subscribe (one with inline snapshots, one without), then never read
    // again.
    let mut deaf = raw(&path).await;
    let mut deaf_inline = raw(&path).await;
    for (conn, subscribe) in [
        (&mut deaf, r#"{"type":"subscribe","id":1,"topic":"doc"}"#),
        (
            &mut deaf_inline,
            r#"{"type":"subscribe","id":1,"topic":"doc","inline":true}"#,
        ),
    ] {
        hello(conn, None).await;
        assert_eq!(recv_after(conn, subscribe).await["type"], "subscribed");
    }

    let client = Client::connect(Endpoint::Unix(path), options("healthy"));
    client.wait_connected().within_limit().await;
    let (handle, recorder) = replica(&client, "doc").await;

    let mut last = Revision::ZERO;
    for i in 1..=10_000u64 {
        last = doc.replace(i).await.unwrap();
        if i % 1000 == 0 {
            let stats = server.stats();
            assert!(stats.max_pending_per_connection <= 1, "{stats:?}");
        }
    }
    handle.wait_for_revision(last).within_limit().await.unwrap();
    assert_eq!(recorder.last_data(), Some(10_000));
    let stats = server.stats();
    assert!(stats.max_pending_per_connection <= 1, "{stats:?}");
    assert!(stats.invalidations_coalesced > 0, "{stats:?}");
    drop((deaf, deaf_inline));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_on_one_server() {
    // A thousand client and a thousand server sockets in this process, more
    // than Linux's default soft limit of 1 024 descriptors.
    let limit = rlimit::increase_nofile_limit(4096).unwrap();
    assert!(limit >= 2100, "cannot raise the open-file limit: {limit}");
    let (doc, server, path, _dir) = served_doc().await;

    let replicas = replicas_on(&path, 1000, |i| options(&format!("c{i}"))).await;
    assert_eq!(server.stats().connections, 1000);
    let last = doc.replace(42).await.unwrap();
    for (_, handle, recorder) in &replicas {
        handle.wait_for_revision(last).within_limit().await.unwrap();
        assert_eq!(recorder.last_data(), Some(42));
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_resubscribe_and_resync_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("data");
    let socket = dir.path().join("hub.sock");

    let hub = Hub::new(FileStorage::open(&store).unwrap());
    let doc = hub.topic("doc", || 0u64).await.unwrap();
    let server = Server::new(hub);
    server.listen_unix(&socket).await.unwrap();
    let client = Client::connect(Endpoint::Unix(socket.clone()), options("survivor"));
    client.wait_connected().within_limit().await;
    let (handle, recorder) = replica(&client, "doc").await;
    let before = doc.replace(1).await.unwrap();
    handle
        .wait_for_revision(before)
        .within_limit()
        .await
        .unwrap();

    let mut status = client.watch_status();
    server.shutdown().await;
    drop(doc);
    status
        .wait_for(|s| {
            matches!(
                s,
                ConnectionStatus::Disconnected(_) | ConnectionStatus::Connecting
            )
        })
        .await
        .unwrap();

    // Restarted on the same storage; a write lands before the client is back.
    let hub = Hub::new(FileStorage::open(&store).unwrap());
    let doc = hub.topic("doc", || 0u64).await.unwrap();
    assert_eq!(doc.get().revision(), before);
    let during = doc.replace(2).await.unwrap();
    let server = Server::new(hub);
    server.listen_unix(&socket).await.unwrap();

    handle
        .wait_for_revision(during)
        .within_limit()
        .await
        .unwrap();
    assert_eq!(recorder.last_data(), Some(2));
    let after = client.set("doc", &3u64, None).await.unwrap();
    handle
        .wait_for_revision(after)
        .within_limit()
        .await
        .unwrap();
    assert_eq!(recorder.last_data(), Some(3));
    assert!(recorder.is_strictly_increasing());
    server.shutdown().await;
}

/// A hub that answers requests but never sends invalidations (a deaf
/// subscription), and whose topic moves on silently after the first fetch.
async fn deaf_hub(path: PathBuf) {
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let mut conn = Framed::new(stream, LengthDelimitedCodec::new());
    let mut revision = 1u64;
    while let Some(Ok(frame)) = conn.next().await {
        let request: Value = serde_json::from_slice(&frame).unwrap();
        let id = request["id"].clone();
        let answer = match request["type"].as_str().unwrap() {
            "hello" => json!({"type": "welcome", "version": 1, "serverId": "deaf"}),
            "subscribe" => {
                json!({"type": "subscribed", "id": id, "topic": "doc", "revision": revision.to_string()})
            }
            "get" => {
                let answer = json!({"type": "snapshot", "id": id, "topic": "doc", "revision": revision.to_string(), "data": revision});
                revision = 2; // changes, and tells no one
                answer
            }
            _ => json!({"type": "pong", "id": id}),
        };
        conn.send(Bytes::from(answer.to_string())).await.unwrap();
    }
}

#[tokio::test]
async fn the_revision_probe_catches_a_deaf_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deaf.sock");
    let hub = tokio::spawn(deaf_hub(path.clone()));
    tokio::task::yield_now().await;
    let client = Client::connect(
        Endpoint::Unix(path),
        options("prober").probe_interval(Duration::from_millis(50)),
    );
    client.wait_connected().within_limit().await;
    let (handle, recorder) = replica(&client, "doc").await;
    assert_eq!(recorder.last_data(), Some(1));
    // No invalidation will come; the probe notices revision 2.
    tokio::time::timeout(
        Duration::from_secs(10),
        handle.wait_for_revision(Revision::new(2)),
    )
    .await
    .expect("the probe never noticed")
    .unwrap();
    assert_eq!(recorder.last_data(), Some(2));
    hub.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_write_in_flight() {
    let doc = state_sync::Topic::new("doc").unwrap();
    let (storage, release) =
        state_sync_storage::conformance::FaultyStorage::new().holding(doc.clone());
    let hub = Hub::new(storage.clone());
    hub.json_topic("doc").await.unwrap();
    let (server, path, _dir) = served(hub, ServerConfig::default(), AccessConfig::open()).await;
    let client = Client::connect(Endpoint::Unix(path), options("late-writer"));
    client.wait_connected().within_limit().await;

    let write = tokio::spawn({
        let client = client.clone();
        async move { client.set_json("doc", r#"{"saved":true}"#, None).await }
    });
    // Shut down while the store is in progress, then let the store finish.
    while storage.stores_started() == 0 {
        tokio::task::yield_now().await;
    }
    let shutdown = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });
    tokio::task::yield_now().await;
    release.add_permits(1);
    shutdown.await.unwrap();

    let revision = write
        .await
        .unwrap()
        .expect("the in-flight write was not answered");
    let stored = storage.records().load(&doc).await.unwrap().unwrap();
    assert_eq!(
        (stored.revision, &stored.data[..]),
        (revision, &br#"{"saved":true}"#[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_snapshots_ride_in_invalidations_and_large_ones_are_fetched() {
    let hub = Hub::in_memory();
    let doc = hub.topic("doc", String::new).await.unwrap();
    let config = ServerConfig {
        inline_snapshot_max_bytes: 64,
        ..ServerConfig::default()
    };
    let (server, path, _dir) = served(hub, config, AccessConfig::open()).await;

    // On the wire: only a subscription that asks gets the snapshot.
    let mut asks = raw(&path).await;
    let mut plain = raw(&path).await;
    for (conn, subscribe) in [
        (
            &mut asks,
            r#"{"type":"subscribe","id":1,"topic":"doc","inline":true}"#,
        ),
        (&mut plain, r#"{"type":"subscribe","id":1,"topic":"doc"}"#),
    ] {
        hello(conn, None).await;
        assert_eq!(recv_after(conn, subscribe).await["type"], "subscribed");
    }
    let small = doc.replace("small".to_owned()).await.unwrap();
    let with_snapshot = recv(&mut asks).await;
    assert_eq!(with_snapshot["revision"], small.to_string());
    assert_eq!(
        with_snapshot["snapshot"],
        json!({"revision": small.to_string(), "data": "small"})
    );
    let without = recv(&mut plain).await;
    assert_eq!(without["revision"], small.to_string());
    assert!(without.get("snapshot").is_none(), "{without}");
    let large = doc.replace("L".repeat(100)).await.unwrap();
    let too_large = recv(&mut asks).await;
    assert_eq!(too_large["revision"], large.to_string());
    assert!(too_large.get("snapshot").is_none(), "{too_large}");
    drop((asks, plain));

    // Through the client: small writes apply without a single fetch.
    let client = Client::connect(Endpoint::Unix(path), options("inline"));
    client.wait_connected().within_limit().await;
    let (handle, recorder) = replica::<String>(&client, "doc").await;
    let fetched = server.stats().snapshots_sent;
    for i in 0..50 {
        let at = doc.replace(format!("v{i}")).await.unwrap();
        handle.wait_for_revision(at).within_limit().await.unwrap();
    }
    assert_eq!(recorder.last_data().as_deref(), Some("v49"));
    let stats = server.stats();
    assert_eq!(stats.snapshots_sent, fetched, "{stats:?}");
    assert!(stats.snapshots_inlined >= 50, "{stats:?}");

    // A snapshot over the limit is fetched.
    let last = doc.replace("L".repeat(100)).await.unwrap();
    handle.wait_for_revision(last).within_limit().await.unwrap();
    assert_eq!(recorder.last_data(), Some("L".repeat(100)));
    assert_eq!(server.stats().snapshots_sent, fetched + 1);
    assert!(recorder.is_strictly_increasing());
    server.shutdown().await;
}

/// `listen_local` is the named pipe of Windows; on Linux the same code runs
/// over an abstract-namespace socket, so it is exercised here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_local_socket_serves_like_a_unix_socket() {
    let hub = Hub::in_memory();
    let doc = hub.topic("doc", || 0u64).await.unwrap();
    let server = Server::new(hub);
    let name = format!("state-sync-test-{}", std::process::id());
    assert_eq!(server.listen_local(&name).await.unwrap(), name);
    // The name is taken while the server listens.
    let error = Server::new(Hub::in_memory())
        .listen_local(&name)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");

    let client = Client::connect(Endpoint::Local(name.clone()), options("local"));
    assert_eq!(
        client.wait_connected().within_limit().await,
        ConnectionStatus::Connected
    );
    assert_eq!(
        Endpoint::Local(name.clone()).to_string(),
        format!("local:{name}")
    );
    let (handle, recorder) = replica(&client, "doc").await;
    let mut last = Revision::ZERO;
    for i in 1..=100u64 {
        last = if i % 2 == 0 {
            doc.replace(i).await.unwrap()
        } else {
            client.set("doc", &i, None).await.unwrap()
        };
    }
    handle.wait_for_revision(last).within_limit().await.unwrap();
    assert_eq!(recorder.last_data(), Some(100));
    assert!(recorder.is_strictly_increasing());
    let error = client
        .set_json("doc", "\"not a number\"", None)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(state_sync_net::ErrorCode::InvalidData));
    server.shutdown().await;
    // Shutdown gives the name back.
    let next = Server::new(Hub::in_memory());
    next.listen_local(&name).await.unwrap();
    next.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_revision_is_encoded_once_for_every_connection() {
    let (doc, server, path, _dir) = served_doc().await;
    let replicas = replicas_on(&path, 8, |i| {
        options(&format!("c{i}")).inline_snapshots(i % 2 == 0)
    })
    .await;
    let before = server.stats();
    let mut last = Revision::ZERO;
    for i in 1..=50u64 {
        last = doc.replace(i).await.unwrap();
    }
    for (_, handle, recorder) in &replicas {
        handle.wait_for_revision(last).within_limit().await.unwrap();
        assert_eq!(recorder.last_data(), Some(50));
    }
    let after = server.stats();
    // Per revision, one frame without the snapshot for the four plain
    // connections, one with it and at most one with a delta for the four
    // inline ones: never one per connection.
    let encoded = after.invalidation_frames_encoded - before.invalidation_frames_encoded;
    assert!((100..=150).contains(&encoded), "{encoded}: {after:?}");
    assert!(
        after.invalidations_sent - before.invalidations_sent >= 8,
        "{after:?}"
    );
    assert!(
        after.snapshots_inlined > before.snapshots_inlined,
        "{after:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_unix_socket_is_private_to_its_user_and_a_live_one_is_not_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let (_doc, server, path, dir) = served_doc().await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // The private directory it was bound in is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [path.file_name().unwrap()], "{left:?}");
    let again = Server::new(Hub::in_memory()).listen_unix(&path).await;
    assert_eq!(again.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    server.shutdown().await;
}
