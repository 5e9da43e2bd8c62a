//! The server under hostile peers, over real sockets: oversized fields,
//! peers that never read, floods of connections, bad frames.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use state_sync::Topic;
use state_sync::testkit::{Recorder, WithinLimit};
use state_sync_hub::Hub;
use state_sync_net::{AccessConfig, Client, ClientOptions, Endpoint, Server, ServerConfig};
use state_sync_storage::FileStorage;
use state_sync_storage::conformance::FaultyStorage;

/// Polls `check` every 10 ms until it holds (at most 10 s).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn welcomed(path: &std::path::Path) -> Raw {
    let mut conn = raw(path).await;
    assert_eq!(hello(&mut conn, None).await["type"], "welcome");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_source_id_is_refused_and_never_silences_the_topic() {
    let (doc, server, path, _dir) = served_doc().await;
    let client = Client::connect(Endpoint::Unix(path.clone()), options("replica"));
    client.wait_connected().within_limit().await;
    let (handle, recorder): (_, Recorder<u64>) = replica(&client, "doc").await;

    let mut writer = welcomed(&path).await;
    let huge = "x".repeat(600_000);
    let set = json!({"type": "set", "id": 1, "topic": "doc", "data": 5, "sourceId": huge});
    expect_error(&mut writer, &set.to_string(), "too_large").await;
    // The writer's connection and every subscriber still work.
    let set = json!({"type": "set", "id": 2, "topic": "doc", "data": 6, "sourceId": "ok"});
    send(&mut writer, &set.to_string()).await;
    let answer = recv(&mut writer).await;
    assert_eq!(answer["type"], "ok", "{answer}");
    let revision = answer["revision"].as_str().unwrap().parse().unwrap();
    handle
        .wait_for_revision(revision)
        .within_limit()
        .await
        .unwrap();
    assert_eq!(recorder.last_data(), Some(6));
    assert_eq!(doc.get().value(), &6);

    // A huge clientId is refused at hello.
    let mut conn = raw(&path).await;
    let hello = json!({"type": "hello", "version": 1, "clientId": "c".repeat(600_000)});
    expect_error(&mut conn, &hello.to_string(), "too_large").await;
    assert!(closed(&mut conn).await);
    server.shutdown().await;
}

