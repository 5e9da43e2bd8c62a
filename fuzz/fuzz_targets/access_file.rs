//! The access file (TOML): parsing never panics, and authenticating against
//! what parsed never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use state_sync_net::AccessConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(access) = AccessConfig::from_toml(text) {
        let _ = access.authenticate(None);
        let _ = access.authenticate(Some("token"));
        let _ = access.authenticate(Some(text));
    }
});
