//! `serve`, `get`, `set`, `watch`: thin layers over the library crates.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde_json::Value;
use state_sync::{RetryPolicy, Revision, SyncHandle, applier};
use state_sync_hub::Hub;
use state_sync_net::{
    AccessConfig, Client, ClientAccess, ClientOptions, ConnectionStatus, Endpoint,
    Error as ClientError, ErrorCode, HubStatus, Server,
};
use state_sync_postgres::PostgresStorage;
use state_sync_redis::RedisStorage;
use state_sync_storage::{AnyStorage, Durability, FileStorage};

use crate::config::ServeConfig;
use crate::output::{complain, say};
use crate::platform::{self, shutdown_signal};
use crate::{EngineArgs, HubArgs, TokenArgs, default_data_dir, exit};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Every setting in one TOML file (see `docs/CONFIG.md`); the flags
    /// below override it.
    #[arg(long, value_name = "FILE", env = "STATESYNC_CONFIG")]
    config: Option<PathBuf>,
    /// Where the store and the socket live (default: `state-sync` under the
    /// user's data directory).
    #[arg(long, env = "STATESYNC_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The Unix socket to listen on (default: `hub.sock` in the data
    /// directory; on Windows the default is a named pipe named after the
    /// data directory).
    #[arg(long, env = "STATESYNC_SOCKET")]
    socket: Option<PathBuf>,
    /// Also listen for WebSocket clients on this address, e.g.
    /// `127.0.0.1:7700` (port 0 picks a free port).
    #[arg(long)]
    ws: Option<String>,
    /// Also listen on a named local socket (a named pipe on Windows, an
    /// abstract socket on Linux; no file permissions: use tokens).
    #[arg(long, value_name = "NAME")]
    local: Option<String>,
    /// Serve Prometheus metrics at `/metrics` and a health check at
    /// `/healthz` on this address, e.g. `127.0.0.1:9100`.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Access rules: a TOML file with `[[clients]]` entries (token, read,
    /// write patterns).
    #[arg(long, env = "STATESYNC_ACCESS")]
    access: Option<PathBuf>,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Skip `fsync`: survives a crash of the process, not of the machine.
    #[arg(long)]
    no_fsync: bool,
}

/// The hub's live view: one HTML page with the JavaScript client inlined,
/// built by `npm run build` in `clients/js` (checked in CI).
const LIVE_VIEW: &str = include_str!("../assets/live.html");

pub(crate) fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    complain(format_args!("statesync: {message}"));
    code
}

/// The hub's storage: the shared engine named by the flags or the config
/// file, else the file store in `data_dir`.
async fn open_storage(
    args: &ServeArgs,
    config: &ServeConfig,
    data_dir: &Path,
) -> Result<AnyStorage, u8> {
    let fsync = !args.no_fsync && config.store.fsync.unwrap_or(true);
    let durability = if fsync {
        Durability::Fsync
    } else {
        Durability::NoFsync
    };
    // An engine on the command line replaces the file's, whichever it is.
    let (redis, postgres) = if args.engine.redis.is_some() || args.engine.postgres.is_some() {
        (&args.engine.redis, &args.engine.postgres)
    } else {
        (&config.store.redis, &config.store.postgres)
    };
    let shared = match (redis, postgres) {
        (Some(_), Some(_)) => {
            return Err(fail(
                exit::BAD_INPUT,
                "[store] names both redis and postgres; keep one",
            ));
        }
        (Some(url), None) => Some(RedisStorage::connect(url).await.map(AnyStorage::new)),
        (None, Some(config)) => Some(PostgresStorage::connect(config).await.map(AnyStorage::new)),
        (None, None) => None,
    };
    match shared {
        Some(shared) => {
            if let Err(e) = platform::create_private_dir(data_dir) {
                return Err(fail(
                    exit::FAILURE,
                    format!("cannot create {}: {e}", data_dir.display()),
                ));
            }
            shared.map_err(|e| fail(exit::FAILURE, state_sync::ErrorChain(&e)))
        }
        // Creates the data directory too, `0700` on Unix (the socket lives
        // there).
        None => FileStorage::open(data_dir.join("store"))
            .map(|s| AnyStorage::new(s.durability(durability)))
            .map_err(|e| fail(exit::FAILURE, state_sync::ErrorChain(&e))),
    }
}