#[tokio::test]
async fn errors_never_echo_huge_inputs() {
    let (_doc, server, path, _dir) = served_doc().await;
    let mut conn = welcomed(&path).await;
    let revision = "1".repeat(600_000);
    let topic = "t".repeat(300_000);
    for request in [
        json!({"type": "get", "id": 1, "topic": "doc", "ifNewerThan": revision}),
        json!({"type": "set", "id": 2, "topic": "doc", "data": 1, "expectedRevision": revision}),
        json!({"type": "get", "id": 3, "topic": topic}),
    ] {
        send(&mut conn, &request.to_string()).await;
        let frame = conn.next().within_limit().await.unwrap().unwrap();
        assert!(frame.len() < 1024, "an error of {} bytes", frame.len());
        let answer: Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(answer["type"], "error", "{answer}");
    }
    expect_error(
        &mut conn,
        &json!({"type": "get", "id": 4, "topic": "a".repeat(Topic::MAX_LEN + 1)}).to_string(),
        "invalid_topic",
    )
    .await;
    send(&mut conn, r#"{"type":"ping","id":5}"#).await;
    assert_eq!(recv(&mut conn).await["type"], "pong");
    server.shutdown().await;
}

/// A hub whose topic `big` holds about 900 KB.
async fn big_hub() -> Hub {
    let hub = Hub::in_memory();
    let big = hub.json_topic("big").await.unwrap();
    big.replace(json!("x".repeat(900_000))).await.unwrap();
    hub
}

fn strict_config() -> ServerConfig {
    ServerConfig {
        write_timeout: Duration::from_millis(300),
        max_queued_bytes_per_connection: 2 << 20,
        shutdown_grace: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

/// Pipelines `count` gets of `big` on a connection that never reads.
async fn never_reading(path: &std::path::Path, count: u64) -> Raw {
    let mut conn = welcomed(path).await;
    for id in 0..count {
        let get = json!({"type": "get", "id": id, "topic": "big"});
        conn.send(bytes::Bytes::from(get.to_string()))
            .await
            .unwrap();
    }
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_costs_bounded_memory_and_is_closed() {
    let (server, path, _dir) = served(big_hub().await, strict_config(), AccessConfig::open()).await;
    let _stalled = never_reading(&path, 64).await;
    let mut most = 0;
    eventually("the stalled connection is closed", || {
        let stats = server.stats();
        most = most.max(stats.queued_bytes);
        stats.connections_closed_unwritable == 1
    })
    .await;
    assert!(most <= 2 << 20, "{most} bytes queued for one connection");
    eventually("its queue is freed", || {
        let stats = server.stats();
        stats.queued_bytes == 0 && stats.connections == 0
    })
    .await;
    // Everyone else is served throughout.
    let mut conn = welcomed(&path).await;
    send(&mut conn, r#"{"type":"ping","id":1}"#).await;
    assert_eq!(recv(&mut conn).await["type"], "pong");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_bounded_time_while_a_client_has_stopped_reading() {
    let config = ServerConfig {
        // Long enough that only shutdown's own bounds can end it in time.
        write_timeout: Duration::from_secs(1),
        ..strict_config()
    };
    let (server, path, _dir) = served(big_hub().await, config, AccessConfig::open()).await;
    let _stalled = never_reading(&path, 64).await;
    eventually("answers are queued", || server.stats().queued_bytes > 0).await;
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown must finish in bounded time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_of_different_topics_on_one_connection_are_stored_concurrently_in_answer_order() {
    let (storage, gate) = FaultyStorage::new().holding(Topic::new("slow").unwrap());
    let hub = Hub::new(storage.clone());
    let (server, path, _dir) = served(hub, ServerConfig::default(), AccessConfig::open()).await;
    let mut conn = welcomed(&path).await;
    for request in [
        json!({"type": "set", "id": 1, "topic": "slow", "data": 1}),
        json!({"type": "set", "id": 2, "topic": "fast", "data": 2}),
        json!({"type": "get", "id": 3, "topic": "slow"}),
        json!({"type": "ping", "id": 4}),
    ] {
        send(&mut conn, &request.to_string()).await;
    }
    // `fast` is stored while `slow` is still held.
    eventually("both stores began", || storage.stores_started() == 2).await;
    assert_eq!(storage.stores(), 1, "only `fast` is stored so far");
    gate.add_permits(1);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut conn).await);
    }
    let ids: Vec<u64> = got.iter().map(|a| a["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4], "answers keep the request order: {got:?}");
    // The get of `slow` came after its set: it sees the write.
    assert_eq!(got[2]["type"], "snapshot");
    assert_eq!(got[2]["revision"], got[0]["revision"]);
    assert_eq!(got[2]["data"], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn set_data_that_grows_when_encoded_is_refused() {
    let config = ServerConfig {
        max_snapshot_bytes: 1024,
        ..ServerConfig::default()
    };
    let hub = Hub::in_memory();
    hub.json_topic("doc").await.unwrap();
    let (server, path, _dir) = served(hub.clone(), config, AccessConfig::open()).await;
    let mut conn = welcomed(&path).await;
    // 150 × "1e5" is about 600 bytes as sent and about 1 350 encoded.
    let data = format!("[{}]", vec!["1e5"; 150].join(","));
    assert!(data.len() < 1024);
    let set = format!(r#"{{"type":"set","id":1,"topic":"doc","data":{data}}}"#);
    expect_error(&mut conn, &set, "too_large").await;
    send(&mut conn, r#"{"type":"get","id":2,"topic":"doc"}"#).await;
    let answer = recv(&mut conn).await;
    assert_eq!(answer["type"], "snapshot", "still servable: {answer}");
    assert_eq!(answer["data"], Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn topics_are_capped_and_storage_errors_name_no_server_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let hub = Hub::builder()
        .storage(FileStorage::open(&store).unwrap())
        .max_topics(1)
        .build();
    let (server, path, _sockets) = served(hub, ServerConfig::default(), AccessConfig::open()).await;
    let mut conn = welcomed(&path).await;
    send(&mut conn, r#"{"type":"set","id":1,"topic":"a","data":1}"#).await;
    assert_eq!(recv(&mut conn).await["type"], "ok");
    expect_error(
        &mut conn,
        r#"{"type":"set","id":2,"topic":"b","data":1}"#,
        "too_many_topics",
    )
    .await;
    // The store's directory disappears: the error says so without paths.
    std::fs::remove_dir_all(&store).unwrap();
    send(&mut conn, r#"{"type":"set","id":3,"topic":"a","data":2}"#).await;
    let answer = recv(&mut conn).await;
    assert_eq!(answer["code"], "storage", "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(
        !message.contains(dir.path().to_str().unwrap()),
        "a server path in {message}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn connections_past_the_limit_are_refused_with_a_code() {
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let (server, path, _dir) = served(Hub::in_memory(), config, AccessConfig::open()).await;
    let mut first = welcomed(&path).await;
    let mut second = raw(&path).await;
    let refused = recv(&mut second).await;
    assert_eq!(refused["code"], "too_many_connections", "{refused}");
    assert!(closed(&mut second).await);
    assert_eq!(server.stats().connections_refused, 1);
    send(&mut first, r#"{"type":"ping","id":1}"#).await;
    assert_eq!(recv(&mut first).await["type"], "pong");
    drop(first);
    eventually("the slot is free again", || server.stats().connections == 0).await;
    let _third = welcomed(&path).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_null_expected_revision_is_refused_not_taken_as_unconditional() {
    let (doc, server, path, _dir) = served_doc().await;
    let mut conn = welcomed(&path).await;
    let before = doc.get().revision();
    expect_error(
        &mut conn,
        r#"{"type":"set","id":1,"topic":"doc","data":9,"expectedRevision":null}"#,
        "bad_request",
    )
    .await;
    assert_eq!(doc.get().revision(), before, "nothing was written");
    server.shutdown().await;
}

#[tokio::test]
async fn websocket_invalid_utf8_closes_with_1007_and_plain_http_gets_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

    let server = Server::new(Hub::in_memory());
    let addr = server.listen_websocket("127.0.0.1:0").await.unwrap();
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}"))
        .await
        .unwrap();
    let hello = json!({"type": "hello", "version": 1, "clientId": "ws"}).to_string();
    socket.send(Message::text(hello)).await.unwrap();
    let welcome = socket.next().within_limit().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"));
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let invalid = Frame::from_payload(header, bytes::Bytes::from_static(&[0xff, 0xfe, 0x80]));
    socket.send(Message::Frame(invalid)).await.unwrap();
    let mut close_code = None;
    while let Some(Ok(message)) = socket.next().within_limit().await {
        if let Message::Close(frame) = message {
            close_code = frame.map(|f| f.code);
            break;
        }
    }
    assert_eq!(close_code, Some(CloseCode::Invalid), "1007");

    let mut http = tokio::net::TcpStream::connect(addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), http.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    server.shutdown().await;
}

/// One plain HTTP request to `addr`; the whole response.
async fn http_get(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut http = tokio::net::TcpStream::connect(addr).await.unwrap();
    http.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), http.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn the_web_page_is_served_on_the_websocket_port_beside_the_protocol() {
    let server = Server::new(Hub::in_memory());
    server.serve_web_page("<!doctype html><title>hub</title>");
    let addr = server.listen_websocket("127.0.0.1:0").await.unwrap();

    let page = http_get(addr, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(
        page.contains("content-type: text/html; charset=utf-8"),
        "{page}"
    );
    assert!(page.contains("x-frame-options: DENY"), "{page}");
    assert!(
        page.ends_with("<!doctype html><title>hub</title>"),
        "{page}"
    );
    let head = http_get(addr, "HEAD /?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(
        head.starts_with("HTTP/1.1 200 OK") && !head.contains("<title>"),
        "{head}"
    );
    let missing = http_get(addr, "GET /../etc/passwd HTTP/1.1\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post = http_get(addr, "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");

    // The protocol on the same port is unaffected.
    let client = Client::connect(
        Endpoint::WebSocket(format!("ws://{addr}")),
        ClientOptions::new("beside-the-page"),
    );
    client.wait_connected().within_limit().await;
    let revision = client.set_json("t", "1", None).await.unwrap();
    assert_eq!(client.get_json("t").await.unwrap().0, revision);
    server.shutdown().await;
}
