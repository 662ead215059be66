//! The rules of SPEC §4, one test each, through the public API over the memory store.

mod support;

use std::sync::Arc;

use apikeys::{
    AccountId, DigestScheme, Environment, Error, KeyFormat, KeyId, KeyService, KeyStore, ManualClock, MemoryStore,
    NewKey, Pepper, Rejection, TokenError, ValidationError,
};
use support::{Call, Fault, Instrumented, T0, account, assert_no_secret, live};
use time::Duration;

type Service = KeyService<Arc<Instrumented<MemoryStore>>>;

struct Fixture {
    service: Service,
    store: Arc<Instrumented<MemoryStore>>,
    clock: ManualClock,
}

fn fixture() -> Fixture {
    fixture_with(|builder| builder)
}

fn fixture_with(
    configure: impl FnOnce(
        apikeys::KeyServiceBuilder<Arc<Instrumented<MemoryStore>>>,
    ) -> apikeys::KeyServiceBuilder<Arc<Instrumented<MemoryStore>>>,
) -> Fixture {
    let store = Arc::new(Instrumented::new(MemoryStore::new()));
    let clock = ManualClock::new(T0);
    let service = configure(KeyService::builder(store.clone(), live()).clock(clock.clone())).build();
    Fixture { service, store, clock }
}

fn named(name: &str) -> NewKey {
    NewKey::named(name).unwrap()
}

fn expiring_in(duration: Duration) -> NewKey {
    NewKey::default().expires_at(T0 + duration)
}

/// Creates a key and verifies it: the key and its caller identity.
async fn caller(service: &Service, account: &AccountId) -> (apikeys::CreatedKey, apikeys::AuthenticatedKey) {
    let created = service.create(account, NewKey::default()).await.unwrap();
    let authenticated = service.verify(created.key.expose_secret()).await.unwrap();
    (created, authenticated)
}

#[tokio::test]
async fn create_returns_the_key_once_with_id_prefix_name_and_message() {
    let Fixture { service, .. } = fixture();
    let created = service.create(&account("acme"), named("production-agent")).await.unwrap();
    let token = created.key.expose_secret();
    assert!(token.starts_with("as_live_v1_"));
    assert_eq!(token.len(), 50);
    assert_eq!(created.prefix.as_str(), &token[..15]);
    assert_eq!(created.name.as_deref(), Some("production-agent"));
    assert_eq!(created.created_at, T0);
    assert_eq!(created.expires_at, None);
    assert!(created.id.to_string().starts_with("ak_"));
    assert_eq!(apikeys::CreatedKey::MESSAGE, "Store this key securely. It will not be shown again.");
}

#[tokio::test]
async fn a_created_key_verifies_as_its_account() {
    let Fixture { service, .. } = fixture();
    let created = service.create(&account("acme"), named("ci")).await.unwrap();
    let caller = service.verify(created.key.expose_secret()).await.unwrap();
    assert_eq!(caller.id, created.id);
    assert_eq!(caller.account, account("acme"));
    assert_eq!(caller.prefix, created.prefix);
    assert_eq!(caller.name.as_deref(), Some("ci"));
}

#[tokio::test]
async fn the_store_never_holds_the_token() {
    let Fixture { service, store, .. } = fixture();
    let created = service.create(&account("acme"), named("n")).await.unwrap();
    let token = created.key.expose_secret();
    let stored = store.find_by_digest(&apikeys::Digest::sha256(token)).await.unwrap().unwrap();
    assert_eq!(stored.digest.scheme(), DigestScheme::Sha256);
    assert_eq!(stored.prefix, created.prefix);
    assert_no_secret(&format!("{stored:?}"), token);
}

#[tokio::test]
async fn list_shows_active_keys_oldest_first_with_metadata_only() {
    let Fixture { service, clock, .. } = fixture();
    let acme = account("acme");
    let first = service.create(&acme, named("first")).await.unwrap();
    clock.advance(Duration::seconds(1));
    let second = service.create(&acme, expiring_in(Duration::days(1))).await.unwrap();
    service.create(&account("other"), named("not acme's")).await.unwrap();
    let keys = service.list(&acme).await.unwrap();
    assert_eq!(keys.iter().map(|key| key.id).collect::<Vec<_>>(), [first.id, second.id]);
    assert_eq!(keys[0].prefix, first.prefix);
    assert_eq!(keys[0].name.as_deref(), Some("first"));
    assert_eq!(keys[1].name, None);
    assert_eq!(keys[1].expires_at, Some(T0 + Duration::days(1)));
    assert_eq!(keys[1].created_at, T0 + Duration::seconds(1));
    assert_eq!(keys[0].last_used_at, None);
    let shown = format!("{keys:?}");
    assert_no_secret(&shown, first.key.expose_secret());
    assert_no_secret(&shown, second.key.expose_secret());
}

