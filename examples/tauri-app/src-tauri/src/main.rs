//! Two windows sharing a `settings` topic: the Rust side is the source of
//! truth (persisted under the app's data directory); each window follows it
//! with a revision gate and writes with compare-and-set.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
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

fn main() {
    tauri::Builder::default()
        .plugin(
            tauri_plugin_state_sync::Builder::new()
                .topic("settings", Settings::default)
                .build(),
        )
        .run(tauri::generate_context!())
        .expect("error while running the state-sync example");
}
