//! [`KeyName`], the human label of a key.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use smol_str::SmolStr;

use crate::error::ValidationError;

/// A key's label, e.g. `production-agent`: 1–255 characters, none of them a control character.
/// Line and paragraph separators (U+2028, U+2029) and bidirectional overrides (U+202A–U+202E,
/// U+2066–U+2069, U+200E, U+200F) count as control characters here: they would let a name break
/// a log line or a table, or display as something else. Invalid names are refused, never
/// truncated. Cheap to clone: up to 23 bytes are held inline, so copying a short name (as every
/// verification copies its key's) reads no other memory; longer ones are shared.
///
/// ```
/// # use apikeys::KeyName;
/// assert!(KeyName::new("production-agent").is_ok());
/// assert!(KeyName::new("").is_err());
/// assert!(KeyName::new("line\nbreak").is_err());
/// assert!(KeyName::new("é".repeat(255)).is_ok()); // characters, not bytes
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName(SmolStr);

impl KeyName {
    /// The most characters a name may have.
    pub const MAX_CHARS: usize = 255;

    /// Validates a name.
    pub fn new(name: impl AsRef<str>) -> Result<Self, ValidationError> {
        let name = name.as_ref();
        let chars = name.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS || name.chars().any(is_control) {
            return Err(ValidationError::Name);
        }
        Ok(Self(SmolStr::new(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Control characters, and the invisible ones that reorder or break text.
fn is_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

impl FromStr for KeyName {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Deref for KeyName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_free_of_control_characters() {
        assert!(KeyName::new("a").is_ok());
        assert!(KeyName::new("x".repeat(255)).is_ok());
        assert!(KeyName::new("'; DROP TABLE keys; --").is_ok());
        assert!(KeyName::new("   ").is_ok());
        for bad in
            [String::new(), "x".repeat(256), "tab\t".into(), "nul\0".into(), "del\u{7f}".into(), "c1\u{85}".into()]
        {
            assert_eq!(KeyName::new(bad.clone()), Err(ValidationError::Name), "{bad:?}");
        }
    }
}