#[tokio::test]
async fn names_are_validated_never_truncated() {
    let Fixture { service, store, .. } = fixture();
    for bad in [String::new(), "x".repeat(256), "a\u{0}b".into(), "new\nline".into()] {
        let refused = NewKey::named(&bad);
        assert_eq!(refused, Err(ValidationError::Name), "{bad:?}");
    }
    assert_eq!(store.calls(Call::Insert), 0, "invalid input never reaches the store");
    let longest = service.create(&account("acme"), named(&"ü".repeat(255))).await.unwrap();
    assert_eq!(longest.name.unwrap().chars().count(), 255);
}

#[tokio::test]
async fn expiry_must_be_in_the_future() {
    let Fixture { service, .. } = fixture();
    for past in [Duration::ZERO, Duration::seconds(-1), Duration::days(-400)] {
        let refused = service.create(&account("acme"), expiring_in(past)).await;
        assert!(matches!(refused, Err(Error::Invalid(ValidationError::ExpiryNotInFuture))), "{refused:?}");
    }
    assert!(service.create(&account("acme"), expiring_in(Duration::microseconds(1))).await.is_ok());
    let beyond_utc = time::macros::datetime!(9999-12-31 23:59:59 -01:00);
    let refused = service.create(&account("acme"), NewKey::default().expires_at(beyond_utc)).await;
    assert!(matches!(refused, Err(Error::Invalid(ValidationError::ExpiryOutOfRange))), "{refused:?}");
}

#[tokio::test]
async fn an_expired_key_is_refused_and_unlisted_from_its_expiry_instant() {
    let Fixture { service, clock, .. } = fixture();
    let acme = account("acme");
    let created = service.create(&acme, expiring_in(Duration::hours(1))).await.unwrap();
    clock.advance(Duration::hours(1) - Duration::microseconds(1));
    assert!(service.verify(created.key.expose_secret()).await.is_ok());
    assert_eq!(service.list(&acme).await.unwrap().len(), 1);
    clock.advance(Duration::microseconds(1));
    assert!(matches!(service.verify(created.key.expose_secret()).await, Err(Rejection::Expired)));
    assert!(service.list(&acme).await.unwrap().is_empty());
    let (_, admin_caller) = caller(&service, &acme).await;
    assert!(matches!(service.revoke(&admin_caller, &created.id).await, Err(Error::NotFound)));
}

#[tokio::test]
async fn a_revoked_key_is_refused_at_once() {
    let Fixture { service, .. } = fixture();
    let acme = account("acme");
    let (_, caller) = caller(&service, &acme).await;
    let target = service.create(&acme, named("leaked")).await.unwrap();
    service.revoke(&caller, &target.id).await.unwrap();
    assert!(matches!(service.verify(target.key.expose_secret()).await, Err(Rejection::Revoked)));
    assert!(service.list(&acme).await.unwrap().iter().all(|key| key.id != target.id));
}

#[tokio::test]
async fn a_key_cannot_revoke_itself() {
    let Fixture { service, .. } = fixture();
    let (created, caller) = caller(&service, &account("acme")).await;
    assert!(matches!(service.revoke(&caller, &created.id).await, Err(Error::CannotRevokeSelf)));
    assert!(service.verify(created.key.expose_secret()).await.is_ok(), "the key still works");
}

#[tokio::test]
async fn another_accounts_key_is_reported_as_not_found_and_stays_valid() {
    let Fixture { service, .. } = fixture();
    let (_, intruder) = caller(&service, &account("mallory")).await;
    let victim = service.create(&account("acme"), named("victim")).await.unwrap();
    assert!(matches!(service.revoke(&intruder, &victim.id).await, Err(Error::NotFound)));
    assert!(matches!(service.revoke(&intruder, &KeyId::from_uuid(uuid::Uuid::now_v7())).await, Err(Error::NotFound)));
    assert!(service.verify(victim.key.expose_secret()).await.is_ok());
    assert!(service.list(&account("mallory")).await.unwrap().iter().all(|key| key.id != victim.id));
}

#[tokio::test]
async fn revoking_twice_is_not_found_the_second_time() {
    let Fixture { service, .. } = fixture();
    let acme = account("acme");
    let (_, caller) = caller(&service, &acme).await;
    let target = service.create(&acme, NewKey::default()).await.unwrap();
    service.revoke(&caller, &target.id).await.unwrap();
    assert!(matches!(service.revoke(&caller, &target.id).await, Err(Error::NotFound)));
}

