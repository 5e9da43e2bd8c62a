//! [`Revision`]: the monotonic version of a topic's state.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The version of a topic's state: a `u64` whose wire form is its canonical
/// decimal string (`"0"` or `[1-9][0-9]*`, at most `"18446744073709551615"`).
///
/// The string form keeps revisions exact in JavaScript, whose numbers lose
/// precision above 2^53. Ordering is numeric.
///
/// # Examples
///
/// ```
/// use state_sync::Revision;
///
/// let r: Revision = "42".parse()?;
/// assert_eq!(r.get(), 42);
/// assert_eq!(r.to_string(), "42");
/// assert!(r < r.next());
/// assert_eq!(serde_json::to_string(&r)?, r#""42""#);
///
/// // Non-canonical forms are rejected.
/// for bad in ["", "00", "01", "+1", " 1", "1.0", "-1", "12a", "18446744073709551616"] {
///     assert!(bad.parse::<Revision>().is_err(), "{bad:?}");
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision(u64);

impl Revision {
    /// Revision `0`: the state before any change.
    pub const ZERO: Revision = Revision(0);
    /// The largest revision, `18446744073709551615`.
    pub const MAX: Revision = Revision(u64::MAX);

    /// Wraps a number.
    #[must_use]
    pub const fn new(value: u64) -> Self {
        Revision(value)
    }

    /// The numeric value.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next revision; saturates at [`Revision::MAX`].
    #[must_use]
    pub const fn next(self) -> Self {
        Revision(self.0.saturating_add(1))
    }

    /// Whether this is revision `0`.
    #[must_use]
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<u64> for Revision {
    fn from(value: u64) -> Self {
        Revision(value)
    }
}

impl From<Revision> for u64 {
    fn from(value: Revision) -> Self {
        value.0
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Revision({})", self.0)
    }
}

/// Why a string is not a canonical revision. Keeps at most the first 32
/// bytes of the input, so an error never echoes a huge one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseRevisionError {
    /// The string is empty.
    #[error("revision is empty")]
    Empty,
    /// The string contains something other than ASCII digits (signs,
    /// whitespace, decimal points, letters).
    #[error("revision {0:?} contains a character other than 0-9")]
    InvalidDigit(String),
    /// The string has a leading zero (`"01"`, `"00"`).
    #[error("revision {0:?} has a leading zero")]
    LeadingZero(String),
    /// The number does not fit in a `u64`.
    #[error("revision {0:?} is larger than 18446744073709551615")]
    Overflow(String),
    /// The JSON value is not a string (revisions travel as strings).
    #[error("revision must be a JSON string, found {0}")]
    NotAString(&'static str),
}

/// The input as an error shows it: at most 32 bytes, `…` when cut.
fn shown(s: &str) -> String {
    let start = crate::topic::prefix(s, 32);
    if start.len() == s.len() {
        s.to_owned()
    } else {
        format!("{start}…")
    }
}

impl FromStr for Revision {
    type Err = ParseRevisionError;

    // Every event and snapshot from a transport goes here: one pass with
    // no overflow check per digit; only a 20-digit string can overflow,
    // and for equal lengths text order is numeric order.
    #[inline]
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const MAX: &str = "18446744073709551615";
        let bytes = s.as_bytes();
        if bytes.is_empty() {
            return Err(ParseRevisionError::Empty);
        }
        let mut value: u64 = 0;
        for &b in bytes {
            let digit = b.wrapping_sub(b'0');
            if digit > 9 {
                return Err(ParseRevisionError::InvalidDigit(shown(s)));
            }
            value = value.wrapping_mul(10).wrapping_add(u64::from(digit));
        }
        if bytes.len() > 1 && bytes[0] == b'0' {
            return Err(ParseRevisionError::LeadingZero(shown(s)));
        }
        if bytes.len() > MAX.len() || (bytes.len() == MAX.len() && s > MAX) {
            return Err(ParseRevisionError::Overflow(shown(s)));
        }
        Ok(Revision(value))
    }
}

