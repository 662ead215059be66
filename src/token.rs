//! The token format: `{namespace}_{environment}_v1_{body}`.
//!
//! The body is 32 base32 characters of 160 random bits from the operating system, followed by 7
//! base32 characters of the CRC32 of everything before them. The checksum lets [`KeyFormat::parse`]
//! reject typos and random strings without a store read, and lets secret scanners recognise a leaked
//! key offline ([`TokenParts::parse`]). Pure code, no I/O: this is the fuzzed surface.

use std::borrow::Cow;
use std::fmt;

use base32::Alphabet;
use rand::TryRng;
use rand::rngs::SysRng;

use crate::error::{RandomError, TokenError, ValidationError};
use crate::secret::SecretToken;
use zeroize::Zeroizing;

/// RFC 4648 base32, lowercase, no padding: the alphabet of the body.
const BODY_ALPHABET: Alphabet = Alphabet::Rfc4648Lower { padding: false };
/// Random bytes in a token: 160 bits, exactly 32 base32 characters.
const RANDOM_BYTES: usize = 20;
const RANDOM_CHARS: usize = 32;
/// A CRC32 in base32: 32 bits in 7 characters, the last 3 bits zero.
const CHECKSUM_CHARS: usize = 7;
/// Characters after the version: random part plus checksum.
pub(crate) const BODY_CHARS: usize = RANDOM_CHARS + CHECKSUM_CHARS;
/// Characters of the body shown in the prefix.
pub(crate) const PREFIX_BODY_CHARS: usize = 4;
/// The only version there is.
const VERSION: &str = "v1";
/// Longest namespace, environment and token; anything longer is rejected before it is read.
const MAX_NAMESPACE: usize = 16;
const MAX_ENVIRONMENT: usize = 8;
pub(crate) const MAX_LEAD_LEN: usize = MAX_NAMESPACE + 1 + MAX_ENVIRONMENT + 1 + VERSION.len() + 1;
const MAX_TOKEN_LEN: usize = MAX_LEAD_LEN + BODY_CHARS;
const MAX_PREFIX_LEN: usize = MAX_LEAD_LEN + PREFIX_BODY_CHARS;

/// The deployment a key belongs to, the second part of a token: `live`, `test`, or a label of
/// the service's own (`[a-z]{1,8}`). A service accepts only tokens of its own environment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Environment(Cow<'static, str>);

impl Environment {
    /// Production keys: `…_live_v1_…`.
    pub const LIVE: Self = Self(Cow::Borrowed("live"));
    /// Keys for testing against a sandbox: `…_test_v1_…`.
    pub const TEST: Self = Self(Cow::Borrowed("test"));

    /// An environment label of the service's own, 1–8 lowercase letters.
    pub fn new(label: &str) -> Result<Self, ValidationError> {
        if !is_environment(label) {
            return Err(ValidationError::Environment);
        }
        Ok(Self(Cow::Owned(label.to_owned())))
    }

    /// The label, e.g. `"live"`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The visible start of a token, `{namespace}_{environment}_v1_` and 4 characters of its body,
/// e.g. `as_live_v1_4xkq`: shown in lists so people can tell keys apart. Not secret, not unique.
/// Kept inline (no heap), so records are cheap to copy.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyPrefix {
    len: u8,
    bytes: [u8; MAX_PREFIX_LEN],
}

impl KeyPrefix {
    /// Validates a prefix read back from a store.
    pub fn new(prefix: &str) -> Result<Self, ValidationError> {
        let (_, _, lead_len) = split_lead(prefix).map_err(|_| ValidationError::Prefix)?;
        let body = &prefix.as_bytes()[lead_len..];
        if body.len() != PREFIX_BODY_CHARS || !body.iter().all(|&c| is_body_char(c)) {
            return Err(ValidationError::Prefix);
        }
        Ok(Self::of_checked(prefix))
    }

