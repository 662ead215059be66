//! Property tests of the invariants: the service against a model over the memory store, token
//! and id round trips, and no secret in any `Debug` output.

mod support;

use apikeys::{
    AccountId, Environment, KeyFormat, KeyId, KeyService, KeyStore, ManualClock, MemoryStore, NewKey, Rejection,
    TokenError, TokenParts, ValidationError,
};
use proptest::prelude::*;
use proptest::sample::Index;
use support::property::check;
use support::{Instrumented, T0, assert_no_secret, live};

/// The body's alphabet, lowercase RFC 4648 base32 (SPEC §2).
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// What every token of [`live`] starts with, and the length of a body after it.
const LIVE_LEAD: &str = "as_live_v1_";
const BODY_CHARS: usize = 39;

/// A token built as SPEC §2 says, from proptest's bytes rather than the operating system's, so
/// that a failing case replays: the lead, 32 base32 characters of 20 random bytes, then 7 of the
/// CRC32 of everything before them.
fn token_by_the_spec(namespace: &str, environment: &str, random: &[u8; 20]) -> String {
    let alphabet = base32::Alphabet::Rfc4648Lower { padding: false };
    let mut token = format!("{namespace}_{environment}_v1_{}", base32::encode(alphabet, random));
    let checksum = crc32fast::hash(token.as_bytes()).to_be_bytes();
    token.push_str(&base32::encode(alphabet, &checksum));
    token
}

/// Text for the parsers: arbitrary strings, and strings that each parser accepts or nearly does,
/// so that both the accepting and the refusing side of every rule are reached.
fn text() -> impl Strategy<Value = String> {
    let lead = prop_oneof![
        2 => Just(("as".to_owned(), "live".to_owned())),
        1 => ("[a-z][a-z0-9]{1,15}", "[a-z]{1,8}"),
    ];
    let token = (lead, any::<[u8; 20]>())
        .prop_map(|((namespace, environment), random)| token_by_the_spec(&namespace, &environment, &random));
    let edited = (token.clone(), any::<Index>(), any::<char>()).prop_map(|(token, at, with)| {
        let at = token.char_indices().nth(at.index(token.len())).map_or(0, |(at, _)| at);
        format!("{}{with}{}", &token[..at], &token[at + 1..])
    });
    let key_id = any::<u128>().prop_map(|value| KeyId::from_uuid(uuid::Uuid::from_u128(value)).to_string());
    prop_oneof![
        3 => any::<String>(),
        2 => token,
        2 => edited,
        1 => key_id,
        // The alphabet with any first character: above `7`, the value overflows 128 bits.
        1 => "ak_[0-9a-hjkmnp-tv-z]{26}",
        1 => "ak_[0-9a-z]{25,27}",
        1 => "[ -~]{0,130}",
    ]
}

/// What replaces one character of a token's body.
#[derive(Debug, Clone)]
enum Replacement {
    /// Another character of the alphabet, this many places on (1 to 31).
    OtherBase32(usize),
    /// An ASCII character outside the alphabet.
    Ascii(char),
    /// A character of more than one byte.
    Wide(char),
}

fn replacement() -> impl Strategy<Value = Replacement> {
    let outside: Vec<char> = (0u8..128).filter(|byte| !BASE32.contains(byte)).map(char::from).collect();
    prop_oneof![
        6 => (1usize..32).prop_map(Replacement::OtherBase32),
        3 => prop::sample::select(outside).prop_map(Replacement::Ascii),
        1 => any::<char>().prop_filter("wider than a byte", |c| c.len_utf8() > 1).prop_map(Replacement::Wide),
    ]
}

