//! Proptest strategies for the model-based test of `apikeys::testing::model`, and a runner that
//! opens the store inside the test's runtime (a PostgreSQL pool belongs to one).

use apikeys::KeyStore;
use apikeys::testing::model::{ACCOUNTS, GRANTS, MAX_GRACE, OWNERS, Op};
use proptest::prelude::*;

pub fn op() -> impl Strategy<Value = Op> {
    let name = prop_oneof![
        3 => Just(None),
        3 => "[a-z -]{1,12}".prop_map(Some),
        1 => Just(Some(String::new())),
        1 => Just(Some("bad\nname".to_owned())),
        1 => Just(Some("x".repeat(256))),
    ];
    let expires_in = || prop_oneof![3 => Just(None), 3 => (1i64..600).prop_map(Some), 1 => (-60i64..=0).prop_map(Some)];
    // Half the keys hold every scope, as keys from before scopes do.
    let scopes = || prop_oneof![2 => Just(None), 2 => (0u8..=u8::MAX >> (8 - GRANTS.len())).prop_map(Some)];
    let grace = prop_oneof![2 => Just(0i64), 3 => 1i64..=MAX_GRACE, 1 => Just(MAX_GRACE + 1)];
    prop_oneof![
        4 => (0..ACCOUNTS, name, expires_in(), scopes())
            .prop_map(|(account, name, expires_in, scopes)| Op::Create { account, name, expires_in, scopes }),
        3 => (any::<usize>(), expires_in(), scopes())
            .prop_map(|(caller, expires_in, scopes)| Op::CreateAs { caller, expires_in, scopes }),
        3 => (any::<usize>(), any::<usize>(), grace.clone()).prop_map(|(caller, target, grace)| Op::Roll { caller, target, grace }),
        1 => (0..ACCOUNTS, any::<usize>(), grace).prop_map(|(account, target, grace)| Op::RollAsAdmin { account, target, grace }),
        6 => any::<usize>().prop_map(|key| Op::Verify { key }),
        2 => (any::<usize>(), any::<usize>(), prop::sample::select(vec!['a', 'q', '2', '7', '_', 'Z', '0', 'é']))
            .prop_map(|(key, position, replacement)| Op::VerifyMutated { key, position, replacement }),
        3 => (any::<usize>(), any::<usize>()).prop_map(|(caller, target)| Op::Revoke { caller, target }),
        1 => (0..ACCOUNTS, any::<usize>()).prop_map(|(account, target)| Op::RevokeAsAdmin { account, target }),
        2 => (0i64..200).prop_map(|seconds| Op::Advance { seconds }),
        1 => Just(Op::Flush),
        3 => (0..ACCOUNTS, scopes(), prop::option::of(0u64..15), prop::option::of((0u64..10, 1u32..300)), prop::option::of(1u32..4), prop::option::of(1u32..3), prop::option::of(0..OWNERS))
            .prop_map(|(account, scopes, credits, refill, limit, tokens, owner)| Op::CreateLimited { account, scopes, credits, refill, limit, tokens, owner }),
        2 => (0..ACCOUNTS, 0..OWNERS, prop::option::of(0u64..20), prop::option::of((0u64..10, 1u32..300)), prop::option::of(1u32..6), prop::option::of(1u32..4))
            .prop_map(|(account, owner, credits, refill, limit, tokens)| Op::SetOwnerLimits { account, owner, credits, refill, limit, tokens }),
        // Mostly what a request checks ("requests"); else "tokens", both, or neither.
        5 => (any::<usize>(), prop_oneof![3 => Just(1u64), 1 => Just(0u64), 2 => 2u64..6], prop_oneof![1 => Just(0b01u8), 1 => 0u8..4])
            .prop_map(|(key, cost, checks)| Op::Spend { key, cost, checks }),
        2 => (0i64..4).prop_map(|seconds| Op::Advance { seconds }),
    ]
}

pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..60)
}

/// Applies `ops` to a service over the store `make` opens and to the model.
pub fn run<S: KeyStore, F: Future<Output = S>>(make: impl FnOnce() -> F, ops: &[Op]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async { apikeys::testing::model::run(make().await, ops).await }).map_err(TestCaseError::fail)
}
