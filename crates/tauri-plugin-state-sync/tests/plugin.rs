//! The plugin through the real Tauri runtime's mock backend: the IPC path,
//! emitted events, permissions, restarts.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tauri::test::{MockRuntime, mock_builder, mock_context, noop_assets};
use tauri::webview::InvokeRequest;
use tauri::{App, Listener, WebviewWindow, WebviewWindowBuilder};
use tauri_plugin_state_sync::{Builder, StateSyncExt};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Settings {
    theme: String,
    volume: u8,
}

/// What a capability with `state-sync:default` and `state-sync:allow-set`
/// grants, plus whatever `extra` names.
fn context_granting(commands: &[&str]) -> tauri::Context<MockRuntime> {
    let mut context = mock_context(noop_assets());
    for command in commands {
        context.runtime_authority_mut().__allow_command(
            format!("plugin:state-sync|{command}"),
            tauri::utils::acl::ExecutionContext::Local,
        );
    }
    context
}

const READ_WRITE: &[&str] = &["get_snapshot", "set", "listen", "unlisten"];

fn app(plugin: Builder) -> App<MockRuntime> {
    mock_builder()
        .plugin(plugin.build())
        .invoke_handler(tauri_plugin_state_sync::app_commands![])
        .build(context_granting(READ_WRITE))
        .unwrap()
}

fn window(app: &App<MockRuntime>, label: &str) -> WebviewWindow<MockRuntime> {
    WebviewWindowBuilder::new(app, label, Default::default())
        .build()
        .unwrap()
}

fn invoke(window: &WebviewWindow<MockRuntime>, cmd: &str, args: Value) -> Result<Value, Value> {
    tauri::test::get_ipc_response(
        window,
        InvokeRequest {
            cmd: cmd.into(),
            callback: tauri::ipc::CallbackFn(0),
            error: tauri::ipc::CallbackFn(1),
            url: "tauri://localhost".parse().unwrap(),
            body: tauri::ipc::InvokeBody::Json(args),
            headers: Default::default(),
            invoke_key: tauri::test::INVOKE_KEY.to_string(),
        },
    )
    .map(|body| body.deserialize::<Value>().unwrap())
}

fn events(app: &App<MockRuntime>) -> Arc<Mutex<Vec<Value>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    app.listen_any("state-sync:invalidation", move |event| {
        log.lock()
            .unwrap()
            .push(serde_json::from_str(event.payload()).unwrap());
    });
    seen
}

fn settings_app() -> App<MockRuntime> {
    app(Builder::new().in_memory().topic("settings", || Settings {
        theme: "light".into(),
        volume: 3,
    }))
}

#[test]
fn get_snapshot_returns_the_exact_shape_the_javascript_provider_expects() {
    let app = settings_app();
    let a = window(&app, "a");
    let revision = app
        .state_sync()
        .hub()
        .get_json(&"settings".parse().unwrap())
        .unwrap()
        .revision;
    let got = invoke(&a, "get_snapshot", json!({"topic": "settings"})).unwrap();
    assert_eq!(
        got,
        json!({"revision": revision.to_string(), "data": {"theme": "light", "volume": 3}})
    );
    assert!(
        got["revision"].is_string(),
        "revision must be a canonical string"
    );
}

#[test]
fn a_write_from_window_a_emits_an_invalidation_with_its_label() {
    let app = settings_app();
    let seen = events(&app);
    let a = window(&app, "a");
    let written = invoke(
        &a,
        "set",
        json!({"topic": "settings", "data": {"theme": "dark", "volume": 7}}),
    )
    .unwrap();
    let revision = written["revision"].as_str().unwrap().to_owned();
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [json!({"topic": "settings", "revision": revision, "sourceId": "a"})]
    );
    let b = window(&app, "b");
    let got = invoke(&b, "get_snapshot", json!({"topic": "settings"})).unwrap();
    assert_eq!(got["data"], json!({"theme": "dark", "volume": 7}));
}

#[test]
fn rust_writes_through_the_extension_emit_the_same_events() {
    let app = settings_app();
    let seen = events(&app);
    let settings =
        tauri::async_runtime::block_on(app.state_sync().topic("settings", Settings::default))
            .unwrap();
    let revision = tauri::async_runtime::block_on(settings.update(|s| Settings {
        volume: s.volume + 1,
        ..s.clone()
    }))
    .unwrap();
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [json!({"topic": "settings", "revision": revision.to_string()})]
    );
}

