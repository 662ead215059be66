//! Webhook delivery end to end, against a local receiver: signed deliveries, retries through
//! errors and timeouts, order per account, death after three days, and a store that fails.

mod support;

use std::sync::Arc;
use std::time::Duration;

use apikeys::webhook::{
    Endpoint, EndpointName, HttpTransport, SIGNATURE_HEADER, Transport, WebhookOptions, WebhookSecret, verify_signature,
};
use apikeys::{AccountId, KeyService, ManualClock, MemoryStore, NewKey, SignatureError};
use support::receiver::{Answer, Receiver};
use support::{Call, Fault, Instrumented, T0, live};

const SECRET: &str = "whsec_0123456789abcdef0123456789abcdef";
const OK: Answer = Answer::Status(200);

type Store = Arc<Instrumented<MemoryStore>>;

fn secret() -> WebhookSecret {
    WebhookSecret::new(SECRET).unwrap()
}

fn service(receiver: &Receiver, clock: &ManualClock) -> (KeyService<Store>, Store) {
    let store = Arc::new(Instrumented::new(MemoryStore::new()));
    let endpoint = Endpoint::new(EndpointName::new("receiver").unwrap(), &receiver.url(), secret()).unwrap();
    let service = KeyService::builder(store.clone(), live()).clock(clock.clone()).webhook(endpoint).build();
    (service, store)
}

fn transport() -> Arc<dyn Transport> {
    Arc::new(HttpTransport::default())
}

fn options() -> WebhookOptions {
    WebhookOptions::default().timeout(Duration::from_millis(300))
}

/// Looks at the outbox once, at the clock's time.
async fn deliver(service: &KeyService<Store>) -> apikeys::webhook::DeliveryReport {
    service.deliver_webhooks(&transport(), &options()).await.unwrap()
}

#[tokio::test]
async fn an_event_arrives_signed_after_a_500_and_a_timeout() {
    let receiver = Receiver::start(&[Answer::Status(500), Answer::Hang(Duration::from_secs(2))], OK).await;
    let clock = ManualClock::new(T0);
    let (service, _) = service(&receiver, &clock);
    let account = AccountId::new("acme").unwrap();
    service.create(&account, NewKey::named("first").unwrap()).await.unwrap();

    assert_eq!(deliver(&service).await.retried, 1, "the 500");
    assert_eq!(deliver(&service).await.attempted(), 0, "not due again yet");
    clock.advance(time::Duration::seconds(2));
    assert_eq!(deliver(&service).await.retried, 1, "the timeout");
    assert_eq!(deliver(&service).await.attempted(), 0);
    clock.advance(time::Duration::seconds(4));
    assert_eq!(deliver(&service).await.delivered, 1, "the 200");
    assert_eq!(service.pending_webhooks().await.unwrap(), 0, "the outbox is empty");
    assert_eq!(deliver(&service).await.attempted(), 0, "delivered once");

    let received = receiver.received();
    assert_eq!(received.len(), 3, "three attempts: {received:?}");
    let event = service.audit_log(&account, 1, None).await.unwrap().events.remove(0);
    for attempt in &received {
        assert_eq!(attempt.body, event.to_json().to_string(), "the body is the audit-log item");
        assert_eq!(attempt.header("content-type"), Some("application/json"));
        assert_eq!(attempt.header("apikeys-event-id"), Some(event.id.to_string().as_str()));
    }
    let last = received.last().unwrap();
    let signature = last.header(SIGNATURE_HEADER).expect("signed");
    let tolerance = Duration::from_secs(300);
    assert_eq!(
        verify_signature(&secret(), signature, last.body.as_bytes(), T0 + Duration::from_secs(6), tolerance),
        Ok(())
    );
    let forged = last.body.replace("acme", "acmf");
    let now = T0 + Duration::from_secs(6);
    assert_eq!(
        verify_signature(&secret(), signature, forged.as_bytes(), now, tolerance),
        Err(SignatureError::Mismatch)
    );
}

