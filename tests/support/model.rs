//! Model-based test of `KeyService` over any store: random operation sequences are applied to
//! the service and to a plain model, and every outcome and every account's list are compared
//! after each step.

use apikeys::{
    AccountId, ApiKey, AuthenticatedKey, Digest, Error, KeyId, KeyService, KeyStore, ManualClock, NewKey, Rejection,
};
use proptest::prelude::*;
use time::{Duration, OffsetDateTime};

use super::{T0, assert_no_secret, live};

/// Accounts the model uses; few, so operations often meet another account's keys.
pub const ACCOUNTS: usize = 3;
/// The limit of active keys per account, low so the limit is often reached.
pub const MAX_ACTIVE: u32 = 3;

#[derive(Debug, Clone)]
pub enum Op {
    Create { account: usize, name: Option<String>, expires_in: Option<i64> },
    Verify { key: usize },
    VerifyMutated { key: usize, position: usize, replacement: char },
    Revoke { caller: usize, target: usize },
    RevokeAsAdmin { account: usize, target: usize },
    Advance { seconds: i64 },
    Flush,
}

pub fn op() -> impl Strategy<Value = Op> {
    let name = prop_oneof![
        3 => Just(None),
        3 => "[a-z -]{1,12}".prop_map(Some),
        1 => Just(Some(String::new())),
        1 => Just(Some("bad\nname".to_owned())),
        1 => Just(Some("x".repeat(256))),
    ];
    let expires_in = prop_oneof![3 => Just(None), 3 => (1i64..600).prop_map(Some), 1 => (-60i64..=0).prop_map(Some)];
    prop_oneof![
        4 => (0..ACCOUNTS, name, expires_in).prop_map(|(account, name, expires_in)| Op::Create { account, name, expires_in }),
        6 => any::<usize>().prop_map(|key| Op::Verify { key }),
        2 => (any::<usize>(), any::<usize>(), prop::sample::select(vec!['a', 'q', '2', '7', '_', 'Z', '0', 'é']))
            .prop_map(|(key, position, replacement)| Op::VerifyMutated { key, position, replacement }),
        3 => (any::<usize>(), any::<usize>()).prop_map(|(caller, target)| Op::Revoke { caller, target }),
        1 => (0..ACCOUNTS, any::<usize>()).prop_map(|(account, target)| Op::RevokeAsAdmin { account, target }),
        2 => (0i64..200).prop_map(|seconds| Op::Advance { seconds }),
        1 => Just(Op::Flush),
    ]
}

pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..60)
}

#[derive(Debug)]
struct ModelKey {
    id: KeyId,
    account: usize,
    token: String,
    prefix: apikeys::KeyPrefix,
    name: Option<String>,
    created_at: OffsetDateTime,
    expires_at: Option<OffsetDateTime>,
    revoked: bool,
    last_used_at: Option<OffsetDateTime>,
}

impl ModelKey {
    fn is_active(&self, now: OffsetDateTime) -> bool {
        !self.revoked && self.expires_at.is_none_or(|expiry| now < expiry)
    }
}

/// A listed key, as the model expects it.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    id: KeyId,
    prefix: apikeys::KeyPrefix,
    name: Option<String>,
    expires_at: Option<OffsetDateTime>,
    created_at: OffsetDateTime,
    last_used_at: Option<OffsetDateTime>,
}

struct Model {
    accounts: Vec<AccountId>,
    keys: Vec<ModelKey>,
    clock: ManualClock,
}

impl Model {
    fn now(&self) -> OffsetDateTime {
        apikeys::Clock::now(&self.clock)
    }

    fn active_count(&self, account: usize) -> usize {
        let now = self.now();
        self.keys.iter().filter(|key| key.account == account && key.is_active(now)).count()
    }

    fn pick(&self, index: usize) -> Option<usize> {
        (!self.keys.is_empty()).then(|| index % self.keys.len())
    }

    fn expected_list(&self, account: usize) -> Vec<Row> {
        let now = self.now();
        let mut keys: Vec<&ModelKey> =
            self.keys.iter().filter(|key| key.account == account && key.is_active(now)).collect();
        keys.sort_by_key(|key| (key.created_at, key.id));
        keys.iter()
            .map(|key| Row {
                id: key.id,
                prefix: key.prefix,
                name: key.name.clone(),
                expires_at: key.expires_at,
                created_at: key.created_at,
                last_used_at: key.last_used_at,
            })
            .collect()
    }
}

fn listed(keys: &[ApiKey]) -> Vec<Row> {
    keys.iter()
        .map(|key| {
            let name = key.name.as_ref().map(|name| name.to_string());
            Row {
                id: key.id,
                prefix: key.prefix,
                name,
                expires_at: key.expires_at,
                created_at: key.created_at,
                last_used_at: key.last_used_at,
            }
        })
        .collect()
}

/// Applies `ops` to a service over the store `make` opens and to the model, comparing at every
/// step. The store is opened inside the test's runtime (a PostgreSQL pool belongs to one).
pub fn run<S: KeyStore, F: Future<Output = S>>(make: impl FnOnce() -> F, ops: &[Op]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async { run_async(make().await, ops).await })
}