#[tokio::test]
async fn the_administrator_can_revoke_a_key_in_use_but_only_in_its_account() {
    let Fixture { service, .. } = fixture();
    let acme = account("acme");
    let (only_key, _) = caller(&service, &acme).await;
    assert!(matches!(service.revoke_as_admin(&account("other"), &only_key.id).await, Err(Error::NotFound)));
    service.revoke_as_admin(&acme, &only_key.id).await.unwrap();
    assert!(matches!(service.verify(only_key.key.expose_secret()).await, Err(Rejection::Revoked)));
}

#[tokio::test]
async fn the_active_key_limit_counts_only_active_keys() {
    let Fixture { service, clock, .. } = fixture_with(|builder| builder.max_active_keys_per_account(3));
    let acme = account("acme");
    let first = service.create(&acme, NewKey::default()).await.unwrap();
    service.create(&acme, expiring_in(Duration::minutes(5))).await.unwrap();
    service.create(&acme, NewKey::default()).await.unwrap();
    let refused = service.create(&acme, NewKey::default()).await;
    assert!(matches!(refused, Err(Error::KeyLimitReached { limit: 3 })), "{refused:?}");
    assert!(service.create(&account("other"), NewKey::default()).await.is_ok(), "the limit is per account");

    service.revoke_as_admin(&acme, &first.id).await.unwrap();
    service.create(&acme, NewKey::default()).await.expect("revoking frees a place");
    assert!(service.create(&acme, NewKey::default()).await.is_err());
    clock.advance(Duration::minutes(5));
    service.create(&acme, NewKey::default()).await.expect("expiry frees a place");
    assert_eq!(service.list(&acme).await.unwrap().len(), 3);
}

#[tokio::test]
async fn malformed_tokens_are_refused_without_touching_the_store() {
    let Fixture { service, store, .. } = fixture();
    let test_format = KeyFormat::new("as", Environment::TEST).unwrap();
    let (test_token, _) = test_format.generate().unwrap();
    let (other_service_token, _) = KeyFormat::new("gh", Environment::LIVE).unwrap().generate().unwrap();
    let (good, _) = live().generate().unwrap();
    let good = good.expose_secret();
    let mut bad_checksum = good.to_owned();
    bad_checksum.replace_range(20..21, if &good[20..21] == "a" { "b" } else { "a" });
    let cases = [
        ("", TokenError::Length),
        ("as_live_v1_", TokenError::Length),
        (test_token.expose_secret(), TokenError::Environment),
        (other_service_token.expose_secret(), TokenError::Namespace),
        (&bad_checksum, TokenError::Checksum),
        (&good.replace("_v1_", "_v2_"), TokenError::Version),
        ("Bearer xyz", TokenError::Length),
    ];
    for (token, reason) in cases {
        match service.verify(token).await {
            Err(Rejection::Malformed(found)) => assert_eq!(found, reason),
            other => panic!("expected malformed ({reason:?}), got {other:?}"),
        }
    }
    assert_eq!(store.total_calls(), 0);
}

#[tokio::test]
async fn a_well_formed_token_without_a_key_is_unknown() {
    let Fixture { service, store, .. } = fixture();
    let (token, _) = live().generate().unwrap();
    assert!(matches!(service.verify(token.expose_secret()).await, Err(Rejection::Unknown)));
    assert_eq!(store.calls(Call::FindByDigest), 1, "one indexed read");
}

#[tokio::test]
async fn last_used_is_shown_at_once_and_written_once_per_interval() {
    let Fixture { service, store, clock } = fixture();
    let acme = account("acme");
    let created = service.create(&acme, NewKey::default()).await.unwrap();
    let token = created.key.expose_secret();

    service.verify(token).await.unwrap();
    assert_eq!(store.calls(Call::RecordLastUsed), 1, "the first use is written at once");
    for _ in 0..100 {
        clock.advance(Duration::milliseconds(500));
        service.verify(token).await.unwrap();
    }
    assert_eq!(store.calls(Call::RecordLastUsed), 1, "uses within the interval are coalesced");
    let listed = service.list(&acme).await.unwrap();
    assert_eq!(listed[0].last_used_at, Some(T0 + Duration::seconds(50)), "list shows the newest use");
    let stored = store.find_by_digest(&apikeys::Digest::sha256(token)).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(T0));

    clock.advance(Duration::seconds(10));
    service.verify(token).await.unwrap();
    assert_eq!(store.calls(Call::RecordLastUsed), 2, "the next use after the interval writes");
    let stored = store.find_by_digest(&apikeys::Digest::sha256(token)).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(T0 + Duration::seconds(60)));
}

