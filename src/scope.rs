//! [`Scopes`]: what a key may do, as a set of grants.
//!
//! A *scope* names one permission, e.g. `orders:read`: 1 to 8 segments joined by `:`, each a
//! lowercase letter followed by up to 31 lowercase letters, digits, `_` or `-`, at most 128
//! characters in all. A *grant* is a scope, a wildcard `prefix:*` (every scope that starts with
//! `prefix:`), or `*` (every scope).
//!
//! One rule decides everything: a grant `g` covers a grant or scope `s` when `g` is `s`, or `g`
//! ends in `*` and `s` starts with what precedes the `*`. So `orders:*` covers `orders:read`,
//! `orders:read:own` and `orders:archive:*`, but not `orders` and not `*`: a wildcard is covered
//! only by an equal or wider wildcard, never by any number of concrete grants.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use crate::error::ValidationError;

/// The grants of a key: the scopes it may act in. Cheap to clone; `["*"]` (every scope, which
/// keys made before scopes existed hold) takes no allocation.
///
/// Kept in a canonical form: sorted, without duplicates and without grants that another grant
/// covers, so two sets that allow the same scopes are equal.
///
/// ```
/// # use apikeys::Scopes;
/// let scopes = Scopes::new(["orders:read", "reports:*"]).unwrap();
/// assert!(scopes.allows("orders:read"));
/// assert!(scopes.allows("reports:monthly:pdf"));
/// assert!(!scopes.allows("orders:write"));
/// assert!(Scopes::new(["reports:monthly"]).unwrap().is_within(&scopes));
/// assert!(!Scopes::all().is_within(&scopes));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Scopes(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    /// `["*"]`.
    All,
    /// Any other canonical set, as its grants joined by single spaces (no grant holds one):
    /// the form the stores keep, so reading one back is a comparison when the thread read the
    /// same set last, else a check and one allocation. `""` is `[]`.
    Listed(Arc<str>),
}

impl Scopes {
    /// The most grants one key may hold.
    pub const MAX_GRANTS: usize = 64;
    /// The longest scope or grant, in characters.
    pub const MAX_LEN: usize = 128;
    /// Reading the account's keys through the HTTP API.
    pub const KEYS_READ: &'static str = "keys:read";
    /// Creating, rolling and revoking the account's keys through a key.
    pub const KEYS_WRITE: &'static str = "keys:write";
    /// Reading the account's audit trail through a key.
    pub const AUDIT_READ: &'static str = "audit:read";

    /// Validates a set of grants. Order and duplicates do not matter.
    pub fn new<I>(grants: I) -> Result<Self, ValidationError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let grants: Vec<I::Item> = grants.into_iter().collect();
        if grants.len() > Self::MAX_GRANTS {
            return Err(ValidationError::TooManyScopes);
        }
        let mut grants: Vec<&str> = grants.iter().map(AsRef::as_ref).collect();
        if !grants.iter().all(|grant| is_grant(grant)) {
            return Err(ValidationError::Scope);
        }
        grants.sort_unstable();
        // Sorted, the grants a wildcard covers follow it directly (they share its prefix, and
        // `*` sorts before every other character a grant may hold), so one pass drops them.
        let mut canonical: Vec<&str> = Vec::with_capacity(grants.len());
        for grant in grants {
            if !canonical.last().is_some_and(|kept| covers(kept, grant)) {
                canonical.push(grant);
            }
        }
        Ok(Self::from_canonical(&canonical.join(" ")))
    }

    /// `["*"]`: every scope.
    pub const fn all() -> Self {
        Self(Repr::All)
    }

    /// `[]`: no scope at all. Such a key authenticates, but every scope check refuses it.
    pub fn none() -> Self {
        Self(Repr::Listed("".into()))
    }

    /// Whether a grant covers `scope`. A string that is not a valid scope is never allowed, not
    /// even by `*`, so a typo in a route's requirement fails closed.
    pub fn allows(&self, scope: &str) -> bool {
        is_scope(scope) && self.iter().any(|grant| covers(grant, scope))
    }

    /// Whether every grant of `self` is covered by a grant of `other`: a key with `self` can do
    /// nothing that a key with `other` cannot.
    pub fn is_within(&self, other: &Self) -> bool {
        matches!(other.0, Repr::All) || self.iter().all(|grant| other.iter().any(|wider| covers(wider, grant)))
    }

    /// The grants, in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        split_grants(self.as_text()).filter(|grant| !grant.is_empty())
    }

    /// How many grants.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there is no grant (`[]`).
    pub fn is_empty(&self) -> bool {
        self.as_text().is_empty()
    }

    /// The grants joined by single spaces, as the stores keep them: `""` for `[]`.
    pub(crate) fn as_text(&self) -> &str {
        match &self.0 {
            Repr::All => "*",
            Repr::Listed(text) => text,
        }
    }

    /// Reads what [`as_text`](Self::as_text) gave; `None` if it is not a valid set. Text in
    /// canonical form, which is all a store ever holds, is only checked, in one pass.
    ///
    /// A service's keys hold few distinct sets, and verification reads one with every key it
    /// finds; so each thread keeps the last set it read (one small allocation per thread), and
    /// the same text again costs one comparison instead of a check and an allocation.
    #[cfg_attr(not(any(feature = "sqlite", feature = "redb", feature = "postgres")), allow(dead_code))]
    pub(crate) fn from_text(text: &str) -> Option<Self> {
        thread_local! {
            static LAST_READ: RefCell<Scopes> = const { RefCell::new(Scopes::all()) };
        }
        // `try_with`: a thread that is exiting has no kept set, and reads without one.
        let kept = LAST_READ.try_with(|last| {
            let last = last.borrow();
            (last.as_text() == text).then(|| last.clone())
        });
        if let Ok(Some(last)) = kept {
            return Some(last);
        }
        if is_canonical(text) {
            let scopes = Self::from_canonical(text);
            let _ = LAST_READ.try_with(|last| last.replace(scopes.clone()));
            return Some(scopes);
        }
        Self::new(split_grants(text).filter(|grant| !grant.is_empty())).ok()
    }

    fn from_canonical(text: &str) -> Self {
        if text == "*" { Self::all() } else { Self(Repr::Listed(text.into())) }
    }
}

