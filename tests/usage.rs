//! Spending credits and checking rate limits through the service: how many durable writes
//! spends cost, what a failing or slow store does to a use, and that a use given up half-way
//! takes nothing with it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use apikeys::{
    AccountId, Credits, KeyService, ManualClock, MemoryStore, NewKey, RateLimit, RateLimits, Rejection, Usage,
};
use support::{Call, Fault, Instrumented, T0, live};

type Store = Arc<Instrumented<MemoryStore>>;

fn service(lease: u64) -> (KeyService<Store>, Store) {
    let store = Arc::new(Instrumented::new(MemoryStore::new()));
    let service = KeyService::builder(store.clone(), live())
        .clock(ManualClock::new(T0))
        .credit_lease(lease)
        .without_last_used()
        .build();
    (service, store)
}

async fn key(service: &KeyService<Store>, new: NewKey) -> String {
    let created = service.create(&AccountId::new("acme").unwrap(), new).await.unwrap();
    created.key.expose_secret().to_owned()
}

fn credits(n: u64) -> NewKey {
    NewKey::default().credits(Credits::new(n).unwrap())
}

/// What the performance document reports as "durable writes per 10,000 spends".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_spends_cost_about_a_hundred_durable_writes_alone_or_at_once() {
    for (lease, tasks) in [(100, 1), (100, 8), (0, 1)] {
        let (service, store) = service(lease);
        let token = key(&service, credits(1_000_000)).await;
        // A store that takes a millisecond to answer, so that uses do arrive while a take is
        // under way.
        store.inject(Call::TakeCredits, Some(Fault::Delay(Duration::from_millis(1))));
        let mut spenders = Vec::new();
        for _ in 0..tasks {
            let (service, token) = (service.clone(), token.clone());
            spenders.push(tokio::spawn(async move {
                for _ in 0..10_000 / tasks {
                    service.verify(&token).await.unwrap();
                }
            }));
        }
        for spender in spenders {
            spender.await.unwrap();
        }
        let writes = store.calls(Call::TakeCredits);
        let bound = if lease == 0 { 10_000 } else { 2 * 10_000 / lease as usize };
        assert!(writes <= bound, "lease {lease}, {tasks} tasks: {writes} writes for 10,000 spends");
        let listed = service.list(&AccountId::new("acme").unwrap()).await.unwrap();
        assert_eq!(listed[0].credits.map(|credits| credits.remaining), Some(1_000_000 - 10_000), "exact");
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("lease {lease}, {tasks} tasks: {writes} durable writes per 10,000 spends\n").as_bytes(),
        );
    }
}

#[tokio::test]
async fn a_store_that_fails_a_take_refuses_the_use_and_counts_nothing() {
    let (service, store) = service(10);
    let limit = RateLimit::new("requests", 1, Duration::from_secs(60)).unwrap();
    let token = key(&service, credits(5).ratelimits(RateLimits::new([limit]).unwrap())).await;
    store.fail(Call::TakeCredits, true);
    assert!(matches!(service.verify(&token).await, Err(Rejection::Store(_))));
    store.fail(Call::TakeCredits, false);
    let key = service.verify(&token).await.expect("the failed use took no slot");
    assert_eq!(key.usage.credits, Some(4), "and no credit");
    assert!(matches!(service.verify(&token).await, Err(Rejection::RateLimited(_))));
}

#[tokio::test]
async fn a_use_given_up_while_it_waits_for_the_store_takes_nothing_with_it() {
    let (service, store) = service(10);
    let limit = RateLimit::new("requests", 1, Duration::from_secs(60)).unwrap();
    let token = key(&service, credits(100).ratelimits(RateLimits::new([limit]).unwrap())).await;
    store.inject(Call::TakeCredits, Some(Fault::Hang));
    let given_up = tokio::time::timeout(Duration::from_millis(20), service.verify(&token)).await;
    assert!(given_up.is_err(), "the use waits for the store that hangs");
    store.inject(Call::TakeCredits, None);
    let key = service.verify(&token).await.expect("the given-up use took no slot");
    assert_eq!(key.usage.credits, Some(99));
    // And the key still gets leases: the next uses spend without asking the store.
    let takes = store.calls(Call::TakeCredits);
    for _ in 0..5 {
        assert!(matches!(service.verify(&token).await, Err(Rejection::RateLimited(_))));
    }
    let uses = service.verify_usage(&token, &Usage::new().ratelimits::<&str>([])).await.unwrap();
    assert_eq!((uses.usage.credits, store.calls(Call::TakeCredits)), (Some(98), takes), "spent from the lease");
}