impl Revision {
    /// Reads a revision from a JSON value, which must be a canonical string.
    ///
    /// # Errors
    ///
    /// [`ParseRevisionError::NotAString`] for numbers, `null` and other
    /// non-strings; the [`FromStr`] errors for non-canonical strings.
    pub fn from_json_value(value: &serde_json::Value) -> Result<Self, ParseRevisionError> {
        match value {
            serde_json::Value::String(s) => s.parse(),
            other => Err(ParseRevisionError::NotAString(json_type_name(other))),
        }
    }
}

pub(crate) fn json_type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl Serialize for Revision {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 20];
        serializer.serialize_str(format_u64(self.0, &mut buf))
    }
}

/// Formats without allocating: revisions are serialized on hot paths.
fn format_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

impl<'de> Deserialize<'de> for Revision {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RevisionVisitor;

        impl Visitor<'_> for RevisionVisitor {
            type Value = Revision;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a canonical decimal revision string such as \"42\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Revision, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(RevisionVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_round_trip() {
        for s in ["0", "1", "42", "1000000", "18446744073709551615"] {
            let r: Revision = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{s}\""));
            let back: Revision = serde_json::from_str(&format!("\"{s}\"")).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn every_non_canonical_form_is_rejected() {
        let cases = [
            ("", ParseRevisionError::Empty),
            ("00", ParseRevisionError::LeadingZero("00".into())),
            ("01", ParseRevisionError::LeadingZero("01".into())),
            ("+1", ParseRevisionError::InvalidDigit("+1".into())),
            (" 1", ParseRevisionError::InvalidDigit(" 1".into())),
            ("1 ", ParseRevisionError::InvalidDigit("1 ".into())),
            ("1.0", ParseRevisionError::InvalidDigit("1.0".into())),
            ("-1", ParseRevisionError::InvalidDigit("-1".into())),
            ("12a", ParseRevisionError::InvalidDigit("12a".into())),
            ("١", ParseRevisionError::InvalidDigit("١".into())),
            (
                "18446744073709551616",
                ParseRevisionError::Overflow("18446744073709551616".into()),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<Revision>(), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn errors_do_not_echo_a_huge_input() {
        let huge = "1".repeat(600_000);
        let err = huge.parse::<Revision>().unwrap_err();
        assert!(matches!(&err, ParseRevisionError::Overflow(shown) if shown.len() < 40));
        assert!(err.to_string().len() < 100, "{err}");
    }

    #[test]
    fn non_string_json_is_rejected() {
        for json in ["1", "null", "true", "[]", "{}", "1.5"] {
            assert!(serde_json::from_str::<Revision>(json).is_err(), "{json}");
            let value: serde_json::Value = serde_json::from_str(json).unwrap();
            assert!(matches!(
                Revision::from_json_value(&value),
                Err(ParseRevisionError::NotAString(_))
            ));
        }
    }

    #[test]
    fn ordering_is_numeric_not_lexicographic() {
        let nine: Revision = "9".parse().unwrap();
        let ten: Revision = "10".parse().unwrap();
        assert!(nine < ten);
        assert!(Revision::ZERO.is_zero());
        assert_eq!(Revision::MAX.next(), Revision::MAX);
        assert_eq!(Revision::new(7).next(), Revision::new(8));
    }

    proptest::proptest! {
        #[test]
        fn digit_strings_parse_as_u64_does_when_canonical(s in "[0-9]{1,22}") {
            let canonical = s == "0" || !s.starts_with('0');
            let expected = s.parse::<u64>().ok().filter(|_| canonical);
            proptest::prop_assert_eq!(s.parse::<Revision>().ok().map(Revision::get), expected);
        }

        #[test]
        fn display_parse_round_trip(n: u64) {
            let r = Revision::new(n);
            proptest::prop_assert_eq!(r.to_string().parse::<Revision>(), Ok(r));
            let json = serde_json::to_string(&r).unwrap();
            proptest::prop_assert_eq!(json, format!("\"{n}\""));
        }

        #[test]
        fn ordering_matches_u64(a: u64, b: u64) {
            proptest::prop_assert_eq!(Revision::new(a).cmp(&Revision::new(b)), a.cmp(&b));
        }
    }
}
