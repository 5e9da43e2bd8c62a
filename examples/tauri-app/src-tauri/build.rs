//! Generates the app's context (config, capabilities, assets).

fn main() {
    tauri_build::build();
}
