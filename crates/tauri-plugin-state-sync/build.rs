//! Generates the plugin's command permissions.

const COMMANDS: &[&str] = &["get_snapshot", "set"];

fn main() {
    tauri_plugin::Builder::new(COMMANDS).build();
}