#[test]
fn compare_and_set_conflicts_reject_with_the_current_revision() {
    let app = settings_app();
    let a = window(&app, "a");
    let base =
        invoke(&a, "get_snapshot", json!({"topic": "settings"})).unwrap()["revision"].clone();
    let won = invoke(
        &a,
        "set",
        json!({"topic": "settings", "data": {"theme": "x", "volume": 1}, "expectedRevision": base}),
    )
    .unwrap();
    let lost = invoke(
        &a,
        "set",
        json!({"topic": "settings", "data": {"theme": "y", "volume": 2}, "expectedRevision": base}),
    )
    .unwrap_err();
    assert_eq!(lost["code"], "conflict");
    assert_eq!(lost["currentRevision"], won["revision"]);
}

#[test]
fn bad_arguments_and_unknown_topics_are_errors_not_panics() {
    let app = settings_app();
    let a = window(&app, "a");
    assert_eq!(
        invoke(&a, "get_snapshot", json!({"topic": "nope"})).unwrap_err()["code"],
        "unknown_topic"
    );
    assert_eq!(
        invoke(&a, "get_snapshot", json!({"topic": "  "})).unwrap_err()["code"],
        "invalid_topic"
    );
    assert!(
        invoke(&a, "get_snapshot", json!({})).is_err(),
        "missing topic"
    );
    assert!(
        invoke(&a, "get_snapshot", json!({"topic": 5})).is_err(),
        "ill-typed topic"
    );
    let wrong_shape = invoke(
        &a,
        "set",
        json!({"topic": "settings", "data": {"theme": 1}}),
    )
    .unwrap_err();
    assert_eq!(wrong_shape["code"], "invalid_data");
    let bad_revision = invoke(
        &a,
        "set",
        json!({"topic": "settings", "data": {"theme": "z", "volume": 0}, "expectedRevision": "01"}),
    )
    .unwrap_err();
    assert_eq!(bad_revision["code"], "invalid_revision");
    // Still serving, nothing written.
    let got = invoke(&a, "get_snapshot", json!({"topic": "settings"})).unwrap();
    assert_eq!(got["data"]["theme"], "light");
}

#[test]
fn windows_are_limited_to_their_configured_topics() {
    let app = app_with_windows(json!({"prefs": ["settings"], "*": ["public:*"]}));
    let prefs = window(&app, "prefs");
    let other = window(&app, "other");
    assert!(invoke(&prefs, "get_snapshot", json!({"topic": "settings"})).is_ok());
    assert_eq!(
        invoke(&prefs, "get_snapshot", json!({"topic": "public:news"})).unwrap_err()["code"],
        "forbidden"
    );
    assert_eq!(
        invoke(&other, "get_snapshot", json!({"topic": "settings"})).unwrap_err()["code"],
        "forbidden"
    );
    assert_eq!(
        invoke(
            &other,
            "set",
            json!({"topic": "settings", "data": {"theme": "hack", "volume": 0}})
        )
        .unwrap_err()["code"],
        "forbidden"
    );
    assert!(invoke(&other, "get_snapshot", json!({"topic": "public:news"})).is_ok());
}

#[test]
fn revisions_continue_after_the_app_restarts_on_the_same_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let app = app(Builder::new()
            .storage_dir(dir.path())
            .topic("settings", Settings::default));
        let a = window(&app, "a");
        let written = invoke(
            &a,
            "set",
            json!({"topic": "settings", "data": {"theme": "dark", "volume": 9}}),
        )
        .unwrap();
        app.cleanup_before_exit();
        written["revision"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let app = app(Builder::new()
        .storage_dir(dir.path())
        .topic("settings", Settings::default));
    let a = window(&app, "a");
    let got = invoke(&a, "get_snapshot", json!({"topic": "settings"})).unwrap();
    assert_eq!(got["revision"], first.to_string());
    assert_eq!(got["data"]["theme"], "dark");
    let next = invoke(
        &a,
        "set",
        json!({"topic": "settings", "data": {"theme": "light", "volume": 1}}),
    )
    .unwrap();
    assert_eq!(next["revision"], (first + 1).to_string());
}

#[test]
fn plugin_commands_follow_the_capabilities_reading_by_default_writing_opt_in() {
    // What a capability with `state-sync:default` grants: reading only.
    let context = context_granting(&["get_snapshot"]);
    let app = mock_builder()
        .plugin(
            Builder::new()
                .in_memory()
                .topic("settings", Settings::default)
                .build(),
        )
        .build(context)
        .unwrap();
    let a = window(&app, "a");
    let got = invoke(
        &a,
        "plugin:state-sync|get_snapshot",
        json!({"topic": "settings"}),
    )
    .unwrap();
    assert_eq!(got["data"], json!({"theme": "", "volume": 0}));
    let denied = invoke(
        &a,
        "plugin:state-sync|set",
        json!({"topic": "settings", "data": {"theme": "x", "volume": 1}}),
    )
    .unwrap_err();
    assert!(denied.as_str().unwrap().contains("not allowed"), "{denied}");
}