async fn run_async<S: KeyStore>(store: S, ops: &[Op]) -> Result<(), TestCaseError> {
    let clock = ManualClock::new(T0);
    let service =
        KeyService::builder(store, live()).clock(clock.clone()).max_active_keys_per_account(MAX_ACTIVE).build();
    let accounts =
        (0..ACCOUNTS).map(|i| AccountId::new(format!("model-{i}-{}", uuid::Uuid::now_v7())).unwrap()).collect();
    let mut model = Model { accounts, keys: Vec::new(), clock };

    for op in ops {
        apply(&service, &mut model, op).await?;
        for account in 0..ACCOUNTS {
            let keys = service.list(&model.accounts[account]).await.unwrap();
            prop_assert_eq!(listed(&keys), model.expected_list(account), "list of account {} after {:?}", account, op);
        }
    }
    for key in &model.keys {
        let stored = service.store().find_by_digest(&Digest::sha256(&key.token)).await.unwrap();
        let stored = stored.expect("every created key is stored");
        assert_no_secret(&format!("{stored:?}"), &key.token);
        prop_assert!(key.token.starts_with(stored.prefix.as_str()));
    }
    Ok(())
}

async fn apply<S: KeyStore>(service: &KeyService<S>, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let now = model.now();
    match op {
        Op::Create { account, name, expires_in } => {
            let expires_at = expires_in.map(|seconds| now + Duration::seconds(seconds));
            let request = NewKey { name: name.clone(), expires_at };
            let outcome = service.create(&model.accounts[*account], request).await;
            let name_valid = name.as_ref().is_none_or(|name| apikeys::KeyName::new(name.clone()).is_ok());
            if !name_valid {
                prop_assert!(matches!(outcome, Err(Error::Invalid(apikeys::ValidationError::Name))), "{:?}", outcome);
            } else if expires_at.is_some_and(|expiry| expiry <= now) {
                prop_assert!(
                    matches!(outcome, Err(Error::Invalid(apikeys::ValidationError::ExpiryNotInFuture))),
                    "{:?}",
                    outcome
                );
            } else if model.active_count(*account) >= MAX_ACTIVE as usize {
                prop_assert!(matches!(outcome, Err(Error::KeyLimitReached { limit: MAX_ACTIVE })), "{:?}", outcome);
            } else {
                let created = outcome.unwrap();
                let token = created.key.expose_secret().to_owned();
                prop_assert!(token.starts_with(created.prefix.as_str()));
                prop_assert_eq!(created.created_at, now);
                assert_no_secret(&format!("{created:?}"), &token);
                model.keys.push(ModelKey {
                    id: created.id,
                    account: *account,
                    token,
                    prefix: created.prefix,
                    name: name.clone(),
                    created_at: now,
                    expires_at,
                    revoked: false,
                    last_used_at: None,
                });
            }
        }
        Op::Verify { key } => {
            let Some(index) = model.pick(*key) else { return Ok(()) };
            verify_as_model_says(service, model, index).await?;
        }
        Op::VerifyMutated { key, position, replacement } => {
            let Some(index) = model.pick(*key) else { return Ok(()) };
            let token = &model.keys[index].token;
            let position = position % token.len();
            if token[position..].starts_with(*replacement) {
                return Ok(());
            }
            let mut mutated = token.clone();
            mutated.replace_range(position..position + 1, &replacement.to_string());
            let outcome = service.verify(&mutated).await;
            prop_assert!(
                matches!(outcome, Err(Rejection::Malformed(_))),
                "a one-character change must be malformed: {:?}",
                outcome
            );
        }
        Op::Revoke { caller, target } => {
            let (Some(caller), Some(target)) = (model.pick(*caller), model.pick(*target)) else { return Ok(()) };
            let Some(authenticated) = verify_as_model_says(service, model, caller).await? else { return Ok(()) };
            let outcome = service.revoke(&authenticated, &model.keys[target].id).await;
            if caller == target {
                prop_assert!(matches!(outcome, Err(Error::CannotRevokeSelf)), "{:?}", outcome);
            } else {
                let target_key = &model.keys[target];
                let revocable = target_key.account == model.keys[caller].account && target_key.is_active(now);
                expect_revocation(model, target, revocable, outcome)?;
            }
        }
        Op::RevokeAsAdmin { account, target } => {
            let Some(target) = model.pick(*target) else { return Ok(()) };
            let outcome = service.revoke_as_admin(&model.accounts[*account], &model.keys[target].id).await;
            let target_key = &model.keys[target];
            let revocable = target_key.account == *account && target_key.is_active(now);
            expect_revocation(model, target, revocable, outcome)?;
        }
        Op::Advance { seconds } => model.clock.advance(Duration::seconds(*seconds)),
        Op::Flush => service.flush().await.unwrap(),
    }
    Ok(())
}

/// Verifies the token of key `index` and checks the outcome against the model.
async fn verify_as_model_says<S: KeyStore>(
    service: &KeyService<S>,
    model: &mut Model,
    index: usize,
) -> Result<Option<AuthenticatedKey>, TestCaseError> {
    let now = model.now();
    let outcome = service.verify(&model.keys[index].token).await;
    let key = &mut model.keys[index];
    if key.revoked {
        prop_assert!(matches!(outcome, Err(Rejection::Revoked)), "{:?}", outcome);
        Ok(None)
    } else if key.expires_at.is_some_and(|expiry| now >= expiry) {
        prop_assert!(matches!(outcome, Err(Rejection::Expired)), "{:?}", outcome);
        Ok(None)
    } else {
        let authenticated = outcome.unwrap();
        prop_assert_eq!(authenticated.id, key.id);
        prop_assert_eq!(&authenticated.account, &model.accounts[key.account]);
        key.last_used_at = Some(now);
        Ok(Some(authenticated))
    }
}

fn expect_revocation(
    model: &mut Model,
    target: usize,
    revocable: bool,
    outcome: Result<(), Error>,
) -> Result<(), TestCaseError> {
    if revocable {
        prop_assert!(outcome.is_ok(), "{:?}", outcome);
        model.keys[target].revoked = true;
    } else {
        prop_assert!(matches!(outcome, Err(Error::NotFound)), "{:?}", outcome);
    }
    Ok(())
}