/// A 2xx is the answer, whatever its body does after it: one that never ends is no timeout, so
/// the event is not sent again (nor its account's later events held behind it).
#[tokio::test]
async fn a_2xx_whose_body_never_ends_is_delivered_once() {
    let receiver = Receiver::start(&[Answer::StallBody(200, Duration::from_secs(3))], OK).await;
    let clock = ManualClock::new(T0);
    let (service, _) = service(&receiver, &clock);
    service.create(&AccountId::new("acme").unwrap(), NewKey::named("first").unwrap()).await.unwrap();
    assert_eq!(deliver(&service).await.delivered, 1);
    assert_eq!(service.pending_webhooks().await.unwrap(), 0);
    assert_eq!(receiver.received().len(), 1);
}

/// A transport that panics is a failed attempt: counted and retried with backoff (and so given
/// up in time), not tried again forever.
#[tokio::test]
async fn a_transport_that_panics_fails_the_attempt() {
    struct Panics;
    #[async_trait::async_trait]
    impl Transport for Panics {
        async fn post(&self, _: &Endpoint, _: &[(&'static str, String)], _: &str) -> Result<u16, String> {
            panic!("a transport of the host's that panics");
        }
    }
    let receiver = Receiver::start(&[], OK).await;
    let clock = ManualClock::new(T0);
    let (service, _) = service(&receiver, &clock);
    service.create(&AccountId::new("acme").unwrap(), NewKey::named("first").unwrap()).await.unwrap();
    let panics: Arc<dyn Transport> = Arc::new(Panics);
    let report = service.deliver_webhooks(&panics, &options()).await.unwrap();
    assert_eq!((report.retried, report.lost), (1, 0));
    assert_eq!(deliver(&service).await.attempted(), 0, "not due again until its backoff passed");
    clock.advance(time::Duration::seconds(4));
    assert_eq!(deliver(&service).await.delivered, 1);
}

#[tokio::test]
async fn each_accounts_events_arrive_in_order_and_others_do_not_wait() {
    let receiver = Receiver::start(&[Answer::Status(503)], OK).await;
    let clock = ManualClock::new(T0);
    let (service, _) = service(&receiver, &clock);
    let (acme, other) = (AccountId::new("acme").unwrap(), AccountId::new("other").unwrap());
    let first = service.create(&acme, NewKey::named("first").unwrap()).await.unwrap();
    clock.advance(time::Duration::milliseconds(1));
    service.revoke_as_admin(&acme, &first.id).await.unwrap();
    assert_eq!(deliver(&service).await.retried, 1, "acme's creation, refused with a 503");
    service.create(&other, NewKey::named("theirs").unwrap()).await.unwrap();

    let report = deliver(&service).await;
    assert_eq!(
        (report.delivered, report.attempted()),
        (1, 1),
        "other's went; acme's revocation waits for its creation"
    );
    clock.advance(time::Duration::seconds(2));
    assert_eq!(deliver(&service).await.delivered, 1);
    assert_eq!(deliver(&service).await.delivered, 1);
    let actions: Vec<String> = receiver
        .accepted()
        .iter()
        .map(|received| {
            let event: serde_json::Value = serde_json::from_str(&received.body).unwrap();
            format!("{} {}", event["account"].as_str().unwrap(), event["action"].as_str().unwrap())
        })
        .collect();
    assert_eq!(actions, ["other key.created", "acme key.created", "acme key.revoked"]);
}

#[tokio::test]
async fn a_delivery_failing_for_three_days_is_dead_and_listed() {
    let receiver = Receiver::start(&[], Answer::Status(500)).await;
    let clock = ManualClock::new(T0);
    let (service, _) = service(&receiver, &clock);
    let account = AccountId::new("acme").unwrap();
    service.create(&account, NewKey::named("first").unwrap()).await.unwrap();
    // Looks every 10 minutes for three days and a bit: 440 looks at most.
    let mut attempts = 0;
    for _ in 0..440 {
        let report = deliver(&service).await;
        attempts += report.attempted();
        if report.died == 1 {
            break;
        }
        clock.advance(time::Duration::minutes(10));
    }
    let dead = service.dead_webhooks(10).await.unwrap();
    assert_eq!(dead.len(), 1, "given up after {attempts} attempts");
    let elapsed = clock_elapsed(&dead[0].dead_at);
    let (hours_70, hours_72) = (Duration::from_secs(70 * 3600), Duration::from_secs(72 * 3600 + 600));
    assert!(elapsed >= hours_70 && elapsed <= hours_72, "given up after three days, not {elapsed:?}");
    assert_eq!(dead[0].attempts, attempts);
    assert_eq!(dead[0].error, "the endpoint answered 500");
    // Every 10 minutes while the backoff is shorter, then every hour or so: about 95 attempts
    // (90 to 102 in 20,000 simulated runs of the jitter).
    assert!((80..=115).contains(&attempts), "backoff doubles to an hour: {attempts} attempts in three days");
    assert_eq!(service.pending_webhooks().await.unwrap(), 0, "it left the outbox");
}

fn clock_elapsed(at: &time::OffsetDateTime) -> Duration {
    (*at - T0).try_into().unwrap()
}

#[tokio::test]
async fn a_settlement_the_store_loses_delivers_again_and_loses_nothing() {
    let receiver = Receiver::start(&[], OK).await;
    let clock = ManualClock::new(T0);
    let (service, store) = service(&receiver, &clock);
    let account = AccountId::new("acme").unwrap();
    service.create(&account, NewKey::named("first").unwrap()).await.unwrap();

    store.inject(Call::SettleDelivery, Some(Fault::Fail));
    assert!(service.deliver_webhooks(&transport(), &options()).await.is_err(), "the store failed");
    store.inject(Call::ClaimDeliveries, Some(Fault::Fail));
    assert!(service.deliver_webhooks(&transport(), &options()).await.is_err());
    store.heal();
    assert_eq!(deliver(&service).await.attempted(), 0, "the claim still holds it");
    clock.advance(options().lease.try_into().unwrap());
    assert_eq!(deliver(&service).await.delivered, 1, "once the claim ran out");
    let ids: Vec<String> = receiver.accepted().iter().map(|received| received.event_id()).collect();
    assert_eq!(ids.len(), 2, "delivered twice, at least once: never lost");
    assert_eq!(ids[0], ids[1]);
    assert_eq!(service.pending_webhooks().await.unwrap(), 0);
}

#[tokio::test]
async fn the_delivery_task_sends_each_event_on_its_own() {
    let receiver = Receiver::start(&[], OK).await;
    let store = Arc::new(Instrumented::new(MemoryStore::new()));
    let endpoint = Endpoint::new(EndpointName::new("receiver").unwrap(), &receiver.url(), secret()).unwrap();
    let service = KeyService::builder(store, live()).webhook(endpoint).build();
    let options = WebhookOptions::default().poll(Duration::from_millis(20));
    let task = service.spawn_webhooks_with(transport(), options).expect("a task: the service has an endpoint");
    let account = AccountId::new("acme").unwrap();
    for i in 0..5 {
        service.create(&account, NewKey::named(&format!("key {i}")).unwrap()).await.unwrap();
    }
    support::eventually("five deliveries", || receiver.accepted().len() == 5).await;
    let mut trail = service.audit_log(&account, 10, None).await.unwrap().events;
    trail.reverse();
    let sent: Vec<String> = receiver.accepted().iter().map(|received| received.event_id()).collect();
    assert_eq!(sent, trail.iter().map(|event| event.id.to_string()).collect::<Vec<_>>(), "in order, each once");
    for received in receiver.accepted() {
        let signature = received.header(SIGNATURE_HEADER).unwrap();
        let now = time::OffsetDateTime::now_utc();
        assert_eq!(
            verify_signature(&secret(), signature, received.body.as_bytes(), now, Duration::from_secs(60)),
            Ok(())
        );
    }
    drop(service);
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("the task ends with the service").unwrap();
    let none = KeyService::builder(MemoryStore::new(), live()).build();
    assert!(none.spawn_webhooks().is_none(), "no endpoints, no task");
}

#[tokio::test]
async fn a_key_expiring_within_a_week_is_announced_once() {
    let receiver = Receiver::start(&[], OK).await;
    let clock = ManualClock::new(T0);
    let (service, _) = service(&receiver, &clock);
    let account = AccountId::new("acme").unwrap();
    let mut new = NewKey::named("short-lived").unwrap();
    new.expires_at = Some(T0 + time::Duration::days(10));
    let key = service.create(&account, new).await.unwrap();
    assert_eq!(service.note_expiring_keys().await.unwrap(), 0, "ten days out: not yet");
    clock.advance(time::Duration::days(3) + time::Duration::seconds(1));
    assert_eq!(service.note_expiring_keys().await.unwrap(), 1, "now within the week");
    assert_eq!(service.note_expiring_keys().await.unwrap(), 0, "once");
    while deliver(&service).await.attempted() > 0 {}
    let events: Vec<serde_json::Value> =
        receiver.accepted().iter().map(|received| serde_json::from_str(&received.body).unwrap()).collect();
    let notice = events.iter().find(|event| event["action"] == "key.expiring").expect("the notice is delivered");
    assert_eq!(notice["keyId"], key.id.to_string());
    assert_eq!(notice["actor"], serde_json::json!({"type": "system", "id": "expiry"}));
    assert_eq!(notice["detail"]["name"], "short-lived");
    assert_eq!(notice["detail"]["expiresAt"], "2025-10-25T09:00:00Z");
    assert_eq!(events.len(), 2, "the creation and the notice: {events:?}");
}

/// Feature `webhooks-tls`: a receiver over TLS, with a certificate for `localhost` that the
/// test's own CA signed. The default transport trusts the platform's CAs only, so its attempt
/// fails on the certificate and the receiver gets nothing; a transport that trusts the test's
/// CA delivers the event, signed.
#[cfg(feature = "webhooks-tls")]
#[tokio::test]
async fn an_https_endpoint_gets_its_events_from_a_transport_that_trusts_its_certificate() {
    if support::tls::skip_without_openssl() {
        return;
    }
    let receiver = Receiver::start_tls(&[], OK, support::tls::acceptor()).await;
    let clock = ManualClock::new(T0);
    let (service, _) = service(&receiver, &clock);
    let account = AccountId::new("acme").unwrap();
    service.create(&account, NewKey::named("first").unwrap()).await.unwrap();

    let endpoint = Endpoint::new(EndpointName::new("receiver").unwrap(), &receiver.url(), secret()).unwrap();
    let refused = HttpTransport::default().post(&endpoint, &[], "{}").await.unwrap_err();
    assert!(refused.contains("certificate"), "refused for its certificate: {refused}");
    let untrusting: Arc<dyn Transport> = Arc::new(HttpTransport::default());
    assert_eq!(service.deliver_webhooks(&untrusting, &options()).await.unwrap().retried, 1);
    assert!(receiver.received().is_empty(), "no request reached the receiver");

    let trusting: Arc<dyn Transport> = Arc::new(HttpTransport::with_roots(support::tls::ca_roots()));
    clock.advance(time::Duration::seconds(2));
    assert_eq!(service.deliver_webhooks(&trusting, &options()).await.unwrap().delivered, 1);
    let received = receiver.accepted();
    assert_eq!(received.len(), 1, "{received:?}");
    let signature = received[0].header(SIGNATURE_HEADER).expect("signed");
    let now = T0 + Duration::from_secs(2);
    assert_eq!(
        verify_signature(&secret(), signature, received[0].body.as_bytes(), now, Duration::from_secs(60)),
        Ok(())
    );
}