#[tauri::command]
fn greet(name: String) -> String {
    format!("hello {name}")
}

/// A window whose capability grants only `grants`, with the un-prefixed
/// commands registered next to one of the app's own.
fn app_granting(grants: &[&str]) -> App<MockRuntime> {
    mock_builder()
        .plugin(
            Builder::new()
                .in_memory()
                .topic("settings", Settings::default)
                .build(),
        )
        .invoke_handler(tauri_plugin_state_sync::app_commands![greet])
        .build(context_granting(grants))
        .unwrap()
}

#[test]
fn un_prefixed_commands_are_guarded_by_the_plugin_permissions() {
    // Reading only: `set` is refused under both names, and nothing is written.
    let app = app_granting(&["get_snapshot"]);
    let seen = events(&app);
    let a = window(&app, "a");
    let write = json!({"topic": "settings", "data": {"theme": "x", "volume": 1}});
    let denied = invoke(&a, "set", write.clone()).unwrap_err();
    assert_eq!(denied["code"], "not_allowed", "{denied}");
    assert!(
        denied["message"]
            .as_str()
            .unwrap()
            .contains("state-sync:allow-set"),
        "{denied}"
    );
    assert!(invoke(&a, "plugin:state-sync|set", write).is_err());
    let got = invoke(&a, "get_snapshot", json!({"topic": "settings"})).unwrap();
    assert_eq!(got["data"], json!({"theme": "", "volume": 0}));
    assert!(seen.lock().unwrap().is_empty(), "nothing was written");

    // No reading either: `get_snapshot` is refused too.
    let app = app_granting(&[]);
    let a = window(&app, "a");
    let denied = invoke(&a, "get_snapshot", json!({"topic": "settings"})).unwrap_err();
    assert_eq!(denied["code"], "not_allowed", "{denied}");
    assert!(
        invoke(
            &a,
            "plugin:state-sync|get_snapshot",
            json!({"topic": "settings"})
        )
        .is_err()
    );
}

#[test]
fn app_commands_compose_with_the_apps_own_commands() {
    let app = app_granting(READ_WRITE);
    let a = window(&app, "a");
    assert_eq!(
        invoke(&a, "greet", json!({"name": "window"})).unwrap(),
        "hello window"
    );
    let written = invoke(
        &a,
        "set",
        json!({"topic": "settings", "data": {"theme": "dark", "volume": 2}}),
    )
    .unwrap();
    let got = invoke(&a, "get_snapshot", json!({"topic": "settings"})).unwrap();
    assert_eq!(got["revision"], written["revision"]);
}

/// An app where `prefs` may read `settings` and every window `public:*`.
fn limited_app() -> App<MockRuntime> {
    app_with_windows(json!({"prefs": ["settings", "public:*"], "*": ["public:*"]}))
}

/// An app with topics `settings` and `public:news` and the plugin
/// configuration's `windows` section.
fn app_with_windows(windows: Value) -> App<MockRuntime> {
    let mut context = context_granting(READ_WRITE);
    context
        .config_mut()
        .plugins
        .0
        .insert("state-sync".into(), json!({ "windows": windows }));
    mock_builder()
        .plugin(
            Builder::new()
                .in_memory()
                .topic("settings", Settings::default)
                .json_topic("public:news", json!([]))
                .build(),
        )
        .invoke_handler(tauri_plugin_state_sync::app_commands![])
        .build(context)
        .unwrap()
}

/// A channel as the `listen` command receives one, recording payloads.
fn recording_channel() -> (
    tauri::ipc::Channel<tauri_plugin_state_sync::InvalidationPayload>,
    Arc<Mutex<Vec<Value>>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let channel = tauri::ipc::Channel::new(move |body| {
        let tauri::ipc::InvokeResponseBody::Json(json) = body else {
            panic!("not JSON");
        };
        log.lock()
            .unwrap()
            .push(serde_json::from_str(&json).unwrap());
        Ok(())
    });
    (channel, seen)
}