    /// A prefix cut from a token this module made or checked.
    fn of_checked(prefix: &str) -> Self {
        let mut bytes = [0u8; MAX_PREFIX_LEN];
        bytes[..prefix.len()].copy_from_slice(prefix.as_bytes());
        Self { len: prefix.len() as u8, bytes }
    }

    /// The prefix as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::ops::Deref for KeyPrefix {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::str::FromStr for KeyPrefix {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A service's token format: its namespace and environment.
///
/// ```
/// # use apikeys::{Environment, KeyFormat, TokenError};
/// let format = KeyFormat::new("as", Environment::LIVE)?;
/// let (token, prefix) = format.generate()?;
/// assert!(token.expose_secret().starts_with("as_live_v1_"));
/// assert_eq!(prefix.len(), "as_live_v1_".len() + 4);
/// assert_eq!(format.parse(token.expose_secret())?.prefix(), prefix.as_str());
///
/// let test_keys = KeyFormat::new("as", Environment::TEST)?;
/// assert_eq!(test_keys.parse(token.expose_secret()).unwrap_err(), TokenError::Environment);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    namespace: Box<str>,
    environment: Environment,
    /// `{namespace}_{environment}_v1_`, what every token of this format starts with.
    lead: Box<str>,
}

impl KeyFormat {
    /// A format with a namespace `[a-z][a-z0-9]{1,15}` (e.g. your product's initials) and an
    /// environment.
    pub fn new(namespace: &str, environment: Environment) -> Result<Self, ValidationError> {
        if !is_namespace(namespace) {
            return Err(ValidationError::Namespace);
        }
        let lead = format!("{namespace}_{environment}_{VERSION}_").into_boxed_str();
        Ok(Self { namespace: namespace.into(), environment, lead })
    }

    /// The namespace, e.g. `"as"`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The environment.
    pub fn environment(&self) -> &Environment {
        &self.environment
    }

    /// The length of every token of this format.
    pub fn token_len(&self) -> usize {
        self.lead.len() + BODY_CHARS
    }

    /// A new token from the operating system's random generator, and its display prefix.
    pub fn generate(&self) -> Result<(SecretToken, KeyPrefix), RandomError> {
        let mut random = Zeroizing::new([0u8; RANDOM_BYTES]);
        SysRng.try_fill_bytes(&mut *random).map_err(RandomError::new)?;
        let mut token = String::with_capacity(self.token_len());
        token.push_str(&self.lead);
        token.push_str(&Zeroizing::new(base32::encode(BODY_ALPHABET, &*random)));
        let checksum = checksum_chars(&token);
        token.push_str(&checksum);
        let prefix = KeyPrefix::of_checked(&token[..self.lead.len() + PREFIX_BODY_CHARS]);
        Ok((SecretToken::from(token), prefix))
    }

    /// Checks that `token` is a well-formed token of this format, without any store access.
    pub fn parse<'a>(&self, token: &'a str) -> Result<TokenParts<'a>, TokenError> {
        // The common case, a token of this format, is settled by one comparison and one checksum.
        if token.len() == self.token_len() && token.starts_with(&*self.lead) {
            check_body(token, self.lead.len())?;
            return Ok(TokenParts { token, lead_len: self.lead.len() });
        }
        // Anything else is malformed; say how, for logs and metrics. A key of another service or
        // environment is named as such even if its checksum is wrong too.
        let (namespace, environment, lead_len) = split_lead(token)?;
        if namespace != &*self.namespace {
            return Err(TokenError::Namespace);
        }
        if environment != self.environment.as_str() {
            return Err(TokenError::Environment);
        }
        check_body(token, lead_len)?;
        // Same lead and a valid body imply the expected length, which the fast path took.
        Err(TokenError::Length)
    }
}

/// A syntactically valid token of any namespace and environment, borrowed from the input.
///
/// [`TokenParts::parse`] needs no configuration, which is what a secret scanner wants: the
/// checksum tells a real key from a string that merely looks like one.
///
/// ```
/// # use apikeys::TokenParts;
/// assert!(TokenParts::parse("as_live_v1_notarealkeyatallnotarealkeyatallxxxxxxx").is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenParts<'a> {
    token: &'a str,
    /// Length of `{namespace}_{environment}_v1_`.
    lead_len: usize,
}