/// Every parser gives a value or its typed error, as its rule says: a format accepts exactly the
/// well-formed tokens of its own namespace and environment, a key id is `ak_` and 26 Crockford
/// characters and prints back as given, an account id is 1–128 printable ASCII bytes. No input
/// panics, and none is accepted by one parser and refused by the rule.
#[test]
fn every_parser_accepts_exactly_what_its_rule_allows() {
    let expected = [
        ("a token of the format", 8),
        ("a token of another format", 2),
        ("a key id", 5),
        ("an id's shape, refused", 3),
        ("refused", 20),
    ];
    check(file!(), 1024, text(), &expected, |text, reached| {
        let in_any_format = TokenParts::parse(&text);
        let in_live = live().parse(&text);
        prop_assert_eq!(live().parse(&text), in_live, "the same answer twice");
        let of_live = in_any_format.ok().filter(|parts| parts.namespace() == "as" && parts.environment() == "live");
        prop_assert_eq!(in_live.ok(), of_live, "{:?}", text);
        match (in_live, in_any_format) {
            (Ok(parts), _) => {
                prop_assert_eq!(parts.as_str(), text.as_str());
                prop_assert_eq!(parts.prefix(), &text[..LIVE_LEAD.len() + 4]);
                reached.hit("a token of the format");
            }
            (Err(_), Ok(_)) => reached.hit("a token of another format"),
            (Err(_), Err(_)) => {}
        }

        let key_id = text.parse::<KeyId>();
        let id_shaped = text.strip_prefix("ak_").is_some_and(|suffix| {
            suffix.len() == 26 && suffix.bytes().all(|byte| b"0123456789abcdefghjkmnpqrstvwxyz".contains(&byte))
        });
        let id_by_rule = id_shaped && text.as_bytes()[3] <= b'7';
        match key_id {
            Ok(id) => {
                prop_assert_eq!(id.to_string(), text.as_str());
                reached.hit("a key id");
            }
            Err(error) => {
                prop_assert_eq!(error, ValidationError::KeyId);
                if id_shaped {
                    reached.hit("an id's shape, refused");
                }
            }
        }
        prop_assert_eq!(key_id.is_ok(), id_by_rule, "{:?}", text);

        let account = AccountId::new(&text);
        let account_by_rule = (1..=128).contains(&text.len()) && text.bytes().all(|byte| (b' '..=b'~').contains(&byte));
        match &account {
            Ok(account) => prop_assert_eq!(account.as_str(), text.as_str()),
            Err(error) => prop_assert_eq!(*error, ValidationError::AccountId),
        }
        prop_assert_eq!(account.is_ok(), account_by_rule, "{:?}", text);
        if in_any_format.is_err() && key_id.is_err() && account.is_err() {
            reached.hit("refused");
        }
        Ok(())
    });
}