/// Who may do what: `--access` (or else the file's `[access]` rules), plus
/// a full-access token from `--token`/`--token-file` (or else the file's).
fn access_rules(args: &ServeArgs, config: &ServeConfig) -> Result<AccessConfig, u8> {
    let mut access = match args.access.as_ref().or(config.access.file.as_ref()) {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| AccessConfig::from_toml(&text).map_err(|e| e.to_string()))
            .map_err(|e| fail(exit::BAD_INPUT, format!("{}: {e}", path.display())))?,
        None => AccessConfig::open(),
    };
    if args.access.is_none() {
        for client in &config.access.clients {
            access = access.with_client(client.clone());
        }
    }
    let token = if args.token.token.is_some() || args.token.token_file.is_some() {
        args.token.read()?
    } else {
        TokenArgs {
            token: config.access.token.clone(),
            token_file: config.access.token_file.clone(),
        }
        .read()?
    };
    if let Some(token) = token {
        access = access.with_client(ClientAccess::new(token).read("*").write("*"));
    }
    Ok(access)
}

pub(crate) async fn serve(args: ServeArgs) -> u8 {
    let config = match &args.config {
        Some(path) => match ServeConfig::read(path) {
            Ok(config) => {
                if config.holds_secrets() && platform::readable_by_others(path) {
                    tracing::warn!(
                        file = %path.display(),
                        "the config file holds secrets and other users may read it; \
                         make it private (chmod 600)"
                    );
                }
                config
            }
            Err(e) => return fail(exit::BAD_INPUT, e),
        },
        None => ServeConfig::default(),
    };
    // Before anything that reports: the libraries register their counters
    // with the recorder at first use.
    let metrics_addr = args.metrics.clone().or(config.listen.metrics.clone());
    let recorder = match &metrics_addr {
        Some(_) => match crate::metrics_endpoint::install_recorder() {
            Ok(handle) => Some(handle),
            Err(e) => return fail(exit::FAILURE, format!("cannot record metrics: {e}")),
        },
        None => None,
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| config.store.data_dir.clone())
        .unwrap_or_else(default_data_dir);
    let storage = match open_storage(&args, &config, &data_dir).await {
        Ok(storage) => storage,
        Err(code) => return code,
    };
    let access = match access_rules(&args, &config) {
        Ok(access) => access,
        Err(code) => return code,
    };
    let hub = config.hub.apply(Hub::builder().storage(storage)).build();
    let topics = match hub.open_stored_topics().await {
        Ok(topics) => topics,
        Err(e) => {
            return fail(
                exit::FAILURE,
                format!("cannot open the store: {}", state_sync::ErrorChain(&e)),
            );
        }
    };
    let hub_topics_damaged: Vec<String> = hub
        .damaged_topics()
        .into_iter()
        .map(|(topic, _)| topic.as_str().to_owned())
        .collect();
    let server = Server::with_config(hub, config.server, access);
    let main_endpoint = args
        .socket
        .or(config.listen.socket)
        .map_or_else(|| platform::default_endpoint(&data_dir), Endpoint::Unix);
    if let Err(e) = platform::listen(&server, &main_endpoint).await {
        return fail(
            exit::FAILURE,
            format!("cannot listen on {main_endpoint}: {e}"),
        );
    }
    // The live view, on the WebSocket port: built from clients/js.
    server.serve_web_page(LIVE_VIEW);
    let websocket = match args.ws.as_ref().or(config.listen.websocket.as_ref()) {
        Some(addr) => match server.listen_websocket(addr.as_str()).await {
            Ok(addr) => Some(addr.to_string()),
            Err(e) => return fail(exit::FAILURE, format!("cannot listen on {addr}: {e}")),
        },
        None => None,
    };
    let mut local = Vec::new();
    if let Endpoint::Local(name) = &main_endpoint {
        local.push(name.clone());
    }
    if let Some(name) = args.local.as_ref().or(config.listen.local.as_ref()) {
        let extra = Endpoint::Local(name.clone());
        if let Err(e) = platform::listen(&server, &extra).await {
            return fail(exit::FAILURE, format!("cannot listen on {extra}: {e}"));
        }
        local.push(name.clone());
    }
    let metrics = match (metrics_addr, recorder) {
        (Some(addr), Some(handle)) => {
            match crate::metrics_endpoint::serve(&addr, handle, server.clone()).await {
                Ok(bound) => Some(format!("http://{bound}/metrics")),
                Err(e) => return fail(exit::FAILURE, format!("cannot listen on {addr}: {e}")),
            }
        }
        _ => None,
    };
    let ready = serde_json::json!({
        "event": "listening",
        "metrics": metrics,
        "socket": match &main_endpoint {
            Endpoint::Unix(path) => Some(path),
            _ => None,
        },
        "live_view": websocket.as_ref().map(|addr| format!("http://{addr}/")),
        "websocket": websocket,
        "local": local,
        "topics": topics.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        // Quarantined, refusing access; the log says why.
        "damaged": hub_topics_damaged,
    });
    say(ready);
    shutdown_signal().await;
    server.shutdown().await;
    say(serde_json::json!({"event": "stopped"}));
    exit::OK
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// The topic.
    topic: String,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Debug, Args)]
