//! How a cached snapshot is laid out in a storage record.
//!
//! ```text
//! SSC1 {"schema":2,"savedAtMs":1764052604000,"codec":"zstd","crc32":"9a0b1c2d","len":812}\n<payload>
//! ```
//!
//! The payload is the value's JSON, compressed by `codec`; the checksum and
//! length cover the payload bytes exactly as stored. The metadata travels
//! inside the record, so schema checks, migrations and TTL work on every
//! storage backend.

use serde::{Deserialize, Serialize};

use crate::error::Error;

const MAGIC: &[u8] = b"SSC1 ";

/// How cached payloads are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Compression {
    /// Stored as JSON (default).
    #[default]
    None,
    /// Compressed with zstd at `level` (1–22; 3 is a good default).
    #[cfg(feature = "zstd")]
    Zstd {
        /// The zstd compression level.
        level: i32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Codec {
    None,
    Zstd,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Header {
    pub(crate) schema: u32,
    pub(crate) saved_at_ms: u64,
    codec: Codec,
    #[serde(with = "hex32")]
    crc32: u32,
    len: usize,
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:08x}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let s = String::deserialize(d)?;
        u32::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

/// What [`encode`] reports besides the bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Encoded {
    pub(crate) json_bytes: usize,
    pub(crate) stored_bytes: usize,
}

pub(crate) fn encode(
    json: &[u8],
    schema: u32,
    saved_at_ms: u64,
    compression: Compression,
) -> Result<(Vec<u8>, Encoded), Error> {
    let (codec, payload) = match compression {
        Compression::None => (Codec::None, json.to_vec()),
        #[cfg(feature = "zstd")]
        Compression::Zstd { level } => (
            Codec::Zstd,
            zstd::bulk::compress(json, level).map_err(Error::Compression)?,
        ),
    };
    let header = Header {
        schema,
        saved_at_ms,
        codec,
        crc32: crc32fast::hash(&payload),
        len: payload.len(),
    };
    let header = serde_json::to_vec(&header).map_err(Error::Encode)?;
    let mut out = Vec::with_capacity(MAGIC.len() + header.len() + 1 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&header);
    out.push(b'\n');
    out.extend_from_slice(&payload);
    let stats = Encoded {
        json_bytes: json.len(),
        stored_bytes: out.len(),
    };
    Ok((out, stats))
}

/// Checks and unpacks a stored record: its header and the value's JSON.
pub(crate) fn decode(stored: &[u8]) -> Result<(Header, Vec<u8>), Error> {
    let corrupt = |reason: &str| Error::Corrupt {
        reason: reason.to_owned(),
    };
    let rest = stored
        .strip_prefix(MAGIC)
        .ok_or_else(|| corrupt("not a state-sync cache record (bad magic)"))?;
    let newline = rest
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no header line (truncated?)"))?;
    let header: Header = serde_json::from_slice(&rest[..newline])
        .map_err(|e| corrupt(&format!("bad header: {e}")))?;
    let payload = &rest[newline + 1..];
    if payload.len() != header.len {
        return Err(corrupt(&format!(
            "length mismatch: header says {} bytes, found {} (truncated?)",
            header.len,
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != header.crc32 {
        return Err(corrupt("checksum mismatch"));
    }
    let json = match header.codec {
        Codec::None => payload.to_vec(),
        #[cfg(feature = "zstd")]
        Codec::Zstd => {
            zstd::stream::decode_all(payload).map_err(|e| corrupt(&format!("zstd: {e}")))?
        }
        #[cfg(not(feature = "zstd"))]
        Codec::Zstd => {
            return Err(corrupt(
                "compressed with zstd, but the `zstd` feature is off",
            ));
        }
    };
    Ok((header, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_detection() {
        let json = br#"{"theme":"dark \u00e9\u2603"}"#;
        let mut modes = vec![Compression::None];
        #[cfg(feature = "zstd")]
        modes.push(Compression::Zstd { level: 3 });
        for compression in modes {
            let (bytes, _) = encode(json, 2, 1234, compression).unwrap();
            let (header, back) = decode(&bytes).unwrap();
            assert_eq!((header.schema, header.saved_at_ms), (2, 1234));
            assert_eq!(back, json);

            let mut flipped = bytes.clone();
            *flipped.last_mut().unwrap() ^= 0x40;
            assert!(matches!(decode(&flipped), Err(Error::Corrupt { .. })));
            assert!(matches!(
                decode(&bytes[..bytes.len() - 1]),
                Err(Error::Corrupt { .. })
            ));
        }
        assert!(matches!(decode(b"garbage"), Err(Error::Corrupt { .. })));
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn zstd_really_shrinks_what_is_stored() {
        let json = serde_json::to_vec(&vec!["the same words again"; 200]).unwrap();
        let (plain, _) = encode(&json, 1, 0, Compression::None).unwrap();
        let (packed, stats) = encode(&json, 1, 0, Compression::Zstd { level: 3 }).unwrap();
        assert!(
            packed.len() * 10 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
        assert_eq!(stats.stored_bytes, packed.len());
    }
}
