//! Key ids, account ids and names: never panic, and a parsed id prints back unchanged.
#![no_main]

use apikeys::{AccountId, KeyId, KeyName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(id) = text.parse::<KeyId>() {
        assert_eq!(id.to_string(), text, "only the canonical form parses");
        assert_eq!(KeyId::from_uuid(*id.as_uuid()), id);
    }
    if let Ok(account) = AccountId::new(text) {
        assert_eq!(account.as_str(), text);
    }
    if let Ok(name) = KeyName::new(text) {
        assert_eq!(name.as_str(), text);
        assert!(!name.chars().any(char::is_control));
    }
});
