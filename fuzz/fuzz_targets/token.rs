//! Token parsing: never panics, accepts only what it can print back unchanged, and agrees with
//! itself across the configured and the configuration-free parser.
#![no_main]

use apikeys::{Environment, KeyFormat, KeyPrefix, TokenError, TokenParts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let live = KeyFormat::new("as", Environment::LIVE).unwrap();
    let any = TokenParts::parse(text);
    match live.parse(text) {
        Ok(parts) => {
            assert_eq!(parts.as_str(), text);
            assert_eq!(any, Ok(parts), "a token of the format is a token");
            assert!(text.starts_with(parts.prefix()));
            assert_eq!(KeyPrefix::new(parts.prefix()).map(|prefix| prefix.to_string()).as_deref(), Ok(parts.prefix()));
            assert_eq!(text.len(), live.token_len());
        }
        Err(TokenError::Environment | TokenError::Namespace) => {}
        Err(_) => assert!(any.is_err(), "malformed for the format but valid for the parser: {text:?}"),
    }
    if let Ok(parts) = any {
        assert_eq!(parts.as_str(), text);
        let format = KeyFormat::new(parts.namespace(), Environment::new(parts.environment()).unwrap()).unwrap();
        assert_eq!(format.parse(text), Ok(parts), "a valid token parses in its own format");
    }
    let _ = KeyPrefix::new(text);
});
