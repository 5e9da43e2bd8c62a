//! Generates the plugin's command permissions.

const COMMANDS: &[&str] = &["get_snapshot", "set", "listen", "unlisten"];

fn main() {
    tauri_plugin::Builder::new(COMMANDS).build();
}
