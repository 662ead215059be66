//! With feature `metrics`, every verification is counted by outcome and reason and timed.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use apikeys::{AccountId, KeyService, MemoryStore, NewKey, Rejection};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// Counts increments and histogram samples per metric and label set.
#[derive(Default)]
struct Recorded(Mutex<BTreeMap<String, u64>>);

struct Handle(Arc<Recorded>, String);

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        *self.0.0.lock().unwrap().entry(self.1.clone()).or_default() += value;
    }
    fn absolute(&self, _: u64) {}
}

impl HistogramFn for Handle {
    fn record(&self, seconds: f64) {
        assert!(seconds >= 0.0);
        *self.0.0.lock().unwrap().entry(self.1.clone()).or_default() += 1;
    }
}

struct TestRecorder(Arc<Recorded>);

impl TestRecorder {
    fn handle(&self, key: &Key) -> Arc<Handle> {
        let labels: Vec<String> = key.labels().map(|label| format!("{}={}", label.key(), label.value())).collect();
        Arc::new(Handle(self.0.clone(), format!("{}{{{}}}", key.name(), labels.join(","))))
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.handle(key))
    }
}

#[test]
fn verifications_are_counted_by_outcome_and_reason_and_timed() {
    let recorded = Arc::new(Recorded::default());
    let recorder = TestRecorder(recorded.clone());
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let service = KeyService::builder(MemoryStore::new(), support::live()).build();
            let account = AccountId::new("acme").unwrap();
            let created = service.create(&account, NewKey::default()).await.unwrap();
            service.verify(created.key.expose_secret()).await.unwrap();
            service.verify(created.key.expose_secret()).await.unwrap();
            assert!(matches!(service.verify("nonsense").await, Err(Rejection::Malformed(_))));
            service.revoke_as_admin(&account, &created.id).await.unwrap();
            assert!(matches!(service.verify(created.key.expose_secret()).await, Err(Rejection::Revoked)));
        });
    });
    let recorded = recorded.0.lock().unwrap().clone();
    let expected: BTreeMap<String, u64> = [
        ("apikeys_verify_duration_seconds{outcome=accepted}", 2),
        ("apikeys_verify_duration_seconds{outcome=rejected}", 2),
        ("apikeys_verify_total{outcome=accepted,reason=none}", 2),
        ("apikeys_verify_total{outcome=rejected,reason=malformed}", 1),
        ("apikeys_verify_total{outcome=rejected,reason=revoked}", 1),
    ]
    .into_iter()
    .map(|(key, count)| (key.to_owned(), count))
    .collect();
    assert_eq!(recorded, expected);
}