pub(crate) struct SetArgs {
    /// The topic.
    topic: String,
    /// The JSON value; `-` or nothing reads stdin.
    json: Option<String>,
    /// Read the JSON value from this file.
    #[arg(long, conflicts_with = "json")]
    file: Option<PathBuf>,
    /// Write only if the topic is still at this revision (compare-and-set).
    #[arg(long, value_name = "REVISION")]
    expect: Option<Revision>,
    #[command(flatten)]
    hub: HubArgs,
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// The topics.
    #[arg(required = true)]
    topics: Vec<String>,
    #[command(flatten)]
    hub: HubArgs,
}

pub(crate) fn endpoint(hub: &HubArgs) -> Endpoint {
    match (&hub.url, &hub.local, &hub.socket) {
        (Some(url), _, _) => Endpoint::WebSocket(url.clone()),
        (None, Some(name), _) => Endpoint::Local(name.clone()),
        (None, None, Some(socket)) => Endpoint::Unix(socket.clone()),
        (None, None, None) => {
            platform::default_endpoint(&hub.data_dir.clone().unwrap_or_else(default_data_dir))
        }
    }
}

impl TokenArgs {
    /// The token of `--token` (or `STATESYNC_TOKEN`), or the first line of
    /// `--token-file`.
    fn read(&self) -> Result<Option<String>, u8> {
        let Some(file) = &self.token_file else {
            return Ok(self.token.clone());
        };
        match std::fs::read_to_string(file) {
            Ok(text) => match text.lines().next().map(str::trim) {
                Some(token) if !token.is_empty() => Ok(Some(token.to_owned())),
                _ => Err(fail(
                    exit::BAD_INPUT,
                    format!("{}: no token on its first line", file.display()),
                )),
            },
            Err(e) => Err(fail(exit::BAD_INPUT, format!("{}: {e}", file.display()))),
        }
    }
}

pub(crate) fn options(hub: &HubArgs, client_id: &str) -> Result<ClientOptions, u8> {
    let mut options = ClientOptions::new(client_id).reconnect(
        RetryPolicy::default()
            .max_attempts(u32::MAX)
            .initial_delay(Duration::from_millis(50))
            .max_delay(Duration::from_secs(2))
            .jitter(true),
    );
    if let Some(token) = hub.token.read()? {
        options = options.token(token);
    }
    Ok(options)
}

