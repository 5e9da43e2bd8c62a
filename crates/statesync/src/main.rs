//! `statesync`: run a hub, read and write its topics, watch them replicate.

mod bench;
mod bench_plot;
mod bench_redis;
mod bench_sockets;
mod commands;
mod config;
mod demo;
mod metrics_endpoint;
mod output;
mod platform;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit codes, documented in `--help`.
pub(crate) mod exit {
    /// Success.
    pub(crate) const OK: u8 = 0;
    /// The hub could not be reached, or another runtime failure.
    pub(crate) const FAILURE: u8 = 1;
    // 2, bad command-line usage, is clap's own exit code.
    /// A compare-and-set (`set --expect`) found another revision.
    pub(crate) const CONFLICT: u8 = 3;
    /// The input was refused: invalid JSON, invalid topic or revision, data
    /// that does not fit the topic, too large, unknown topic.
    pub(crate) const BAD_INPUT: u8 = 4;
    /// The token was refused, or the topic is forbidden to it.
    pub(crate) const DENIED: u8 = 5;
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the hub could not be reached, or another failure
  2  bad command-line usage
  3  conflict: `set --expect` found another revision
  4  input refused: invalid JSON, topic or revision; data too large or not fitting the topic; unknown topic; too many topics
  5  access denied: bad token, or topic forbidden to it";

/// Keep state consistent across processes: a hub (the source of truth) and
/// replicas that follow it.
#[derive(Debug, Parser)]
#[command(name = "statesync", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Log level or filter (e.g. `info`, `debug`, `state_sync_net=trace`).
    #[arg(long, global = true, default_value = "warn", env = "STATESYNC_LOG")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub on the embedded crash-safe file store.
    #[command(after_help = "Examples:
  statesync serve
  STATESYNC_TOKEN=s3cret statesync serve --data-dir ./state --ws 127.0.0.1:7700
  statesync serve --access access.toml --log info
  statesync serve --local state-sync --token-file ~/.config/state-sync/token")]
    Serve(commands::ServeArgs),
    /// Print a topic's `{revision, data}` as JSON.
    #[command(after_help = "Examples:
  statesync get settings
  STATESYNC_TOKEN=s3cret statesync get settings --url ws://127.0.0.1:7700")]
    Get(commands::GetArgs),
    /// Write a topic (JSON from the argument, `--file`, or stdin).
    #[command(after_help = format!("Examples:
  statesync set settings '{{\"theme\":\"dark\"}}'
  statesync set settings --file settings.json --expect 42
  echo '{{\"theme\":\"light\"}}' | statesync set settings

{EXIT_CODES}"))]
    Set(commands::SetArgs),
    /// Follow topics through the sync engine; print each applied snapshot as
    /// one JSON line `{topic, revision, data}`. Survives hub restarts.
    #[command(after_help = "Examples:
  statesync watch settings
  statesync watch settings cart --url ws://127.0.0.1:7700")]
    Watch(commands::WatchArgs),
    /// Show the running hub: its topics (revision, size, subscribers),
    /// connections, counters, and whether its storage fails.
    #[command(after_help = "Examples:
  statesync status
  statesync status --json --url ws://127.0.0.1:7700")]
    Status(commands::StatusArgs),
    /// Load generator: replicas follow a topic while a writer writes at a
    /// steady rate; prints convergence p50/p99, CPU and bytes per write.
    /// Against the hub named by the flags, or a temporary one.
    #[command(after_help = "Examples:
  statesync bench
  statesync bench --clients 1000 --rate 50 --payload-bytes 16384
  statesync bench --url ws://127.0.0.1:7700 --clients 200 --json")]
    Bench(bench::BenchArgs),
    /// One command, nothing to configure: a hub, replica processes, writers,
    /// a conflict and a hub restart, shown live; ends with a summary.
    #[command(after_help = "Examples:
  statesync demo
  statesync demo --replicas 5 --writes 200")]
    Demo(demo::DemoArgs),
}