impl<'a> TokenParts<'a> {
    /// Parses a token of any namespace and environment.
    pub fn parse(token: &'a str) -> Result<Self, TokenError> {
        let (_, _, lead_len) = split_lead(token)?;
        check_body(token, lead_len)?;
        Ok(Self { token, lead_len })
    }

    /// The namespace, e.g. `"as"`.
    pub fn namespace(&self) -> &'a str {
        self.token.split('_').next().unwrap_or_default()
    }

    /// The environment label, e.g. `"live"`.
    pub fn environment(&self) -> &'a str {
        self.token.split('_').nth(1).unwrap_or_default()
    }

    /// The visible prefix, `{namespace}_{environment}_v1_` and 4 characters of the body.
    pub fn prefix(&self) -> &'a str {
        &self.token[..self.lead_len + PREFIX_BODY_CHARS]
    }

    /// The whole token.
    pub fn as_str(&self) -> &'a str {
        self.token
    }
}

impl fmt::Debug for TokenParts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenParts({}…)", self.prefix())
    }
}

/// Splits `{namespace}_{environment}_v1_` off a token and checks its syntax; returns the
/// namespace, the environment and the length of the lead.
fn split_lead(token: &str) -> Result<(&str, &str, usize), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Length);
    }
    let mut parts = token.splitn(4, '_');
    let (Some(namespace), Some(environment), Some(version), Some(body)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Length);
    };
    if !is_namespace(namespace) {
        return Err(TokenError::Namespace);
    }
    if !is_environment(environment) {
        return Err(TokenError::Environment);
    }
    if version != VERSION {
        return Err(TokenError::Version);
    }
    Ok((namespace, environment, token.len() - body.len()))
}

/// Checks length, alphabet and checksum of the body that starts at `lead_len`.
fn check_body(token: &str, lead_len: usize) -> Result<(), TokenError> {
    let body = &token.as_bytes()[lead_len..];
    if body.len() != BODY_CHARS {
        return Err(TokenError::Length);
    }
    // One table lookup per character; any byte outside the alphabet sets the high bit.
    if body.iter().fold(0u8, |seen, &c| seen | BASE32_VALUE[usize::from(c)]) & INVALID != 0 {
        return Err(TokenError::Alphabet);
    }
    let (checked, checksum) = token.split_at(token.len() - CHECKSUM_CHARS);
    // The 7 characters carry 35 bits: the CRC32 followed by 3 zero bits.
    let presented = checksum.bytes().fold(0u64, |bits, c| (bits << 5) | u64::from(BASE32_VALUE[usize::from(c)]));
    if presented != u64::from(crc32fast::hash(checked.as_bytes())) << 3 {
        return Err(TokenError::Checksum);
    }
    Ok(())
}

/// Marks a byte outside the body alphabet in [`BASE32_VALUE`].
const INVALID: u8 = 0x80;

/// The value of each byte in lowercase RFC 4648 base32 (`a`–`z` are 0–25, `2`–`7` are 26–31),
/// or [`INVALID`].
const BASE32_VALUE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 32 {
        let c = if i < 26 { b'a' + i as u8 } else { b'2' + (i - 26) as u8 };
        table[c as usize] = i as u8;
        i += 1;
    }
    table
};

/// The CRC32 of `checked`, big-endian, as 7 base32 characters.
fn checksum_chars(checked: &str) -> String {
    base32::encode(BODY_ALPHABET, &crc32fast::hash(checked.as_bytes()).to_be_bytes())
}

fn is_body_char(c: u8) -> bool {
    BASE32_VALUE[usize::from(c)] != INVALID
}

fn is_namespace(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=MAX_NAMESPACE).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn is_environment(s: &str) -> bool {
    (1..=MAX_ENVIRONMENT).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_lowercase())
}