/// Connects for a one-shot command: gives up after a few seconds.
async fn connect_once(hub: &HubArgs, client_id: &str) -> Result<Client, u8> {
    let endpoint = endpoint(hub);
    let client = Client::connect(endpoint.clone(), options(hub, client_id)?);
    match tokio::time::timeout(Duration::from_secs(5), client.wait_connected()).await {
        Ok(ConnectionStatus::Connected) => Ok(client),
        Ok(ConnectionStatus::Refused(why)) => {
            Err(fail(exit::DENIED, format!("refused by the hub: {why}")))
        }
        _ => Err(fail(
            exit::FAILURE,
            format!("cannot reach the hub at {endpoint} ({:?})", client.status()),
        )),
    }
}

fn exit_code(error: &ClientError) -> u8 {
    match error {
        ClientError::Conflict { .. } => exit::CONFLICT,
        ClientError::Json(_) => exit::BAD_INPUT,
        ClientError::Server { code, .. } => match code {
            ErrorCode::Unauthorized | ErrorCode::Forbidden => exit::DENIED,
            ErrorCode::BadRequest
            | ErrorCode::InvalidTopic
            | ErrorCode::UnknownTopic
            | ErrorCode::InvalidRevision
            | ErrorCode::TooLarge
            | ErrorCode::TooManyTopics
            | ErrorCode::InvalidData => exit::BAD_INPUT,
            _ => exit::FAILURE,
        },
        _ => exit::FAILURE,
    }
}