/// Whether `text` is a canonical set: valid grants joined by single spaces, at most
/// [`Scopes::MAX_GRANTS`], each sorting after the one before and not covered by it (which is
/// enough, see [`Scopes::new`]).
fn is_canonical(text: &str) -> bool {
    if text.is_empty() {
        return true;
    }
    let mut previous: Option<&str> = None;
    let mut count = 0;
    split_grants(text).all(|grant| {
        count += 1;
        let in_order = previous.is_none_or(|before| before < grant && !covers(before, grant));
        previous = Some(grant);
        in_order && is_grant(grant)
    }) && count <= Scopes::MAX_GRANTS
}

/// The same pieces as `text.split(' ')`, empty ones included, found by a plain loop over the
/// bytes: grants are short, and `str::split` spends more per piece setting up its search than
/// checking one costs.
fn split_grants(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        let (piece, after) = match current.bytes().position(|byte| byte == b' ') {
            Some(space) => (&current[..space], Some(&current[space + 1..])),
            None => (current, None),
        };
        rest = after;
        Some(piece)
    })
}

impl Default for Scopes {
    /// `["*"]`, what keys made without naming scopes hold.
    fn default() -> Self {
        Self::all()
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(none)");
        }
        f.write_str(self.as_text())
    }
}

/// `grant` covers `other` (a scope or a grant): see the module docs.
pub(crate) fn covers(grant: &str, other: &str) -> bool {
    match grant.strip_suffix('*') {
        Some(prefix) => other.starts_with(prefix),
        None => grant == other,
    }
}

/// 1–8 segments of `[a-z][a-z0-9_-]{0,31}` joined by `:`, at most 128 characters.
pub(crate) fn is_scope(scope: &str) -> bool {
    scope.len() <= Scopes::MAX_LEN && segments_valid(scope, 8)
}

/// `*`, a scope, or `prefix:*` where `prefix` is a scope of at most 7 segments (so that some
/// scope can start with `prefix:`).
fn is_grant(grant: &str) -> bool {
    if grant.len() > Scopes::MAX_LEN {
        return false;
    }
    match grant.strip_suffix(":*") {
        _ if grant == "*" => true,
        Some(prefix) => segments_valid(prefix, 7),
        None => segments_valid(grant, 8),
    }
}

/// One pass over the bytes, as verification checks the grants of every key it reads.
fn segments_valid(text: &str, max_segments: usize) -> bool {
    let mut segments = 1;
    let mut segment_len = 0;
    for &byte in text.as_bytes() {
        match byte {
            b':' if segment_len > 0 => {
                segments += 1;
                segment_len = 0;
                continue;
            }
            b'a'..=b'z' => {}
            b'0'..=b'9' | b'_' | b'-' if segment_len > 0 => {}
            _ => return false,
        }
        segment_len += 1;
        if segment_len > 32 {
            return false;
        }
    }
    segment_len > 0 && segments <= max_segments
}