#[test]
fn invalidations_reach_only_windows_that_may_read_the_topic() {
    let app = limited_app();
    let events = events(&app);
    let prefs = window(&app, "prefs");
    let other = window(&app, "other");
    let (prefs_channel, to_prefs) = recording_channel();
    let (other_channel, to_other) = recording_channel();
    app.state_sync().listen("prefs", prefs_channel);
    app.state_sync().listen("other", other_channel);

    let settings = invoke(
        &prefs,
        "set",
        json!({"topic": "settings", "data": {"theme": "secret", "volume": 1}}),
    )
    .unwrap();
    // Limited to `prefs`: its channel only, never a Tauri event (which any
    // window's global `listen` would receive).
    let expected =
        json!({"topic": "settings", "revision": settings["revision"], "sourceId": "prefs"});
    assert_eq!(to_prefs.lock().unwrap().as_slice(), [expected]);
    assert!(to_other.lock().unwrap().is_empty(), "leaked to `other`");
    assert!(events.lock().unwrap().is_empty(), "leaked as an event");

    // Readable by every window: an event, and every channel.
    let news = invoke(&other, "set", json!({"topic": "public:news", "data": [1]})).unwrap();
    let expected =
        json!({"topic": "public:news", "revision": news["revision"], "sourceId": "other"});
    assert_eq!(
        events.lock().unwrap().as_slice(),
        std::slice::from_ref(&expected)
    );
    assert_eq!(
        to_other.lock().unwrap().as_slice(),
        std::slice::from_ref(&expected)
    );
    assert_eq!(to_prefs.lock().unwrap().len(), 2);
}

#[test]
fn listen_and_unlisten_through_the_ipc_path() {
    let app = limited_app();
    let prefs = window(&app, "prefs");
    let other = window(&app, "other");
    let id = invoke(
        &prefs,
        "plugin:state-sync|listen",
        json!({"onEvent": "__CHANNEL__:41"}),
    )
    .unwrap();
    assert!(id.as_u64().unwrap() > 0, "{id}");
    // Another window cannot close it; its own window can, once.
    let by_other = invoke(&other, "plugin:state-sync|unlisten", json!({"id": id})).unwrap();
    assert_eq!(by_other, false);
    let closed = invoke(&prefs, "plugin:state-sync|unlisten", json!({"id": id})).unwrap();
    assert_eq!(closed, true);
    let again = invoke(&prefs, "plugin:state-sync|unlisten", json!({"id": id})).unwrap();
    assert_eq!(again, false);
}

/// Runs `node` on a script in `tests/js`; `false` when node is missing and
/// `STATESYNC_SKIP_NODE_TESTS=1` says to skip (without it, a missing node
/// fails the test).
fn node(script: &str, args: &[&std::path::Path]) -> Option<std::process::Output> {
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("STATESYNC_SKIP_NODE_TESTS").is_some_and(|v| v == "1"),
            "node not found: install Node.js, or set STATESYNC_SKIP_NODE_TESTS=1 to skip"
        );
        eprintln!("node not found; skipped (STATESYNC_SKIP_NODE_TESTS=1)");
        return None;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/js")
        .join(script);
    let out = std::process::Command::new("node")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out)
}

#[test]
fn the_javascript_listen_adapter_has_the_shape_of_tauris_listen() {
    if let Some(out) = node("listen.mjs", &[]) {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    }
}

/// Feeds the emitted payloads and `get_snapshot` answers to a JavaScript
/// engine implementing the revision gate.
#[test]
fn a_javascript_engine_converges_on_what_the_plugin_emits() {
    let app = settings_app();
    let seen = events(&app);
    let a = window(&app, "a");
    let b = window(&app, "b");
    let initial = invoke(&b, "get_snapshot", json!({"topic": "settings"})).unwrap();
    let mut steps = Vec::new();
    for i in 0..5u8 {
        let writer = if i % 2 == 0 { &a } else { &b };
        invoke(
            writer,
            "set",
            json!({"topic": "settings", "data": {"theme": format!("t{i}"), "volume": i}}),
        )
        .unwrap();
        let event = seen.lock().unwrap().last().cloned().unwrap();
        let snapshot = invoke(&b, "get_snapshot", json!({"topic": "settings"})).unwrap();
        steps.push(json!({"event": event, "snapshot": snapshot}));
        // A duplicate and a stale event, as a lossy transport delivers them.
        steps.push(json!({"event": event, "snapshot": snapshot}));
        steps.push(json!({"event": {"topic": "settings", "revision": "0"}, "snapshot": snapshot}));
    }
    let dir = tempfile::tempdir().unwrap();
    let transcript = dir.path().join("transcript.json");
    std::fs::write(
        &transcript,
        json!({"topic": "settings", "initial": initial, "steps": steps}).to_string(),
    )
    .unwrap();
    let Some(out) = node("gate.mjs", &[&transcript]) else {
        return;
    };
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = invoke(&a, "get_snapshot", json!({"topic": "settings"})).unwrap();
    assert_eq!(summary["revision"], last["revision"]);
    assert_eq!(summary["state"], json!({"theme": "t4", "volume": 4}));
    // One fetch at start, then one per new revision: duplicates and stale
    // events cost nothing.
    assert_eq!(summary["fetches"], 6);
    assert_eq!(summary["applied"], 6);
}