pub(crate) async fn get(args: GetArgs) -> u8 {
    let client = match connect_once(&args.hub, "statesync-get").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.get_json(&args.topic).await {
        Ok((revision, data)) => {
            let data = String::from_utf8_lossy(&data);
            say(format_args!(r#"{{"revision":"{revision}","data":{data}}}"#));
            exit::OK
        }
        Err(e) => fail(exit_code(&e), e),
    }
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print the status as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubArgs,
}

pub(crate) async fn status(args: StatusArgs) -> u8 {
    let client = match connect_once(&args.hub, "statesync-status").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.hub_status().await {
        Ok(status) if args.json => match serde_json::to_string(&status) {
            Ok(json) => {
                say(json);
                exit::OK
            }
            Err(e) => fail(exit::FAILURE, e),
        },
        Ok(status) => {
            say(status_table(&status));
            exit::OK
        }
        Err(e) => fail(exit_code(&e), e),
    }
}

/// The status as a human reads it: a summary, then one line per topic.
fn status_table(status: &HubStatus) -> String {
    use std::fmt::Write;
    let stats = &status.stats;
    let storage = match (&stats.storage_failure, status.shared_storage) {
        (Some(error), _) => format!("FAILING, reads may be stale: {error}"),
        (None, true) => "shared, ok".to_owned(),
        (None, false) => "ok".to_owned(),
    };
    let mut out = format!(
        "hub {}: storage {storage}\n\
         connections {}, subscriptions {}, writes {}\n\
         invalidations sent {} (coalesced {}), snapshots sent {} (inlined {})\n",
        status.server_id,
        stats.connections,
        stats.subscriptions,
        stats.writes,
        stats.invalidations_sent,
        stats.invalidations_coalesced,
        stats.snapshots_sent,
        stats.snapshots_inlined,
    );
    if let Some(process) = &status.process {
        let _ = writeln!(
            out,
            "process: CPU {:.2} s, resident {:.1} MiB",
            process.cpu_ms as f64 / 1e3,
            process.rss_bytes as f64 / f64::from(1 << 20)
        );
    }
    let width = status
        .topics
        .iter()
        .map(|t| t.topic.as_str().len())
        .chain([5])
        .max()
        .unwrap_or(5);
    let _ = writeln!(
        out,
        "\n{:<width$}  {:>16}  {:>9}  {:>11}",
        "TOPIC", "REVISION", "BYTES", "SUBSCRIBERS"
    );
    for topic in &status.topics {
        let _ = writeln!(
            out,
            "{:<width$}  {:>16}  {:>9}  {:>11}",
            topic.topic.as_str(),
            topic.revision.to_string(),
            topic.bytes,
            topic.subscribers
        );
    }
    for topic in &status.damaged_topics {
        let _ = writeln!(
            out,
            "{topic:<width$}  damaged: quarantined, see the hub's log"
        );
    }
    out.truncate(out.trim_end().len());
    out
}

pub(crate) async fn set(args: SetArgs) -> u8 {
    let json = match read_input(args.json.as_deref(), args.file.as_ref()) {
        Ok(json) => json,
        Err(e) => return fail(exit::BAD_INPUT, e),
    };
    if let Err(e) = serde_json::from_str::<Value>(&json) {
        return fail(exit::BAD_INPUT, format!("invalid JSON: {e}"));
    }
    let client = match connect_once(&args.hub, "statesync-set").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.set_json(&args.topic, json, args.expect).await {
        Ok(revision) => {
            say(format_args!(r#"{{"revision":"{revision}"}}"#));
            exit::OK
        }
        Err(ClientError::Conflict { current }) => fail(
            exit::CONFLICT,
            format!(
                "conflict: `{}` is at revision {current}, not {}; nothing was written",
                args.topic,
                args.expect.unwrap_or(Revision::ZERO)
            ),
        ),
        Err(e) => fail(exit_code(&e), e),
    }
}

fn read_input(json: Option<&str>, file: Option<&PathBuf>) -> Result<String, String> {
    match (json, file) {
        (_, Some(path)) => {
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
        }
        (Some(json), None) if json != "-" => Ok(json.to_owned()),
        _ => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .map_err(|e| format!("stdin: {e}"))?;
            Ok(input)
        }
    }
}

/// Prints one applied snapshot as a JSON line.
fn print_applied(topic: &str, revision: Revision, data: &Value) {
    say(serde_json::json!({"topic": topic, "revision": revision, "data": data}));
}

/// Starts a replica of `topic` that prints every applied snapshot; retries
/// `start` until the hub answers.
pub(crate) async fn start_watch(client: &Client, topic: &str) -> Result<SyncHandle, u8> {
    let remote = client
        .topic::<Value>(topic)
        .map_err(|e| fail(exit::BAD_INPUT, e))?;
    let name = topic.to_owned();
    let handle = SyncHandle::builder(
        remote.clone(),
        applier::from_fn(move |snapshot: state_sync::SnapshotEnvelope<Value>| {
            print_applied(&name, snapshot.revision, &snapshot.data);
            Ok::<(), std::convert::Infallible>(())
        }),
    )
    .retry(
        RetryPolicy::default()
            .max_attempts(20)
            .initial_delay(Duration::from_millis(50))
            .max_delay(Duration::from_secs(2)),
    )
    .on_error(|e| tracing::warn!("{e}"))
    .build();
    let mut delay = Duration::from_millis(100);
    loop {
        match handle.start().await {
            Ok(()) => return Ok(handle),
            Err(e) => {
                tracing::warn!(%topic, "start failed, retrying: {e}");
                if matches!(client.status(), ConnectionStatus::Refused(_)) {
                    return Err(fail(exit::DENIED, format!("refused by the hub: {e}")));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

pub(crate) async fn watch(args: WatchArgs) -> u8 {
    let options = match options(&args.hub, "statesync-watch") {
        Ok(options) => options,
        Err(code) => return code,
    };
    let client = Client::connect(endpoint(&args.hub), options);
    let mut handles = Vec::new();
    for topic in &args.topics {
        let started = tokio::select! {
            started = start_watch(&client, topic) => started,
            () = shutdown_signal() => return exit::OK,
        };
        match started {
            Ok(handle) => handles.push(handle),
            Err(code) => return code,
        }
    }
    shutdown_signal().await;
    for handle in handles {
        handle.stop().await;
    }
    exit::OK
}
