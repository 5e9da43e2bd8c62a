//! The cache's stored bytes (header, codec, checksum, maybe zstd): decoding
//! never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = state_sync_cache::fuzzing::decode(data);
});