#[cfg(feature = "serde")]
impl serde::Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Scopes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let grants = <Vec<String> as serde::Deserialize>::deserialize(deserializer)?;
        Self::new(grants).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_grants_follow_the_grammar() {
        for valid in ["orders", "orders:read", "a:b:c:d:e:f:g:h", "x_1-y:z9", &"a".repeat(32)] {
            assert!(is_scope(valid), "{valid}");
            assert!(is_grant(valid), "{valid}");
        }
        let long = ["abcdefghijklmnop"; 8].join(":"); // 8 × 16 + 7 = 135 characters
        for invalid in [
            "",
            "Orders",
            "1orders",
            "orders:",
            ":read",
            "a::b",
            "a:b:c:d:e:f:g:h:i",
            "é",
            "a b",
            "*",
            "a:*",
            &long,
            &"a".repeat(33),
        ] {
            assert!(!is_scope(invalid), "{invalid}");
        }
        for grant in ["*", "orders:*", "a:b:c:d:e:f:g:*"] {
            assert!(is_grant(grant), "{grant}");
        }
        for invalid in ["**", "orders*", "orders:**", "*:read", "a:b:c:d:e:f:g:h:*", ":*", "orders:*:read"] {
            assert!(!is_grant(invalid), "{invalid}");
        }
    }

    #[test]
    fn wildcards_cover_by_prefix_and_only_wider_wildcards_cover_them() {
        assert!(covers("*", "orders:read") && covers("*", "orders:*") && covers("*", "*"));
        assert!(covers("orders:*", "orders:read") && covers("orders:*", "orders:read:own"));
        assert!(covers("orders:*", "orders:archive:*") && covers("orders:*", "orders:*"));
        assert!(!covers("orders:*", "orders") && !covers("orders:*", "*") && !covers("orders:*", "ordersx:read"));
        assert!(!covers("orders:read", "orders:*") && !covers("orders:read", "orders:read:own"));
    }

    #[test]
    fn the_canonical_form_drops_duplicates_and_covered_grants() {
        let scopes = Scopes::new(["orders:read", "orders:*", "b", "b", "orders:x:*"]).unwrap();
        assert_eq!(scopes.iter().collect::<Vec<_>>(), ["b", "orders:*"]);
        assert_eq!(Scopes::new(["*", "orders:read"]).unwrap(), Scopes::all());
        assert_eq!(Scopes::new(Vec::<String>::new()).unwrap(), Scopes::none());
        assert_eq!(Scopes::all().iter().collect::<Vec<_>>(), ["*"]);
    }

    #[test]
    fn the_number_of_grants_is_bounded() {
        let grants: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert_eq!(Scopes::new(&grants), Err(ValidationError::TooManyScopes));
        assert!(Scopes::new(&grants[..64]).is_ok());
    }

    #[test]
    fn text_round_trips() {
        for scopes in [Scopes::all(), Scopes::none(), Scopes::new(["a:*", "b:c"]).unwrap()] {
            assert_eq!(Scopes::from_text(scopes.as_text()), Some(scopes));
        }
        assert_eq!(Scopes::from_text("NOT VALID"), None);
        // Text not in canonical form (written by hand, say) is put into it.
        assert_eq!(Scopes::from_text("b a:* a:b"), Some(Scopes::new(["a:*", "b"]).unwrap()));
        assert_eq!(Scopes::from_text("a  b"), Some(Scopes::new(["a", "b"]).unwrap()));
    }

    #[test]
    fn grants_split_as_str_split_does() {
        for text in ["", " ", "a ", " a", "a  b", "a:* b", "x"] {
            assert_eq!(split_grants(text).collect::<Vec<_>>(), text.split(' ').collect::<Vec<_>>(), "{text:?}");
        }
    }

    #[test]
    fn the_same_set_read_again_is_the_set_kept_not_a_new_one() {
        let text = "a:* b:c";
        let shared = |first: &Scopes, second: &Scopes| match (&first.0, &second.0) {
            (Repr::Listed(first), Repr::Listed(second)) => Arc::ptr_eq(first, second),
            _ => false,
        };
        let first = Scopes::from_text(text).unwrap();
        assert!(shared(&first, &Scopes::from_text(text).unwrap()), "read twice in a row");
        // Text that is not canonical, or not valid, is not kept in its place.
        assert_eq!(Scopes::from_text("b:c a:*").as_ref(), Some(&first));
        assert_eq!(Scopes::from_text("a:* B"), None);
        assert!(shared(&first, &Scopes::from_text(text).unwrap()), "read after other text");
    }

    #[test]
    fn sets_read_in_turn_each_read_back_as_themselves() {
        let sets =
            [Scopes::new(["a:*", "b"]).unwrap(), Scopes::new(["a:*", "c"]).unwrap(), Scopes::all(), Scopes::none()];
        for _ in 0..2 {
            for scopes in &sets {
                assert_eq!(Scopes::from_text(scopes.as_text()).as_ref(), Some(scopes));
                // Invalid and non-canonical text between two reads changes neither.
                assert_eq!(Scopes::from_text("a:* B"), None);
                assert_eq!(Scopes::from_text("b a:*"), Some(sets[0].clone()));
            }
        }
    }

    #[test]
    fn an_invalid_scope_is_never_allowed() {
        assert!(!Scopes::all().allows("Not A Scope"));
        assert!(!Scopes::all().allows(""));
        assert!(Scopes::all().allows("anything:at:all"));
    }
}