/// An operator's check is no use of the key: its lastUsedAt stays as it was.
#[tokio::test]
async fn a_check_only_leaves_last_used_alone() {
    let Fixture { service, store, .. } = fixture();
    let acme = account("acme");
    let created = service.create(&acme, NewKey::default()).await.unwrap();
    let checked = service.verify_usage(created.key.expose_secret(), &apikeys::Usage::check_only()).await;
    assert_eq!(checked.unwrap().id, created.id);
    service.flush().await.unwrap();
    assert_eq!(service.list(&acme).await.unwrap()[0].last_used_at, None);
    assert_eq!(store.calls(Call::RecordLastUsed), 0);
}

#[tokio::test]
async fn flush_writes_what_is_pending() {
    let Fixture { service, store, clock } = fixture();
    let created = service.create(&account("acme"), NewKey::default()).await.unwrap();
    let token = created.key.expose_secret();
    service.verify(token).await.unwrap();
    clock.advance(Duration::seconds(5));
    service.verify(token).await.unwrap();
    service.flush().await.unwrap();
    let stored = store.find_by_digest(&apikeys::Digest::sha256(token)).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(T0 + Duration::seconds(5)));
    let writes = store.calls(Call::RecordLastUsed);
    service.flush().await.unwrap();
    assert_eq!(store.calls(Call::RecordLastUsed), writes, "nothing pending, nothing written");
}

#[tokio::test]
async fn without_last_used_verification_never_writes() {
    let Fixture { service, store, .. } = fixture_with(|builder| builder.without_last_used());
    let acme = account("acme");
    let created = service.create(&acme, NewKey::default()).await.unwrap();
    service.verify(created.key.expose_secret()).await.unwrap();
    service.flush().await.unwrap();
    assert_eq!(store.calls(Call::RecordLastUsed), 0);
    assert_eq!(service.list(&acme).await.unwrap()[0].last_used_at, None);
}

#[tokio::test]
async fn a_failed_last_used_write_does_not_fail_verification_and_is_retried() {
    let Fixture { service, store, clock } = fixture();
    let created = service.create(&account("acme"), NewKey::default()).await.unwrap();
    let token = created.key.expose_secret();
    store.fail(Call::RecordLastUsed, true);
    service.verify(token).await.expect("lastUsedAt is metadata: its failure does not refuse the key");
    assert!(matches!(service.flush().await, Err(Error::Store(_))));
    store.fail(Call::RecordLastUsed, false);
    clock.advance(Duration::seconds(1));
    service.flush().await.unwrap();
    let stored = store.find_by_digest(&apikeys::Digest::sha256(token)).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(T0), "the failed batch was kept and written later");
}

/// A flush whose caller goes away (a request that is cancelled while its verification writes the
/// batch) loses nothing: stores write large batches in several steps, and the times not known to
/// be written go back to be written with the next batch.
#[tokio::test]
async fn a_flush_dropped_part_way_keeps_its_batch_for_the_next() {
    let Fixture { service, store, .. } = fixture();
    let created = service.create(&account("acme"), NewKey::default()).await.unwrap();
    let token = created.key.expose_secret();
    store.fail(Call::RecordLastUsed, true);
    service.verify(token).await.unwrap();
    store.inject(Call::RecordLastUsed, Some(Fault::Hang));
    let dropped = tokio::time::timeout(std::time::Duration::from_millis(50), service.flush()).await;
    assert!(dropped.is_err(), "the store never answers, so the flush is dropped unfinished");
    store.heal();
    service.flush().await.unwrap();
    let stored = store.find_by_digest(&apikeys::Digest::sha256(token)).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(T0), "the dropped batch was written by the next flush");
}

#[tokio::test]
async fn a_store_failure_is_never_reported_as_a_bad_key() {
    let Fixture { service, store, .. } = fixture();
    let acme = account("acme");
    let created = service.create(&acme, NewKey::default()).await.unwrap();
    store.fail(Call::FindByDigest, true);
    let rejection = service.verify(created.key.expose_secret()).await.unwrap_err();
    assert!(matches!(rejection, Rejection::Store(_)), "{rejection:?}");
    assert_eq!(rejection.reason(), "store_error");

    store.fail(Call::Insert, true);
    let failed = service.create(&acme, NewKey::default()).await.unwrap_err();
    assert!(matches!(failed, Error::Store(_)), "{failed:?}");
    assert!(std::error::Error::source(&failed).is_some(), "the backend error is kept as the source");
    store.fail(Call::ListActive, true);
    assert!(matches!(service.list(&acme).await, Err(Error::Store(_))));
    store.fail(Call::Revoke, true);
    assert!(matches!(service.revoke_as_admin(&acme, &created.id).await, Err(Error::Store(_))));
}