/// Whether `text` may hold a token of any format: it holds the version between underscores that
/// every token has, also percent-encoded. Text that is kept and sent on (a request id, a leak's
/// source URL) is refused with it, so that no token gets into an audit event or a webhook.
pub(crate) fn may_hold_token(text: &str) -> bool {
    let marker = VERSION_MARKER.as_bytes();
    let holds = |text: &str| text.as_bytes().windows(marker.len()).any(|window| window.eq_ignore_ascii_case(marker));
    // Decoded up to three times over, and only text with a `%` is: a key in a URL may be
    // percent-encoded, even twice, and a request id checked on every request allocates nothing.
    let mut text = std::borrow::Cow::Borrowed(text);
    for _ in 0..3 {
        if holds(&text) {
            return true;
        }
        if !text.contains('%') {
            return false;
        }
        text = percent_encoding::percent_decode_str(&text).decode_utf8_lossy().into_owned().into();
    }
    holds(&text)
}

/// The version between underscores, which every token holds after its namespace and environment.
pub(crate) const VERSION_MARKER: &str = "_v1_";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_with_the_version_between_underscores_may_hold_a_token_even_percent_encoded() {
        for text in [
            "as_live_v1_abcd",
            "https://x.example/?k=as_test_v1_q",
            "as%5Flive%5fv1%5Fabcd",
            "AS%5FLIVE_V1%5F",
            "as_live_%76%31_abcd",
            "as%255Flive%255Fv1%255Fabcd",
        ] {
            assert!(may_hold_token(text), "{text}");
        }
        for text in ["https://pastebin.example/raw/abc", "req_0123", "v1_abcd", "as_live_v2_abcd", "%zz%"] {
            assert!(!may_hold_token(text), "{text}");
        }
        assert_eq!(VERSION_MARKER, format!("_{VERSION}_"));
    }

    fn live() -> KeyFormat {
        KeyFormat::new("as", Environment::LIVE).unwrap()
    }

    fn token() -> String {
        live().generate().unwrap().0.expose_secret().to_owned()
    }

    #[test]
    fn generated_tokens_have_the_documented_shape() {
        let (token, prefix) = live().generate().unwrap();
        let token = token.expose_secret();
        assert_eq!(token.len(), "as_live_v1_".len() + 39);
        assert!(token.starts_with("as_live_v1_"));
        assert!(token.starts_with(prefix.as_str()));
        assert_eq!(prefix.len(), "as_live_v1_".len() + 4);
        assert_eq!(KeyPrefix::new(&prefix), Ok(prefix));
        let body = &token["as_live_v1_".len()..];
        assert!(body.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)));
    }

    #[test]
    fn prefixes_are_validated() {
        for good in ["as_live_v1_abcd", "acme42_staging_v1_z7z7", "abcdefghijklmnop_abcdefgh_v1_2345"] {
            assert_eq!(KeyPrefix::new(good).map(|prefix| prefix.to_string()), Ok(good.to_owned()));
        }
        for bad in [
            "",
            "as_live_v1_",
            "as_live_v1_abc",
            "as_live_v1_abcde",
            "as_live_v1_ABCD",
            "as_live_v2_abcd",
            "x_live_v1_abcd",
        ] {
            assert_eq!(KeyPrefix::new(bad), Err(ValidationError::Prefix), "{bad:?}");
        }
    }

    #[test]
    fn generated_tokens_differ() {
        let tokens: std::collections::HashSet<String> = (0..1000).map(|_| token()).collect();
        assert_eq!(tokens.len(), 1000);
    }

    #[test]
    fn a_generated_token_parses_in_its_own_format_and_in_any() {
        let token = token();
        let parts = live().parse(&token).unwrap();
        assert_eq!(parts.as_str(), token);
        assert_eq!(TokenParts::parse(&token), Ok(parts));
        assert_eq!(parts.namespace(), "as");
        assert_eq!(parts.environment(), "live");
    }

    #[test]
    fn custom_environments_work_and_are_validated() {
        let staging = KeyFormat::new("acme42", Environment::new("staging").unwrap()).unwrap();
        let (token, prefix) = staging.generate().unwrap();
        assert!(prefix.starts_with("acme42_staging_v1_"));
        assert!(staging.parse(token.expose_secret()).is_ok());
        assert_eq!(live().parse(token.expose_secret()), Err(TokenError::Namespace));
        for bad in ["", "Live", "toolonglabel", "l1ve", "li_ve"] {
            assert_eq!(Environment::new(bad), Err(ValidationError::Environment), "{bad:?}");
        }
        for bad in ["", "a", "1as", "As", "a_s", "abcdefghijklmnopq"] {
            assert_eq!(KeyFormat::new(bad, Environment::LIVE), Err(ValidationError::Namespace), "{bad:?}");
        }
    }

    #[test]
    fn every_kind_of_malformed_token_is_rejected_with_its_reason() {
        let good = token();
        let body = &good["as_live_v1_".len()..];
        let cases: Vec<(String, TokenError)> = vec![
            (String::new(), TokenError::Length),
            ("x".repeat(1 << 20), TokenError::Length),
            ("as_live_v1_".to_owned(), TokenError::Length),
            (good[..good.len() - 1].to_owned(), TokenError::Length),
            (format!("{good}a"), TokenError::Length),
            (format!("as_test_v1_{body}"), TokenError::Environment),
            (format!("xy_live_v1_{body}"), TokenError::Namespace),
            (format!("as_live_v2_{body}"), TokenError::Version),
            (format!("AS_live_v1_{body}"), TokenError::Namespace),
            (good.to_uppercase(), TokenError::Namespace),
            (format!("as_live_v1_{}", body.to_uppercase()), TokenError::Alphabet),
            (format!("as_live_v1_{}1", &body[1..]), TokenError::Alphabet),
            (format!("as_live_v1_{}é", &body[2..]), TokenError::Alphabet),
            (format!("as_live_v1_{}\0", &body[1..]), TokenError::Alphabet),
            (good.replace('_', "-"), TokenError::Length),
        ];
        for (bad, reason) in cases {
            let shown = &bad[..bad.len().min(60)];
            assert_eq!(live().parse(&bad), Err(reason), "{shown:?}");
        }
    }

    #[test]
    fn test_tokens_are_refused_by_live_and_the_other_way_round() {
        let test = KeyFormat::new("as", Environment::TEST).unwrap();
        let (test_token, _) = test.generate().unwrap();
        assert_eq!(live().parse(test_token.expose_secret()), Err(TokenError::Environment));
        assert_eq!(test.parse(&token()), Err(TokenError::Environment));
    }

    #[test]
    fn any_single_character_change_breaks_the_checksum_or_the_format() {
        let good = token();
        for i in 0..good.len() {
            for replacement in ['a', 'z', '2', '7', '_', 'A', '0', '1', '8'] {
                if good.as_bytes()[i] == replacement as u8 {
                    continue;
                }
                let mut bad = good.clone().into_bytes();
                bad[i] = replacement as u8;
                let bad = String::from_utf8(bad).unwrap();
                assert!(live().parse(&bad).is_err(), "position {i} -> {replacement}");
            }
        }
    }

    #[test]
    fn a_non_canonical_checksum_is_rejected() {
        // The last checksum character carries 2 bits; its 3 padding bits must be zero.
        let good = token();
        let last = good.as_bytes()[good.len() - 1];
        let index = BODY_ALPHABET_CHARS.iter().position(|&c| c == last).unwrap();
        let mut bad = good.into_bytes();
        *bad.last_mut().unwrap() = BODY_ALPHABET_CHARS[index ^ 1];
        assert_eq!(live().parse(std::str::from_utf8(&bad).unwrap()), Err(TokenError::Checksum));
    }

    const BODY_ALPHABET_CHARS: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
}
