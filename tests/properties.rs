//! Property tests of the invariants: the service against a model over the memory store, token
//! and id round trips, and no secret in any `Debug` output.

mod support;

use apikeys::{
    AccountId, Environment, KeyFormat, KeyId, KeyService, KeyStore, ManualClock, MemoryStore, NewKey, Rejection,
    TokenParts,
};
use proptest::prelude::*;
use support::{T0, assert_no_secret, live};

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
    fn parsing_any_string_never_panics(input in any::<String>()) {
        let _ = live().parse(&input);
        let _ = TokenParts::parse(&input);
        let _ = input.parse::<KeyId>();
        let _ = AccountId::new(&input);
    }

    #[test]
    fn parsing_near_tokens_never_panics_and_never_accepts_a_wrong_checksum(
        lead in "(as|xy)_(live|test|v1)_v[0-9]_",
        body in "[a-z2-7A-Z0-9_é]{30,45}",
    ) {
        let input = format!("{lead}{body}");
        if let Ok(parts) = live().parse(&input) {
            // Only a string whose last 7 characters are its CRC32 can pass.
            prop_assert_eq!(parts.as_str(), input.as_str());
            prop_assert!(TokenParts::parse(&input).is_ok());
        }
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
