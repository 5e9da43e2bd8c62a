//! Bytes off a socket: length-delimited frames, each decoded as a client and
//! as a server message. Nothing panics; what decodes re-encodes and decodes
//! the same way.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use state_sync_net::protocol::{ClientMessage, ServerMessage};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

fn check(frame: &[u8]) {
    if let Ok(message) = ClientMessage::decode(frame) {
        let again = serde_json::to_vec(&message).expect("a decoded message encodes");
        let decoded = ClientMessage::decode(&again).expect("an encoded message decodes");
        assert_eq!(format!("{message:?}"), format!("{decoded:?}"));
    }
    if let Ok(message) = ServerMessage::decode(frame) {
        let again = serde_json::to_vec(&message).expect("a decoded message encodes");
        ServerMessage::decode(&again).expect("an encoded message decodes");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut codec = LengthDelimitedCodec::builder()
        .max_frame_length(1 << 20)
        .new_codec();
    let mut buffer = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buffer) {
        check(&frame);
    }
});