/// A take that lands after its use was given up (the future dropped, or past the store's
/// deadline) loses nothing: what it was granted is the lease's, and the next uses spend it.
#[cfg(feature = "tokio")]
#[tokio::test]
async fn a_take_that_lands_after_its_use_was_given_up_loses_nothing() {
    for deadline in [None, Some(Duration::from_millis(20))] {
        let store = Arc::new(Instrumented::new(MemoryStore::new()));
        let mut builder = KeyService::builder(store.clone(), live()).clock(ManualClock::new(T0)).credit_lease(10);
        if let Some(deadline) = deadline {
            builder = builder.store_deadline(deadline);
        }
        let service = builder.without_last_used().build();
        let token = key(&service, credits(100)).await;
        store.inject(Call::TakeCredits, Some(Fault::Delay(Duration::from_millis(100))));
        match deadline {
            None => assert!(tokio::time::timeout(Duration::from_millis(20), service.verify(&token)).await.is_err()),
            Some(_) => assert!(matches!(service.verify(&token).await, Err(Rejection::Store(_)))),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let listed = service.list(&AccountId::new("acme").unwrap()).await.unwrap();
        assert_eq!(listed[0].credits.map(|credits| credits.remaining), Some(100), "{deadline:?}: none lost");
        let used = service.verify(&token).await.unwrap();
        assert_eq!(used.usage.credits, Some(99));
        assert_eq!(store.calls(Call::TakeCredits), 1, "{deadline:?}: spent from the take given up");
    }
}

/// Takes given up one after another (a store slower than its deadline) leave at most a lease
/// and the use's cost in the lease: what a crash may lose stays within that bound.
#[cfg(feature = "tokio")]
#[tokio::test]
async fn takes_given_up_one_after_another_leave_at_most_a_lease_in_it() {
    let (service, store) = service(10);
    let token = key(&service, credits(100)).await;
    store.inject(Call::TakeCredits, Some(Fault::Delay(Duration::from_millis(100))));
    for _ in 0..2 {
        assert!(tokio::time::timeout(Duration::from_millis(20), service.verify(&token)).await.is_err());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.inject(Call::TakeCredits, None);
    // Each take granted 11 (1 and a lease of 10): 22 left the store, 11 of them are the lease's.
    let listed = service.list(&AccountId::new("acme").unwrap()).await.unwrap();
    assert_eq!(listed[0].credits.map(|credits| credits.remaining), Some(89));
    for left in (78..89).rev() {
        assert_eq!(service.verify(&token).await.unwrap().usage.credits, Some(left));
    }
    assert_eq!(store.calls(Call::TakeCredits), 2, "the lease paid for 11 uses");
}

#[tokio::test]
async fn a_use_of_cost_zero_checks_without_counting() {
    let (service, _) = service(10);
    let limit = RateLimit::new("requests", 1, Duration::from_secs(60)).unwrap();
    let token = key(&service, credits(0).ratelimits(RateLimits::new([limit]).unwrap())).await;
    for _ in 0..3 {
        let checked = service.verify_usage(&token, &Usage::new().cost(0)).await.unwrap();
        assert_eq!(checked.usage.ratelimits().next().map(|limit| limit.remaining), Some(1), "nothing counted");
    }
    assert!(matches!(service.verify(&token).await, Err(Rejection::UsageExceeded(_))), "no credits to spend");
    let unused = RateLimit::new("requests", 1, Duration::from_secs(60)).unwrap();
    let token = key(&service, NewKey::default().ratelimits(RateLimits::new([unused]).unwrap())).await;
    service.verify(&token).await.unwrap();
    let full = service.verify_usage(&token, &Usage::new().cost(0)).await;
    assert!(matches!(full, Err(Rejection::RateLimited(_))), "a full limit refuses a check too");
}

/// A key with three limits: each use counts in the windows of the limits it checks and no
/// other, and a refusal names the limit that refused it.
#[tokio::test]
async fn each_limit_of_a_key_counts_only_the_uses_that_check_it() {
    let (service, _) = service(10);
    let limit = |name, limit| RateLimit::new(name, limit, Duration::from_secs(60)).unwrap();
    let limits = RateLimits::new([limit("requests", 5), limit("tokens", 2), limit("images", 1)]).unwrap();
    let token = key(&service, NewKey::default().ratelimits(limits)).await;
    let left = |usage: &apikeys::UsageReport| -> Vec<(String, u32)> {
        usage.ratelimits().map(|limit| (limit.name.to_string(), limit.remaining)).collect()
    };
    let tokens = Usage::new().ratelimits(["requests", "tokens"]);
    let used = service.verify_usage(&token, &tokens).await.unwrap();
    assert_eq!(left(&used.usage), [("requests".into(), 4), ("tokens".into(), 1)]);
    let used = service.verify_usage(&token, &Usage::new().ratelimits(["images"])).await.unwrap();
    assert_eq!(left(&used.usage), [("images".into(), 0)], "the other windows are not this one's");
    let used = service.verify_usage(&token, &tokens).await.unwrap();
    assert_eq!(left(&used.usage), [("requests".into(), 3), ("tokens".into(), 0)]);
    let Err(Rejection::RateLimited(refused)) = service.verify_usage(&token, &tokens).await else {
        panic!("the third use of tokens is refused")
    };
    assert_eq!(refused.limit().map(|limit| limit.name.to_string()).as_deref(), Some("tokens"));
    assert_eq!(left(&refused.usage), [("requests".into(), 3), ("tokens".into(), 0)], "a refusal counts nothing");
    for remaining in [2, 1, 0] {
        let used = service.verify(&token).await.unwrap();
        assert_eq!(left(&used.usage), [("requests".into(), remaining)], "requests alone");
    }
    let Err(Rejection::RateLimited(refused)) = service.verify_usage(&token, &tokens).await else {
        panic!("both limits are full")
    };
    assert!(refused.limit().is_some(), "a full limit is named");
}

/// Of two full limits, a refusal names the one that frees up last, and says to retry then.
#[tokio::test]
async fn a_use_refused_by_two_limits_waits_for_the_one_that_frees_up_last() {
    let clock = ManualClock::new(T0);
    let service = KeyService::builder(MemoryStore::new(), live()).clock(clock.clone()).without_last_used().build();
    // 64 s in slots of 2 s: a use counts until the slot 33 after its own begins, 66 s on.
    let limit = |name| RateLimit::new(name, 1, Duration::from_secs(64)).unwrap();
    let limits = RateLimits::new([limit("requests"), limit("tokens")]).unwrap();
    let created = service.create(&AccountId::new("acme").unwrap(), NewKey::default().ratelimits(limits)).await;
    let token = created.unwrap().key.expose_secret().to_owned();
    service.verify_usage(&token, &Usage::new().ratelimits(["tokens"])).await.unwrap();
    clock.advance(time::Duration::seconds(10));
    service.verify(&token).await.unwrap();
    let both = Usage::new().ratelimits(["tokens", "requests"]);
    let Err(Rejection::RateLimited(refused)) = service.verify_usage(&token, &both).await else {
        panic!("both limits are full")
    };
    let reached = refused.limit().map(|limit| limit.name.to_string());
    assert_eq!((reached.as_deref(), refused.retry_after), (Some("requests"), Some(Duration::from_secs(66))));
}

#[tokio::test]
async fn changing_a_limits_window_never_frees_the_uses_it_counted() {
    let (service, _) = service(10);
    let limit = |ms| RateLimits::new([RateLimit::new("requests", 3, Duration::from_millis(ms)).unwrap()]).unwrap();
    let created = service.create(&AccountId::new("acme").unwrap(), NewKey::default().ratelimits(limit(60_000))).await;
    let (token, id) = (created.as_ref().unwrap().key.expose_secret().to_owned(), created.unwrap().id);
    for _ in 0..3 {
        service.verify(&token).await.unwrap();
    }
    // A window a millisecond longer is a tighter limit: the uses counted stay counted.
    for ms in [60_001, 60_002, 59_000] {
        let change = apikeys::KeyUpdate::default().ratelimits(limit(ms));
        service.update_as_admin(&AccountId::new("acme").unwrap(), &id, change).await.unwrap();
        assert!(matches!(service.verify(&token).await, Err(Rejection::RateLimited(_))), "window of {ms} ms");
    }
}

/// A key of 100 credits whose first use took a lease of 10, with its token and id.
async fn leased_key() -> (KeyService<Store>, Store, String, apikeys::KeyId) {
    let (service, store) = service(10);
    let created = service.create(&AccountId::new("acme").unwrap(), credits(100)).await.unwrap();
    let token = created.key.expose_secret().to_owned();
    service.verify(&token).await.unwrap();
    (service, store, token, created.id)
}

#[tokio::test]
async fn a_lease_taken_before_a_change_of_credits_is_not_spent_after_it() {
    let (service, store, token, id) = leased_key().await;
    // A use of 50 waits for the store while the credits are set to 0; then it is given up.
    store.inject(Call::TakeCredits, Some(Fault::Hang));
    let usage = Usage::new().cost(50);
    let waiting = tokio::time::timeout(Duration::from_millis(50), service.verify_usage(&token, &usage));
    let zero = apikeys::KeyUpdate::default().credits(Some(Credits::new(0).unwrap()));
    let (given_up, changed) = tokio::join!(waiting, async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        service.update_as_admin(&AccountId::new("acme").unwrap(), &id, zero).await
    });
    assert!(given_up.is_err() && changed.is_ok());
    store.inject(Call::TakeCredits, None);
    assert!(
        matches!(service.verify(&token).await, Err(Rejection::UsageExceeded(_))),
        "nothing of the old lease is left"
    );
}

/// A change of credits that lands though its answer is lost lets go of the lease all the same.
#[tokio::test]
async fn a_change_of_credits_whose_answer_is_lost_still_lets_go_of_the_lease() {
    let (service, store, token, id) = leased_key().await;
    store.inject(Call::Update, Some(Fault::LoseAcknowledgement));
    let five = apikeys::KeyUpdate::default().credits(Some(Credits::new(5).unwrap()));
    let changed = service.update_as_admin(&AccountId::new("acme").unwrap(), &id, five).await;
    assert!(changed.is_err());
    store.inject(Call::Update, None);
    let mut accepted = 0;
    for _ in 0..20 {
        accepted += usize::from(service.verify(&token).await.is_ok());
    }
    assert_eq!(accepted, 5, "the 5 credits set, none of the 10 leased before");
}

#[tokio::test]
async fn a_roll_answers_with_what_a_change_landing_meanwhile_set() {
    let (service, store) = service(10);
    let account = AccountId::new("acme").unwrap();
    let free = apikeys::Meta::new(r#"{"plan":"free"}"#).unwrap();
    let created = service.create(&account, NewKey::default().meta(free)).await.unwrap();
    // The roll reads the key, then waits for the store while the change lands.
    store.inject(Call::Roll, Some(Fault::Delay(Duration::from_millis(50))));
    let pro = apikeys::Meta::new(r#"{"plan":"pro"}"#).unwrap();
    let change = apikeys::KeyUpdate::default().meta(Some(pro.clone()));
    let (rolled, changed) = tokio::join!(service.roll_as_admin(&account, &created.id, Duration::ZERO), async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        service.update_as_admin(&account, &created.id, change).await
    });
    assert!(changed.is_ok());
    let rolled = rolled.unwrap();
    assert_eq!(rolled.key.meta, Some(pro.clone()), "the answer");
    let listed = service.list(&account).await.unwrap();
    assert_eq!(listed.iter().find(|key| key.id == rolled.key.id).unwrap().meta, Some(pro), "the store");
}

fn owned(owner: &str) -> NewKey {
    NewKey::default().owner(apikeys::OwnerId::new(owner).unwrap())
}

async fn limit_owner(service: &KeyService<Store>, owner: &str, update: apikeys::OwnerUpdate) {
    let (account, owner) = (AccountId::new("acme").unwrap(), apikeys::OwnerId::new(owner).unwrap());
    service.update_owner_as_admin(&account, &owner, update).await.unwrap();
}

/// An owner's credits are shared by its keys: together they spend exactly what the owner has,
/// leased as a key's are, and a key of another owner is not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owners_keys_share_its_credits_exactly_at_a_write_per_lease() {
    let (service, store) = service(100);
    let shared = apikeys::OwnerUpdate::default().credits(Some(Credits::new(5_000).unwrap()));
    limit_owner(&service, "org-1", shared).await;
    let tokens = [
        key(&service, owned("org-1")).await,
        key(&service, owned("org-1").credits(Credits::new(1_000_000).unwrap())).await,
    ];
    let mut spenders = Vec::new();
    for task in 0..8 {
        let (service, token) = (service.clone(), tokens[task % 2].clone());
        spenders.push(tokio::spawn(async move {
            let mut accepted = 0;
            for _ in 0..1_000 {
                match service.verify(&token).await {
                    Ok(_) => accepted += 1,
                    Err(Rejection::UsageExceeded(refusal)) => assert!(refusal.by_owner, "the owner ran out"),
                    Err(other) => panic!("{other}"),
                }
            }
            accepted
        }));
    }
    let mut accepted = [0, 0];
    for (task, spender) in spenders.into_iter().enumerate() {
        accepted[task % 2] += spender.await.unwrap();
    }
    assert_eq!(accepted[0] + accepted[1], 5_000, "exactly the owner's credits");
    let takes = store.calls(Call::TakeOwnerCredits);
    assert!(takes <= 2 * 5_000 / 100 + 16, "{takes} takes for 5,000 spends");
    let second = service.verify(&tokens[1]).await;
    let Err(Rejection::UsageExceeded(refusal)) = second else { panic!("{second:?}") };
    assert_eq!(refusal.usage.credits, Some(0), "the report is the owner's");
    let listed = service.list(&AccountId::new("acme").unwrap()).await.unwrap();
    let own = listed.iter().find_map(|key| key.credits).map(|credits| credits.remaining);
    assert_eq!(own, Some(1_000_000 - accepted[1]), "the key's own credits paid for its uses, no more");
    let other = key(&service, owned("org-2")).await;
    service.verify(&other).await.expect("another owner's key is not held back");
}

/// A use the owner refuses gives the key back its rate-limit slot and its credit.
#[tokio::test]
async fn a_use_the_owner_refuses_takes_nothing_from_the_key() {
    let (service, _) = service(10);
    limit_owner(&service, "org-1", apikeys::OwnerUpdate::default().credits(Some(Credits::new(1).unwrap()))).await;
    let limit = RateLimits::new([RateLimit::new("requests", 2, Duration::from_secs(60)).unwrap()]).unwrap();
    let token = key(&service, owned("org-1").credits(Credits::new(10).unwrap()).ratelimits(limit)).await;
    let used = service.verify(&token).await.unwrap();
    assert_eq!((used.usage.credits, used.owner_usage.and_then(|usage| usage.credits)), (Some(9), Some(0)));
    let refused = service.verify(&token).await;
    assert!(matches!(&refused, Err(Rejection::UsageExceeded(refusal)) if refusal.by_owner), "{refused:?}");
    limit_owner(&service, "org-1", apikeys::OwnerUpdate::default().credits(None)).await;
    let used = service.verify(&token).await.expect("the refused use left the key's second slot");
    assert_eq!(used.usage.credits, Some(8), "and its credit");
    assert_eq!(used.owner_usage, None, "the owner limits nothing now");
}

/// A use its owner cannot pay for takes nothing of the key's from the store: credits taken and
/// then given back would stay in this instance's lease, which a crash loses, above its size.
#[tokio::test]
async fn a_use_its_owner_cannot_pay_for_takes_nothing_from_the_store() {
    let (service, store) = service(0);
    limit_owner(&service, "org-1", apikeys::OwnerUpdate::default().credits(Some(Credits::new(10).unwrap()))).await;
    let token = key(&service, owned("org-1").credits(Credits::new(1_000).unwrap())).await;
    let refused = service.verify_usage(&token, &Usage::new().cost(500)).await;
    assert!(matches!(&refused, Err(Rejection::UsageExceeded(refusal)) if refusal.by_owner), "{refused:?}");
    assert_eq!(store.calls(Call::TakeCredits), 0, "the key's credits stayed in the store");
    // Whose credits are short is still told in order: the key's first.
    let refused = service.verify_usage(&token, &Usage::new().cost(2_000)).await;
    assert!(matches!(&refused, Err(Rejection::UsageExceeded(refusal)) if !refusal.by_owner), "{refused:?}");
    let used = service.verify_usage(&token, &Usage::new().cost(10)).await.expect("both can pay 10");
    assert_eq!((used.usage.credits, used.owner_usage.and_then(|usage| usage.credits)), (Some(990), Some(0)));
    assert_eq!(store.calls(Call::TakeCredits), 1);
}

/// An owner's rate limit counts the uses of all its keys, and is checked before any credits.
#[tokio::test]
async fn an_owners_rate_limit_counts_every_key_of_the_owner() {
    let (service, _) = service(10);
    let limit = RateLimits::new([RateLimit::new("requests", 3, Duration::from_secs(60)).unwrap()]).unwrap();
    limit_owner(&service, "org-1", apikeys::OwnerUpdate::default().ratelimits(limit)).await;
    let (first, second) =
        (key(&service, owned("org-1")).await, key(&service, owned("org-1").credits(Credits::new(0).unwrap())).await);
    for token in [&first, &first, &first] {
        service.verify(token).await.unwrap();
    }
    for token in [&first, &second] {
        let refused = service.verify(token).await;
        let Err(Rejection::RateLimited(refusal)) = refused else { panic!("{refused:?}") };
        assert!(refusal.by_owner && refusal.retry_after.is_some());
        assert_eq!(refusal.limit().map(|limit| (limit.limit, limit.remaining)), Some((3, 0)));
    }
}

/// A use checks the owner's limits it names, before any credits: a key out of credits is
/// refused by the owner's full limit, not by its credits.
#[tokio::test]
async fn a_use_checks_the_owners_limits_that_it_names_before_the_keys_credits() {
    let (service, _) = service(10);
    let limit = |name, limit| RateLimit::new(name, limit, Duration::from_secs(60)).unwrap();
    let limits = RateLimits::new([limit("requests", 3), limit("tokens", 1)]).unwrap();
    limit_owner(&service, "org-1", apikeys::OwnerUpdate::default().ratelimits(limits)).await;
    let (first, second) =
        (key(&service, owned("org-1")).await, key(&service, owned("org-1").credits(Credits::new(0).unwrap())).await);
    let tokens = Usage::new().ratelimits(["tokens"]);
    service.verify_usage(&first, &tokens).await.unwrap();
    let refused = service.verify_usage(&second, &tokens).await;
    let Err(Rejection::RateLimited(refusal)) = refused else { panic!("{refused:?}") };
    assert!(refusal.by_owner);
    assert_eq!(refusal.limit().map(|limit| limit.name.to_string()).as_deref(), Some("tokens"));
    assert!(matches!(service.verify(&second).await, Err(Rejection::UsageExceeded(_))), "requests has room");
}

/// One process's store of several instances sharing one memory store and one board.
#[cfg(feature = "tokio")]
type SharingStore = Arc<Instrumented<Arc<MemoryStore>>>;

/// A service over a store whose instances exchange rate-limit counts through `board`, exchanging
/// every 10 ms.
#[cfg(feature = "tokio")]
fn sharing_instance(
    memory: &Arc<MemoryStore>,
    board: &Arc<support::CountBoard>,
    fail_open: bool,
) -> (KeyService<SharingStore>, SharingStore) {
    let store = Arc::new(Instrumented::new(memory.clone()).sharing_counts_on(board.clone()));
    let builder = KeyService::builder(store.clone(), live()).without_last_used();
    let builder = builder.share_rate_limits(Duration::from_millis(10));
    let service = if fail_open { builder.rate_limits_fail_open() } else { builder }.build();
    assert!(service.spawn_rate_sharing().is_some(), "sharing starts");
    assert!(service.spawn_rate_sharing().is_none(), "once");
    (service, store)
}

/// Polls `done` every 10 ms for at most 3 s.
#[cfg(feature = "tokio")]
async fn eventually(mut done: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..300 {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Instances that share rate-limit counts hold one limit between them. When the exchange fails,
/// a use that checks a limit fails closed once the counts are stale (a second here), or counts
/// this instance's uses alone if the host chose to fail open; it recovers by itself.
#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_counts_hold_one_limit_and_fail_closed_without_them() {
    let (memory, board) = (Arc::new(MemoryStore::new()), Arc::new(support::CountBoard::default()));
    let (first, _) = sharing_instance(&memory, &board, false);
    let limit = || RateLimits::new([RateLimit::new("requests", 4, Duration::from_secs(60)).unwrap()]).unwrap();
    let account = AccountId::new("acme").unwrap();
    let create = async |new: NewKey| first.create(&account, new).await.unwrap().key.expose_secret().to_owned();
    let (limited, other, unlimited) = (
        create(NewKey::default().ratelimits(limit())).await,
        create(NewKey::default().ratelimits(limit())).await,
        create(NewKey::default()).await,
    );
    // Used up while the first instance is alone: with another one already exchanging, a fresh
    // window would share the limit with it until its counts came, and refuse the third use.
    for _ in 0..4 {
        first.verify(&limited).await.unwrap();
    }
    let (second, second_store) = sharing_instance(&memory, &board, false);
    let seen = eventually(async || {
        matches!(second.verify_usage(&limited, &Usage::new().cost(0)).await, Err(Rejection::RateLimited(_)))
    })
    .await;
    assert!(seen, "the second instance learns of the first one's uses");
    let refused = second.verify(&limited).await;
    let Err(Rejection::RateLimited(refusal)) = refused else { panic!("{refused:?}") };
    assert_eq!(refusal.limit().map(|limit| limit.remaining), Some(0));

    second_store.fail(Call::ExchangeRateCounts, true);
    // Checks of cost 0, which count nothing.
    let check = Usage::new().cost(0);
    let closed = eventually(async || matches!(second.verify_usage(&other, &check).await, Err(Rejection::Store(_))));
    assert!(closed.await, "stale counts fail a limited use closed");
    assert!(second.verify(&unlimited).await.is_ok(), "a key without limits is not held back");
    second_store.fail(Call::ExchangeRateCounts, false);
    let recovered = eventually(async || second.verify_usage(&other, &check).await.is_ok());
    assert!(recovered.await, "the exchange recovers by itself");
    assert!(second.verify(&other).await.is_ok());

    // An instance failing open, which knows of the others (so it shares what is left of a limit
    // with them), uses a key once; then it loses the store.
    let (open, open_store) = sharing_instance(&memory, &board, true);
    let fresh = create(NewKey::default().ratelimits(limit())).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    open.verify(&fresh).await.unwrap();
    open_store.fail(Call::ExchangeRateCounts, true);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for use_ in 2..=4 {
        assert!(open.verify(&fresh).await.is_ok(), "use {use_}: failing open, it holds the limit of 4 alone");
    }
    assert!(matches!(open.verify(&fresh).await, Err(Rejection::RateLimited(_))), "and no more");
}

/// A verification given up while its owner's part waits for the store gives the key back what
/// it took: its credit and its slot.
#[tokio::test]
async fn a_use_given_up_while_the_owner_waits_for_the_store_takes_nothing_from_the_key() {
    let (service, store) = service(0);
    limit_owner(&service, "org-1", apikeys::OwnerUpdate::default().credits(Some(Credits::new(100).unwrap()))).await;
    let limit = RateLimits::new([RateLimit::new("requests", 1, Duration::from_secs(60)).unwrap()]).unwrap();
    let token = key(&service, owned("org-1").credits(Credits::new(5).unwrap()).ratelimits(limit)).await;
    store.inject(Call::TakeOwnerCredits, Some(Fault::Hang));
    let given_up = tokio::time::timeout(Duration::from_millis(50), service.verify(&token)).await;
    assert!(given_up.is_err(), "the use waits for the owner's take");
    store.inject(Call::TakeOwnerCredits, None);
    let listed = service.list(&AccountId::new("acme").unwrap()).await.unwrap();
    assert_eq!(listed[0].credits.map(|credits| credits.remaining), Some(5), "the key's credit is back");
    let used = service.verify(&token).await.expect("and its slot");
    assert_eq!(used.usage.credits, Some(4));
}

/// An interval of any length is taken without a panic, and clamped to an hour.
#[cfg(feature = "tokio")]
#[tokio::test]
async fn any_sharing_interval_is_taken() {
    let builder = KeyService::builder(MemoryStore::new(), live()).without_last_used();
    let service = builder.share_rate_limits(Duration::MAX).build();
    let sharing = service.spawn_rate_sharing().expect("sharing starts");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(sharing.is_finished(), "a store that shares no counts ends the exchange at once");
    sharing.await.expect("without a panic");
}