/// One character of a real token's body changed: a typo or a forgery. The format refuses it for
/// its checksum (another base32 character), its alphabet (another ASCII character) or its length
/// (a wider character), and verification refuses it for that reason without asking the store.
#[test]
fn a_token_with_one_body_character_changed_is_refused_without_a_store_read() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let service = KeyService::builder(Instrumented::new(MemoryStore::new()), live()).build();
    let expected = [("checksum", 40), ("alphabet", 15), ("length", 5)];
    check(file!(), 512, (any::<Index>(), replacement()), &expected, |(position, replacement), reached| {
        let (token, _) = live().generate().unwrap();
        let token = token.expose_secret();
        prop_assert!(live().parse(token).is_ok());
        let at = LIVE_LEAD.len() + position.index(BODY_CHARS);
        let original = BASE32.iter().position(|&c| c == token.as_bytes()[at]).expect("a body character");
        let (with, reason, branch) = match replacement {
            Replacement::OtherBase32(shift) => {
                (char::from(BASE32[(original + shift) % 32]), TokenError::Checksum, "checksum")
            }
            Replacement::Ascii(with) => (with, TokenError::Alphabet, "alphabet"),
            Replacement::Wide(with) => (with, TokenError::Length, "length"),
        };
        let changed = format!("{}{with}{}", &token[..at], &token[at + 1..]);
        prop_assert_eq!(live().parse(&changed), Err(reason), "{} changed to {:?}", token, changed);
        prop_assert_eq!(TokenParts::parse(&changed), Err(reason), "{:?}", changed);
        let verified = runtime.block_on(service.verify(&changed));
        prop_assert!(matches!(verified, Err(Rejection::Malformed(r)) if r == reason), "{:?}", verified);
        prop_assert_eq!(service.store().total_calls(), 0, "the store was asked about {:?}", changed);
        reached.hit(branch);
        Ok(())
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random operation sequences: every outcome and every list equal the model's.
    #[test]
    fn the_service_over_the_memory_store_behaves_like_the_model(ops in support::model::ops()) {
        support::model::run(|| async { MemoryStore::new() }, &ops)?;
    }

    #[test]
    fn generated_tokens_parse_back_in_any_valid_format(
        namespace in "[a-z][a-z0-9]{1,15}",
        environment in "[a-z]{1,8}",
    ) {
        let format = KeyFormat::new(&namespace, Environment::new(&environment).unwrap()).unwrap();
        let (token, prefix) = format.generate().unwrap();
        let parts = format.parse(token.expose_secret()).unwrap();
        prop_assert_eq!(parts.as_str(), token.expose_secret());
        prop_assert_eq!(parts.prefix(), prefix.as_str());
        prop_assert_eq!(parts.namespace(), namespace.as_str());
        prop_assert_eq!(parts.environment(), environment.as_str());
        prop_assert_eq!(TokenParts::parse(token.expose_secret()), Ok(parts));
    }

    #[test]
    fn key_ids_round_trip(value in any::<u128>()) {
        let id = KeyId::from_uuid(uuid::Uuid::from_u128(value));
        prop_assert_eq!(id.to_string().parse::<KeyId>(), Ok(id));
        prop_assert_eq!(id.to_string().len(), 29);
    }

    #[test]
    fn key_id_order_is_text_order(a in any::<u128>(), b in any::<u128>()) {
        let (a, b) = (KeyId::from_uuid(uuid::Uuid::from_u128(a)), KeyId::from_uuid(uuid::Uuid::from_u128(b)));
        prop_assert_eq!(a.cmp(&b), a.to_string().cmp(&b.to_string()));
    }

    #[test]
    fn no_public_type_prints_a_secret(name in proptest::option::of("[a-z]{1,10}")) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let clock = ManualClock::new(T0);
            let service = KeyService::builder(MemoryStore::new(), live()).clock(clock.clone()).build();
            let account = AccountId::new("acct").unwrap();
            let created = service.create(&account, name.map_or_else(NewKey::default, |name| NewKey::named(&name).unwrap()).expires_at(T0 + time::Duration::hours(1))).await.unwrap();
            let token = created.key.expose_secret().to_owned();
            let caller = service.verify(&token).await.unwrap();
            let listed = service.list(&account).await.unwrap();
            let stored = service.store().find_by_digest(&apikeys::Digest::sha256(&token)).await.unwrap().unwrap();
            let second = service.create(&account, NewKey::default()).await.unwrap();
            let self_revoke = service.revoke(&caller, &created.id).await.unwrap_err();
            service.revoke(&service.verify(second.key.expose_secret()).await.unwrap(), &created.id).await.unwrap();
            let revoked = service.verify(&token).await.unwrap_err();
            clock.advance(time::Duration::hours(2));
            let bad_id = token.parse::<KeyId>().unwrap_err();
            let outputs = [
                format!("{created:?} {:?}", created.key),
                format!("{caller:?}"),
                format!("{listed:?}"),
                format!("{stored:?}"),
                format!("{self_revoke:?} {self_revoke}"),
                format!("{revoked:?} {revoked}"),
                format!("{bad_id:?} {bad_id}"),
                format!("{service:?}"),
            ];
            for output in outputs {
                assert_no_secret(&output, &token);
            }
            assert!(matches!(revoked, Rejection::Revoked));
        });
    }
}
