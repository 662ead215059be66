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

#[tokio::test]
async fn a_lease_taken_before_a_change_of_credits_is_not_spent_after_it() {
    let (service, store) = service(10);
    let created = service.create(&AccountId::new("acme").unwrap(), credits(100)).await.unwrap();
    let (token, id) = (created.key.expose_secret().to_owned(), created.id);
    service.verify(&token).await.unwrap();
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
