//! [`Topic`]: the name of one logical piece of state.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smol_str::SmolStr;
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

/// The name of one logical piece of state (`"settings"`, `"cart:user:42"`).
///
/// A topic is any string that is non-empty after trimming and at most
/// [`Topic::MAX_LEN`] bytes long. It is matched exactly: `" settings"` and
/// `"settings"` are different topics. Cloning is cheap: a name of up to 23
/// bytes is held inline (a copy, no allocation and no atomic reference
/// count, which is what most topics are), a longer one is shared by
/// reference count.
///
/// The length limit holds on every transport, and it is what lets every
/// topic name a file of the file store (file names have at most 255
/// bytes, and the store spells names in hex).
///
/// # Examples
///
/// ```
/// use state_sync::Topic;
///
/// let topic = Topic::new("settings")?;
/// assert_eq!(topic.as_str(), "settings");
/// assert!(Topic::new("   ").is_err());
/// # Ok::<(), state_sync::InvalidTopic>(())
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Topic(SmolStr);

/// The string is not a valid topic. Keeps at most the first 64 bytes of
/// it, so an error never echoes a huge input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidTopic {
    /// Empty, or only whitespace.
    #[error("topic must be non-empty after trimming, got {0:?}")]
    Blank(String),
    /// Longer than [`Topic::MAX_LEN`] bytes.
    #[error("topic is {len} bytes long, over the limit of {max} (it starts {start:?})")]
    TooLong {
        /// The name's length in bytes.
        len: usize,
        /// [`Topic::MAX_LEN`].
        max: usize,
        /// The name's first 64 bytes (at most).
        start: String,
    },
}

/// The first `max` bytes of `text` (at most), cut on a char boundary.
pub(crate) fn prefix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl Topic {
    /// The longest topic, in bytes of UTF-8.
    pub const MAX_LEN: usize = 100;

    /// Validates and wraps a topic name.
    ///
    /// # Errors
    ///
    /// [`InvalidTopic`] when the name is empty after trimming or longer
    /// than [`MAX_LEN`](Self::MAX_LEN) bytes.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidTopic> {
        let name = name.as_ref();
        if name.len() > Self::MAX_LEN {
            return Err(InvalidTopic::TooLong {
                len: name.len(),
                max: Self::MAX_LEN,
                start: prefix(name, 64).to_owned(),
            });
        }
        if is_valid_topic(name) {
            Ok(Topic(SmolStr::new(name)))
        } else {
            Err(InvalidTopic::Blank(name.to_owned()))
        }
    }

    /// The topic name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` is this topic, compared exactly. Cheap when both
    /// share an allocation.
    #[must_use]
    pub fn matches(&self, other: &Topic) -> bool {
        self.0 == other.0
    }
}

/// Whether `name` is a valid topic: non-empty after trimming, at most
/// [`Topic::MAX_LEN`] bytes.
#[must_use]
pub fn is_valid_topic(name: &str) -> bool {
    name.len() <= Topic::MAX_LEN && !name.trim().is_empty()
}

impl Deref for Topic {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl FromStr for Topic {
    type Err = InvalidTopic;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Topic::new(s)
    }
}

impl TryFrom<&str> for Topic {
    type Error = InvalidTopic;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Topic::new(value)
    }
}

impl TryFrom<String> for Topic {
    type Error = InvalidTopic;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Topic::new(value)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for Topic {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Topic::new(&*name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_topics_are_rejected() {
        for bad in ["", " ", "\t\n"] {
            assert_eq!(Topic::new(bad), Err(InvalidTopic::Blank(bad.to_owned())));
            assert!(serde_json::from_str::<Topic>(&format!("{bad:?}")).is_err());
        }
    }

    #[test]
    fn topics_are_limited_in_length_and_the_error_does_not_echo_them() {
        let longest = "é".repeat(Topic::MAX_LEN / 2);
        assert!(Topic::new(&longest).is_ok());
        let huge = format!("{longest}x{}", "y".repeat(300_000));
        let err = Topic::new(&huge).unwrap_err();
        assert!(matches!(err, InvalidTopic::TooLong { len, .. } if len == huge.len()));
        assert!(err.to_string().len() < 200, "{err}");
        assert!(!is_valid_topic(&huge));
        assert!(serde_json::from_str::<Topic>(&format!("{huge:?}")).is_err());
    }

    #[test]
    fn topics_match_exactly_without_trimming() {
        let a = Topic::new("settings").unwrap();
        let b = Topic::new(" settings").unwrap();
        assert!(!a.matches(&b));
        assert!(a.matches(&Topic::new("settings").unwrap()));
        assert_eq!(b.as_str(), " settings");
    }
}
