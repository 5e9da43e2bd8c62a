//! Two processes keep one struct in sync through a hub.
//!
//! ```text
//! statesync serve                       # terminal 1: the hub
//! cargo run -p settings-sync -- watch   # terminal 2: a replica, prints every change
//! cargo run -p settings-sync -- theme dark    # terminal 3: a change, from another process
//! cargo run -p settings-sync -- bigger        # compare-and-set: font size + 1
//! ```
//!
//! With no `--socket`, it reaches the hub where `statesync serve` listens by
//! default (`Endpoint::default()`; a named pipe on Windows).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use state_sync::SyncHandle;
use state_sync_hub::SharedTopic;
use state_sync_net::{Client, ClientOptions, Endpoint};

/// The state both processes share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    theme: String,
    font_size: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            theme: "light".into(),
            font_size: 14,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let endpoint = match args.iter().position(|a| a == "--socket") {
        Some(i) => {
            let path = args.get(i + 1).ok_or("--socket needs a path")?.clone();
            args.drain(i..=i + 1);
            Endpoint::Unix(path.into())
        }
        None => Endpoint::default(),
    };
    let client = Client::connect(endpoint, ClientOptions::new("settings-sync"));
    let settings = client.topic::<Settings>("settings")?;
    match args.first().map(String::as_str) {
        Some("watch") => watch(settings).await,
        Some("theme") => {
            let theme = args.get(1).ok_or("theme needs a name")?.clone();
            change(&settings, move |s| s.theme = theme.clone()).await
        }
        Some("bigger") => change(&settings, |s| s.font_size += 1).await,
        _ => Err("usage: settings-sync [--socket PATH] watch | theme NAME | bigger".into()),
    }
}

/// A replica: prints the settings each time another process changes them.
async fn watch(settings: state_sync_net::RemoteTopic<Settings>) -> Result<(), BoxError> {
    let (applier, mut current) = tokio::sync::watch::channel(Settings::default());
    let replica = SyncHandle::builder(settings, applier).build();
    // Waits (bounded) for the hub and for the topic to exist.
    replica.start_within(Duration::from_secs(60)).await?;
    loop {
        println!("{:?}", *current.borrow_and_update());
        tokio::select! {
            changed = current.changed() => changed?,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    replica.stop().await;
    Ok(())
}

/// One compare-and-set change, from any process; creates the topic first
/// when no one has yet.
async fn change(
    settings: &impl SharedTopic<Settings>,
    f: impl FnMut(&mut Settings) + Send + Clone + 'static,
) -> Result<(), BoxError> {
    let revision = match settings.update_in_place(f.clone()).await {
        Err(e) if e.code() == "unknown_topic" => {
            let mut first = Settings::default();
            f.clone()(&mut first);
            settings.replace(first).await?
        }
        other => other?,
    };
    println!("revision {revision}");
    Ok(())
}
