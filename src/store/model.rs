//! A model-based test of [`KeyService`] over any store (feature `test-util`): a sequence of
//! operations is applied to the service and to a plain model of the rules, and every outcome and
//! every account's list must agree after each step. The integration tests drive it with proptest,
//! the fuzz target `service_ops` with libFuzzer; a third-party store can run it too.
#![allow(missing_docs)]

use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use crate::{
    AccountId, ApiKey, AuthenticatedKey, Digest, Error, KeyFormat, KeyId, KeyService, KeyStore, ManualClock, NewKey,
    Rejection,
};

/// Accounts the model uses; few, so operations often meet another account's keys.
pub const ACCOUNTS: usize = 3;
/// The limit of active keys per account, low so the limit is often reached.
pub const MAX_ACTIVE: u32 = 3;
/// Where the model's clock starts.
pub const T0: OffsetDateTime = datetime!(2025-10-15 09:00 UTC);

/// One step. Indexes into the keys created so far are taken modulo their number.
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

macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(format!($($message)+));
        }
    };
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($message:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!("{}: {:?} != {:?}", format!($($message)+), left, right));
        }
    }};
    ($left:expr, $right:expr) => { ensure_eq!($left, $right, "values differ") };
}

/// Whether `output` holds 8 consecutive characters of the token's secret part (its body after
/// the 4 visible characters).
pub fn leaks(output: &str, token: &str) -> bool {
    let Some(lead) = token.rfind('_') else { return false };
    let secret: Vec<char> = token[lead + 1..].chars().skip(4).collect();
    secret.windows(8).any(|window| output.contains(&window.iter().collect::<String>()))
}

#[derive(Debug)]
struct ModelKey {
    id: KeyId,
    account: usize,
    token: String,
    prefix: crate::KeyPrefix,
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
    prefix: crate::KeyPrefix,
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
        crate::Clock::now(&self.clock)
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

/// Applies `ops` to a service over `store` and to the model, comparing every outcome and every
/// account's list after each step; the first difference is the error.
pub async fn run<S: KeyStore>(store: S, ops: &[Op]) -> Result<(), String> {
    let clock = ManualClock::new(T0);
    let service =
        KeyService::builder(store, KeyFormat::new("as", crate::Environment::LIVE).map_err(|error| error.to_string())?)
            .clock(clock.clone())
            .max_active_keys_per_account(MAX_ACTIVE)
            .build();
    let accounts = (0..ACCOUNTS)
        .map(|i| AccountId::new(format!("model-{i}-{}", KeyId::generate())).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut model = Model { accounts, keys: Vec::new(), clock };

    for op in ops {
        apply(&service, &mut model, op).await?;
        for account in 0..ACCOUNTS {
            let keys = service.list(&model.accounts[account]).await.map_err(|error| format!("list: {error}"))?;
            ensure_eq!(listed(&keys), model.expected_list(account), "list of account {} after {:?}", account, op);
        }
    }
    for key in &model.keys {
        let stored =
            service.store().find_by_digest(&Digest::sha256(&key.token)).await.map_err(|error| error.to_string())?;
        let stored = stored.ok_or("a created key is not stored")?;
        ensure!(!leaks(&format!("{stored:?}"), &key.token), "a stored record shows the secret");
        ensure!(key.token.starts_with(stored.prefix.as_str()), "the stored prefix is not the token's");
    }
    Ok(())
}

async fn apply<S: KeyStore>(service: &KeyService<S>, model: &mut Model, op: &Op) -> Result<(), String> {
    let now = model.now();
    match op {
        Op::Create { account, name, expires_in } => {
            let expires_at = expires_in.map(|seconds| now + Duration::seconds(seconds));
            let request = NewKey { name: name.clone(), expires_at };
            let outcome = service.create(&model.accounts[*account], request).await;
            let name_valid = name.as_ref().is_none_or(|name| crate::KeyName::new(name.clone()).is_ok());
            if !name_valid {
                ensure!(matches!(outcome, Err(Error::Invalid(crate::ValidationError::Name))), "{:?}", outcome);
            } else if expires_at.is_some_and(|expiry| expiry <= now) {
                ensure!(
                    matches!(outcome, Err(Error::Invalid(crate::ValidationError::ExpiryNotInFuture))),
                    "{:?}",
                    outcome
                );
            } else if model.active_count(*account) >= MAX_ACTIVE as usize {
                ensure!(matches!(outcome, Err(Error::KeyLimitReached { limit: MAX_ACTIVE })), "{:?}", outcome);
            } else {
                let created = outcome.map_err(|error| format!("create failed: {error}"))?;
                let token = created.key.expose_secret().to_owned();
                ensure!(token.starts_with(created.prefix.as_str()), "the prefix is not the token's");
                ensure_eq!(created.created_at, now);
                ensure!(!leaks(&format!("{created:?}"), &token), "Debug of a created key shows the secret");
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
            ensure!(
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
                ensure!(matches!(outcome, Err(Error::CannotRevokeSelf)), "{:?}", outcome);
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
        Op::Flush => service.flush().await.map_err(|error| format!("flush: {error}"))?,
    }
    Ok(())
}

/// Verifies the token of key `index` and checks the outcome against the model.
async fn verify_as_model_says<S: KeyStore>(
    service: &KeyService<S>,
    model: &mut Model,
    index: usize,
) -> Result<Option<AuthenticatedKey>, String> {
    let now = model.now();
    let outcome = service.verify(&model.keys[index].token).await;
    let key = &mut model.keys[index];
    if key.revoked {
        ensure!(matches!(outcome, Err(Rejection::Revoked)), "{:?}", outcome);
        Ok(None)
    } else if key.expires_at.is_some_and(|expiry| now >= expiry) {
        ensure!(matches!(outcome, Err(Rejection::Expired)), "{:?}", outcome);
        Ok(None)
    } else {
        let authenticated = outcome.map_err(|rejection| format!("a valid key was refused: {rejection}"))?;
        ensure_eq!(authenticated.id, key.id);
        ensure_eq!(&authenticated.account, &model.accounts[key.account]);
        key.last_used_at = Some(now);
        Ok(Some(authenticated))
    }
}

fn expect_revocation(
    model: &mut Model,
    target: usize,
    revocable: bool,
    outcome: Result<(), Error>,
) -> Result<(), String> {
    if revocable {
        ensure!(outcome.is_ok(), "{:?}", outcome);
        model.keys[target].revoked = true;
    } else {
        ensure!(matches!(outcome, Err(Error::NotFound)), "{:?}", outcome);
    }
    Ok(())
}