#[tokio::test]
async fn a_failed_create_leaves_nothing_that_could_verify() {
    let Fixture { service, store, .. } = fixture();
    store.fail(Call::Insert, true);
    assert!(service.create(&account("acme"), NewKey::default()).await.is_err());
    store.fail(Call::Insert, false);
    assert_eq!(store.inner.record_count(), 0);
}

#[tokio::test]
async fn a_pepper_makes_hmac_digests_and_keeps_older_keys_working_only_when_told() {
    let store = Arc::new(MemoryStore::new());
    let plain = KeyService::builder(store.clone(), live()).build();
    let acme = account("acme");
    let before = plain.create(&acme, NewKey::default()).await.unwrap();

    let pepper = Pepper::new(*b"0123456789abcdef0123456789abcdef").unwrap();
    let peppered = KeyService::builder(store.clone(), live()).pepper(pepper.clone()).build();
    let after = peppered.create(&acme, NewKey::default()).await.unwrap();
    let stored = store.find_by_digest(&apikeys::Digest::hmac_sha256(&pepper, after.key.expose_secret())).await.unwrap();
    assert_eq!(stored.unwrap().digest.scheme(), DigestScheme::HmacSha256);

    assert!(peppered.verify(after.key.expose_secret()).await.is_ok());
    assert!(matches!(peppered.verify(before.key.expose_secret()).await, Err(Rejection::Unknown)), "off by default");
    let migrating = KeyService::builder(store.clone(), live()).pepper(pepper.clone()).accept_unpeppered_keys().build();
    assert!(migrating.verify(before.key.expose_secret()).await.is_ok(), "a key from before the pepper");
    assert!(migrating.verify(after.key.expose_secret()).await.is_ok());
    assert!(matches!(plain.verify(after.key.expose_secret()).await, Err(Rejection::Unknown)), "no pepper, no match");
    let other_pepper = KeyService::builder(store, live()).pepper(Pepper::new([1u8; 32]).unwrap()).build();
    assert!(matches!(other_pepper.verify(after.key.expose_secret()).await, Err(Rejection::Unknown)));
}

#[tokio::test]
async fn clones_of_a_service_share_revocations_and_last_used() {
    let Fixture { service, .. } = fixture();
    let other = service.clone();
    let acme = account("acme");
    let created = service.create(&acme, NewKey::default()).await.unwrap();
    other.verify(created.key.expose_secret()).await.unwrap();
    assert_eq!(service.list(&acme).await.unwrap()[0].last_used_at, Some(T0));
    other.revoke_as_admin(&acme, &created.id).await.unwrap();
    assert!(matches!(service.verify(created.key.expose_secret()).await, Err(Rejection::Revoked)));
}

#[tokio::test]
async fn service_over_a_dyn_store_works() {
    let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
    let service: KeyService = KeyService::builder(store, live()).build();
    let created = service.create(&account("acme"), NewKey::default()).await.unwrap();
    assert!(service.verify(created.key.expose_secret()).await.is_ok());
}