/// How to reach a hub; shared by `get`, `set` and `watch`.
#[derive(Debug, Clone, Args)]
pub(crate) struct HubArgs {
    /// The hub's Unix socket (default: `hub.sock` in the data directory; on
    /// Windows the default is a named pipe named after the data directory).
    #[arg(long, env = "STATESYNC_SOCKET", conflicts_with_all = ["url", "local"])]
    socket: Option<PathBuf>,
    /// The hub's WebSocket URL, e.g. `ws://127.0.0.1:7700`.
    #[arg(long, env = "STATESYNC_URL", conflicts_with = "local")]
    url: Option<String>,
    /// The hub's named local socket (`serve --local NAME`).
    #[arg(long, value_name = "NAME")]
    local: Option<String>,
    #[command(flatten)]
    token: TokenArgs,
    /// The data directory whose socket to use.
    #[arg(long, env = "STATESYNC_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl HubArgs {
    /// Whether a hub was named (flag or environment), rather than left to
    /// the default data directory's socket.
    pub(crate) fn names_a_hub(&self) -> bool {
        self.socket.is_some()
            || self.url.is_some()
            || self.local.is_some()
            || self.data_dir.is_some()
    }
}

/// Where a token comes from; shared by `serve` (a token with full access,
/// beside `--access` entries) and the commands that reach a hub.
#[derive(Debug, Clone, Args)]
pub(crate) struct TokenArgs {
    /// Access token. A command line is visible to every local user in the
    /// process list: prefer the `STATESYNC_TOKEN` environment variable or
    /// `--token-file`.
    #[arg(long, env = "STATESYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file whose first line is the access token.
    #[arg(
        long,
        value_name = "FILE",
        env = "STATESYNC_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
}

/// A shared storage for the hub (several hubs on it behave as one), instead
/// of the data directory's file store; shared by `serve` and `demo`.
#[derive(Debug, Clone, Args)]
pub(crate) struct EngineArgs {
    /// Keep the topics in Redis, shared with every other hub on it:
    /// `redis://HOST:PORT[/DB]`. With a password, give the URL through
    /// `STATESYNC_REDIS_URL`, so it stays out of the process list.
    #[arg(
        long,
        value_name = "URL",
        env = "STATESYNC_REDIS_URL",
        hide_env_values = true
    )]
    redis: Option<String>,
    /// Keep the topics in PostgreSQL, shared with every other hub on it: a
    /// `postgresql://` URL or `host=… port=… user=… dbname=…`. With a
    /// password, give it through `STATESYNC_POSTGRES_URL`, so it stays out
    /// of the process list.
    #[arg(
        long,
        value_name = "CONFIG",
        env = "STATESYNC_POSTGRES_URL",
        hide_env_values = true,
        conflicts_with = "redis"
    )]
    postgres: Option<String>,
}

/// The default data directory: `state-sync` under the user's data
/// directory.
pub(crate) fn default_data_dir() -> PathBuf {
    state_sync_net::Endpoint::default_data_dir()
}

/// The log filter from `--log`. The WebSocket library's own traces print
/// frame payloads, tokens included: they stay at `info` unless the filter
/// names them explicitly.
fn log_filter(spec: &str) -> tracing_subscriber::EnvFilter {
    let filter = tracing_subscriber::EnvFilter::try_new(spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    if spec.contains("tungstenite") {
        return filter;
    }
    ["tungstenite=info", "tokio_tungstenite=info"]
        .into_iter()
        .filter_map(|directive| directive.parse().ok())
        .fold(filter, tracing_subscriber::EnvFilter::add_directive)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&cli.log))
        .with_writer(std::io::stderr)
        // Colours only for a terminal, not for log files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Its report of a failed write is an `eprintln!`, which panics on
        // the same broken stderr: logging must never stop serving.
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            output::complain(format_args!("statesync: cannot start the runtime: {e}"));
            return ExitCode::from(exit::FAILURE);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => commands::serve(args).await,
            Command::Get(args) => commands::get(args).await,
            Command::Set(args) => commands::set(args).await,
            Command::Watch(args) => commands::watch(args).await,
            Command::Status(args) => commands::status(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Demo(args) => demo::run(args).await,
        }
    });
    ExitCode::from(code)
}
