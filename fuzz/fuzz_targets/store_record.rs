//! A record file's bytes: decoding never panics, and a decoded record
//! survives an encode-decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use state_sync_storage::fuzzing::{decode_record, encode_record};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = decode_record(data) {
        let again = encode_record(&record);
        assert_eq!(decode_record(&again).unwrap(), record);
    }
});