#[tokio::test]
async fn errors_say_what_to_do_and_never_echo_input() {
    let Fixture { service, .. } = fixture();
    let created = service.create(&account("acme"), NewKey::default()).await.unwrap();
    let token = created.key.expose_secret();
    let messages = [
        token.parse::<KeyId>().unwrap_err().to_string(),
        AccountId::new(token.repeat(3)).unwrap_err().to_string(),
        Error::CannotRevokeSelf.to_string(),
        Error::KeyLimitReached { limit: 100 }.to_string(),
    ];
    for message in &messages {
        assert_no_secret(message, token);
    }
    assert!(messages[0].contains("ak_"), "{}", messages[0]);
    assert!(messages[3].contains("revoke one"), "{}", messages[3]);
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn the_background_flusher_writes_on_schedule_and_no_verification_waits_for_it() {
    let Fixture { service, store, .. } =
        fixture_with(|builder| builder.last_used_interval(std::time::Duration::from_millis(50)));
    let flusher = service.spawn_flusher().expect("the first flusher starts");
    let created = service.create(&account("acme"), NewKey::default()).await.unwrap();
    service.verify(created.key.expose_secret()).await.unwrap();
    assert_eq!(store.calls(Call::RecordLastUsed), 0, "the verification only noted the time");
    let digest = apikeys::Digest::sha256(created.key.expose_secret());
    let stored = || store.inner.find_by_digest_now(&digest).unwrap().unwrap().expect("the key is stored");
    support::eventually("the flusher to write lastUsedAt without further traffic", || {
        stored().last_used_at == Some(T0)
    })
    .await;
    drop(service);
    tokio::time::timeout(std::time::Duration::from_secs(5), flusher)
        .await
        .expect("the task ends with the service")
        .unwrap();
}

/// A store that answers a lookup with the record of another key (a bug, or a corrupt index).
#[derive(Debug)]
struct Confused {
    inner: MemoryStore,
    decoy: apikeys::Digest,
    /// Whether it answers through `find_by_digest_now` too (the path verification tries first).
    answers_now: bool,
}

#[async_trait::async_trait]
impl KeyStore for Confused {
    async fn insert(
        &self,
        record: &apikeys::KeyRecord,
        max_active: u32,
        entry: &apikeys::audit::Entry,
    ) -> Result<(), apikeys::StoreError> {
        self.inner.insert(record, max_active, entry).await
    }
    async fn find_by_digest(&self, _: &apikeys::Digest) -> Result<Option<apikeys::KeyRecord>, apikeys::StoreError> {
        self.inner.find_by_digest(&self.decoy).await
    }
    fn find_by_digest_now(
        &self,
        _: &apikeys::Digest,
    ) -> Option<Result<Option<apikeys::KeyRecord>, apikeys::StoreError>> {
        self.answers_now.then(|| self.inner.find_by_digest_now(&self.decoy)).flatten()
    }
    async fn list_active(
        &self,
        account: &AccountId,
        now: time::OffsetDateTime,
    ) -> Result<Vec<apikeys::KeyRecord>, apikeys::StoreError> {
        self.inner.list_active(account, now).await
    }
    async fn revoke(
        &self,
        account: &AccountId,
        id: &KeyId,
        at: time::OffsetDateTime,
        entry: &apikeys::audit::Entry,
    ) -> Result<bool, apikeys::StoreError> {
        self.inner.revoke(account, id, at, entry).await
    }
    async fn update(
        &self,
        account: &AccountId,
        id: &KeyId,
        change: &apikeys::Change,
        entry: &apikeys::audit::Entry,
    ) -> Result<Option<apikeys::KeyRecord>, apikeys::StoreError> {
        self.inner.update(account, id, change, entry).await
    }
    async fn take_credits(
        &self,
        id: &KeyId,
        take: apikeys::Take,
    ) -> Result<Option<apikeys::Taken>, apikeys::StoreError> {
        self.inner.take_credits(id, take).await
    }
    async fn find_owner(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
    ) -> Result<Option<apikeys::OwnerLimits>, apikeys::StoreError> {
        self.inner.find_owner(account, owner).await
    }
    async fn update_owner(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
        update: &apikeys::OwnerUpdate,
        at: time::OffsetDateTime,
        entry: &apikeys::audit::Entry,
    ) -> Result<Option<apikeys::OwnerLimits>, apikeys::StoreError> {
        self.inner.update_owner(account, owner, update, at, entry).await
    }
    async fn audit_log(
        &self,
        account: &AccountId,
        query: apikeys::audit::AuditQuery,
    ) -> Result<Vec<apikeys::audit::AuditEvent>, apikeys::StoreError> {
        self.inner.audit_log(account, query).await
    }
    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
        take: apikeys::Take,
    ) -> Result<Option<apikeys::Taken>, apikeys::StoreError> {
        self.inner.take_owner_credits(account, owner, take).await
    }
    async fn expiring_keys(
        &self,
        now: time::OffsetDateTime,
        by: time::OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<apikeys::KeyRecord>, apikeys::StoreError> {
        self.inner.expiring_keys(now, by, limit).await
    }
    async fn note_expiry(
        &self,
        account: &apikeys::AccountId,
        id: &apikeys::KeyId,
        now: time::OffsetDateTime,
        entry: &apikeys::audit::Entry,
    ) -> Result<bool, apikeys::StoreError> {
        self.inner.note_expiry(account, id, now, entry).await
    }
    async fn claim_deliveries(
        &self,
        endpoint: &apikeys::webhook::EndpointName,
        claim: &apikeys::webhook::Claim,
        limit: u32,
    ) -> Result<Vec<apikeys::webhook::Delivery>, apikeys::StoreError> {
        self.inner.claim_deliveries(endpoint, claim, limit).await
    }
    async fn settle_delivery(
        &self,
        delivery: &apikeys::webhook::Delivery,
        outcome: &apikeys::webhook::Outcome,
    ) -> Result<bool, apikeys::StoreError> {
        self.inner.settle_delivery(delivery, outcome).await
    }
    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<apikeys::webhook::DeadDelivery>, apikeys::StoreError> {
        self.inner.dead_deliveries(limit).await
    }
    async fn pending_deliveries(&self) -> Result<u64, apikeys::StoreError> {
        self.inner.pending_deliveries().await
    }
    async fn record_last_used(&self, uses: &[(KeyId, time::OffsetDateTime)]) -> Result<(), apikeys::StoreError> {
        self.inner.record_last_used(uses).await
    }
    async fn find_by_id(
        &self,
        account: &AccountId,
        id: &KeyId,
    ) -> Result<Option<apikeys::KeyRecord>, apikeys::StoreError> {
        self.inner.find_by_id(account, id).await
    }
    async fn roll(
        &self,
        roll: &apikeys::store::Roll,
        max_active: u32,
        entry: &apikeys::audit::Entry,
    ) -> Result<bool, apikeys::StoreError> {
        self.inner.roll(roll, max_active, entry).await
    }
}

#[tokio::test]
async fn a_store_that_answers_with_the_wrong_record_never_lets_a_key_in() {
    let plain = KeyService::builder(MemoryStore::new(), live()).build();
    let decoy = plain.create(&account("victim"), NewKey::default()).await.unwrap();
    let digest = apikeys::Digest::sha256(decoy.key.expose_secret());
    let victim_record = plain.store().find_by_digest(&digest).await.unwrap().unwrap();
    for answers_now in [false, true] {
        let inner = MemoryStore::new();
        apikeys::Maintenance::import(&inner, vec![victim_record.clone()]).await.unwrap();
        let confused = KeyService::builder(Confused { inner, decoy: digest, answers_now }, live()).build();
        let (attacker, _) = live().generate().unwrap();
        let outcome = confused.verify(attacker.expose_secret()).await;
        assert!(matches!(outcome, Err(Rejection::Unknown)), "the digest is checked again: {outcome:?}");
        assert!(confused.verify(decoy.key.expose_secret()).await.is_ok(), "the right key still works");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_verification_that_starts_after_the_clock_passes_expiry_succeeds() {
    let Fixture { service, clock, .. } = fixture();
    let created = service.create(&account("acme"), expiring_in(Duration::seconds(10))).await.unwrap();
    let token = created.key.expose_secret().to_owned();
    let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let before_expiry = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let verifiers: Vec<_> = (0..2)
        .map(|_| {
            let (service, token, expired) = (service.clone(), token.clone(), expired.clone());
            let before_expiry = before_expiry.clone();
            tokio::spawn(async move {
                // Until 200 verifications have started after the expiry (bounded, whatever the timing).
                let mut after_expiry = 0;
                for _ in 0..1_000_000 {
                    let started_after_expiry = expired.load(std::sync::atomic::Ordering::SeqCst);
                    let outcome = service.verify(&token).await;
                    if !started_after_expiry {
                        // Either outcome is right: the clock may pass the expiry while it runs.
                        before_expiry.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    } else {
                        assert!(matches!(outcome, Err(Rejection::Expired)), "{outcome:?}");
                        after_expiry += 1;
                        if after_expiry == 200 {
                            break;
                        }
                    }
                    tokio::task::yield_now().await;
                }
                after_expiry
            })
        })
        .collect();
    // The clock passes the expiry while verifications are under way.
    support::eventually("verifications to be under way before the expiry", || {
        before_expiry.load(std::sync::atomic::Ordering::SeqCst) >= 20
    })
    .await;
    clock.advance(Duration::seconds(10));
    expired.store(true, std::sync::atomic::Ordering::SeqCst);
    for verifier in verifiers {
        assert_eq!(verifier.await.unwrap(), 200, "each verifier saw 200 verifications start after the expiry");
    }
}

#[tokio::test]
async fn a_fault_at_any_store_call_is_typed_and_leaves_a_consistent_store() {
    // A fixed scenario, run once per store call and fault, faulting that call; then checked with
    // a healthy store. A lost acknowledgement means the call took effect but reported a failure.
    for fault in [Fault::Fail, Fault::LoseAcknowledgement] {
        let took_effect = fault == Fault::LoseAcknowledgement;
        for faulty in 0..12 {
            let case = format!("{fault:?} at call {faulty}");
            let Fixture { service, store, .. } =
                fixture_with(|builder| builder.last_used_interval(std::time::Duration::ZERO));
            let acme = account("acme");
            store.fault_call_number(faulty, fault);
            let (mut created, mut failed_creates, mut revoked, mut failed_revokes) = (vec![], 0, vec![], vec![]);
            let mut errors = Vec::new();
            for _ in 0..3 {
                match service.create(&acme, NewKey::default()).await {
                    Ok(key) => created.push(key),
                    Err(error) => {
                        assert!(matches!(error, Error::Store(_)), "{case}: {error:?}");
                        failed_creates += 1;
                        errors.push(format!("{error:?} {error}"));
                    }
                }
            }
            for key in &created {
                if let Err(rejection) = service.verify(key.key.expose_secret()).await {
                    assert!(matches!(rejection, Rejection::Store(_)), "{case}: {rejection:?}");
                    errors.push(format!("{rejection:?} {rejection}"));
                }
            }
            if let Some(first) = created.first() {
                match service.revoke_as_admin(&acme, &first.id).await {
                    Ok(()) => revoked.push(first.id),
                    Err(error) => {
                        assert!(matches!(error, Error::Store(_)), "{case}: {error:?}");
                        failed_revokes.push(first.id);
                    }
                }
            }
            if let Err(error) = service.list(&acme).await {
                assert!(matches!(error, Error::Store(_)), "{case}: {error:?}");
            }
            for (error, key) in errors.iter().zip(&created) {
                assert_no_secret(error, key.key.expose_secret());
            }

            // With the store healthy again: every acknowledged key exists, revoked as acknowledged;
            // a create whose acknowledgement was lost left a key whose token nobody holds.
            store.heal();
            let revoked_in_fact = |id: &KeyId| revoked.contains(id) || (took_effect && failed_revokes.contains(id));
            let orphans = if took_effect { failed_creates } else { 0 };
            assert_eq!(store.inner.record_count(), created.len() + orphans, "{case}: records left");
            let listed: Vec<KeyId> = service.list(&acme).await.unwrap().iter().map(|key| key.id).collect();
            let expected: Vec<KeyId> = created.iter().map(|key| key.id).filter(|id| !revoked_in_fact(id)).collect();
            assert_eq!(listed.len(), expected.len() + orphans, "{case}");
            assert!(expected.iter().all(|id| listed.contains(id)), "{case}");
            for key in &created {
                let outcome = service.verify(key.key.expose_secret()).await;
                assert_eq!(outcome.is_ok(), !revoked_in_fact(&key.id), "{case}: {outcome:?}");
            }
        }
    }
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn a_last_used_write_that_never_returns_holds_up_no_verification() {
    let Fixture { service, store, clock } =
        fixture_with(|builder| builder.last_used_interval(std::time::Duration::from_millis(5)));
    store.inject(Call::RecordLastUsed, Some(Fault::Hang));
    let _flusher = service.spawn_flusher();
    let created = service.create(&account("acme"), NewKey::default()).await.unwrap();
    // Bounded only to turn a hang into a failure; nothing here depends on how long a call takes.
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while store.calls(Call::RecordLastUsed) == 0 {
            clock.advance(Duration::seconds(1));
            service.verify(created.key.expose_secret()).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        for _ in 0..100 {
            clock.advance(Duration::seconds(1));
            service.verify(created.key.expose_secret()).await.unwrap();
        }
    })
    .await
    .expect("verification went on while the store's lastUsedAt write hung");
    let listed = service.list(&account("acme")).await.unwrap();
    assert_eq!(listed[0].last_used_at, Some(apikeys::Clock::now(&clock)), "the noted time is still shown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_slow_reads_no_verification_that_starts_after_a_revoke_returned_succeeds() {
    let Fixture { service, store, .. } = fixture();
    let created = service.create(&account("acme"), NewKey::default()).await.unwrap();
    store.inject(Call::FindByDigest, Some(Fault::Delay(std::time::Duration::from_millis(20))));
    store.inject(Call::Revoke, Some(Fault::Delay(std::time::Duration::from_millis(20))));
    let token = created.key.expose_secret().to_owned();
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let (service, token) = (service.clone(), token.clone());
            tokio::spawn(async move { service.verify(&token).await.map(|_| ()) })
        })
        .collect();
    service.revoke_as_admin(&account("acme"), &created.id).await.unwrap();
    let after = service.verify(&token).await;
    assert!(matches!(after, Err(Rejection::Revoked)), "{after:?}");
    for verification in in_flight {
        let outcome = verification.await.unwrap();
        assert!(matches!(outcome, Ok(()) | Err(Rejection::Revoked)), "{outcome:?}");
    }
}
