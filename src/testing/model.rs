//! A model-based test of [`KeyService`] over any store (feature `test-util`): a sequence of
//! operations is applied to the service and to a plain model of the rules, and every outcome and
//! every account's list must agree after each step. The integration tests drive it with proptest,
//! the fuzz target `service_ops` with libFuzzer; a third-party store can run it too.
#![allow(missing_docs)]

use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use crate::{
    AccountId, ApiKey, AuthenticatedKey, Digest, Error, KeyFormat, KeyId, KeyService, KeyStore, ManualClock, NewKey,
    OwnerId, Rejection, Scopes,
};

/// Accounts the model uses; few, so operations often meet another account's keys.
pub const ACCOUNTS: usize = 3;
/// Owners per account the model uses: few, so that keys often share one.
pub const OWNERS: usize = 2;
/// The limit of active keys per account, low so the limit is often reached.
pub const MAX_ACTIVE: u32 = 3;
/// Where the model's clock starts.
pub const T0: OffsetDateTime = datetime!(2025-10-15 09:00 UTC);
/// The longest grace period of a roll, in seconds: short, so grace periods often end.
pub const MAX_GRACE: i64 = 600;
/// The grants operations pick scopes from: `keys:*` ones, so that scopes decide what a key may
/// do to other keys, and others that nest.
pub const GRANTS: [&str; 8] =
    ["*", "keys:*", "keys:read", "keys:write", "orders:*", "orders:read", "orders:read:own", "reports"];

/// The grants picked by the bits of `mask`.
pub fn scopes_of(mask: u8) -> Scopes {
    let grants = GRANTS.iter().enumerate().filter(|(bit, _)| mask & (1 << bit) != 0).map(|(_, grant)| *grant);
    Scopes::new(grants).unwrap_or_else(|_| Scopes::none())
}

/// One step. Indexes into the keys created so far are taken modulo their number. New kinds of
/// step may come in minor versions, as the service gains operations.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Op {
    /// The administrator's create; `scopes` is a mask over [`GRANTS`].
    Create {
        account: usize,
        name: Option<String>,
        expires_in: Option<i64>,
        scopes: Option<u8>,
    },
    /// A create through the caller's key.
    CreateAs {
        caller: usize,
        expires_in: Option<i64>,
        scopes: Option<u8>,
    },
    Roll {
        caller: usize,
        target: usize,
        grace: i64,
    },
    RollAsAdmin {
        account: usize,
        target: usize,
        grace: i64,
    },
    Verify {
        key: usize,
    },
    VerifyMutated {
        key: usize,
        position: usize,
        replacement: char,
    },
    Revoke {
        caller: usize,
        target: usize,
    },
    RevokeAsAdmin {
        account: usize,
        target: usize,
    },
    Advance {
        seconds: i64,
    },
    Flush,
    /// The administrator's create of a key with limits: `credits` to start with, refilled to
    /// `refill.0` every `refill.1` seconds, at most `limit` uses per [`LIMIT_WINDOW`] of its
    /// `"requests"` limit and `tokens` of its `"tokens"` limit.
    /// Its scopes leave out what manages keys (`*`, `keys:*`, `keys:write`): a key with
    /// credits makes no keys, and one with limits manages no unlimited keys. `owner`: one of the
    /// account's [`OWNERS`], whose limits the key then shares.
    CreateLimited {
        account: usize,
        scopes: Option<u8>,
        credits: Option<u64>,
        refill: Option<(u64, u32)>,
        limit: Option<u32>,
        tokens: Option<u32>,
        owner: Option<usize>,
    },
    /// The administrator sets the limits of one of the account's [`OWNERS`], as
    /// [`Op::CreateLimited`] gives a key's: all at once, `None` for none.
    SetOwnerLimits {
        account: usize,
        owner: usize,
        credits: Option<u64>,
        refill: Option<(u64, u32)>,
        limit: Option<u32>,
        tokens: Option<u32>,
    },
    /// A use of the key that costs `cost` credits and checks the limits of [`LIMIT_NAMES`]
    /// whose bits `checks` holds (counting towards them unless the cost is 0).
    Spend {
        key: usize,
        cost: u64,
        checks: u8,
    },
}

/// The window of every rate limit of [`Op::CreateLimited`]: 32 s, so that each of its slots is
/// one second and a use at a whole second counts until 33 s later.
pub const LIMIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(32);

/// The names of the model's rate limits, in the order a key holds them; a use checks those
/// whose bits (1 for the first) its [`Op::Spend`] holds.
pub const LIMIT_NAMES: [&str; 2] = [crate::RateLimit::REQUESTS, "tokens"];

/// What an authenticated request checks: `"requests"`.
const REQUESTS: u8 = 0b01;

/// Whether a use with `checks` checks the limit at `position` in [`LIMIT_NAMES`].
fn checks_limit(checks: u8, position: usize) -> bool {
    checks & (1 << position) != 0
}

/// The grants that let a key manage keys, left out of a limited key's.
const MANAGING: u8 = 0b1011;

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
    name: Option<crate::KeyName>,
    created_at: OffsetDateTime,
    expires_at: Option<OffsetDateTime>,
    revoked: bool,
    last_used_at: Option<OffsetDateTime>,
    scopes: Scopes,
    rotated_from: Option<KeyId>,
    replaced_by: Option<KeyId>,
    /// Where the key's credits are in [`Model::balances`]; `None`: unlimited.
    credits: Option<usize>,
    /// The key's rate limits, and the uses each counted.
    limits: ModelLimits,
    /// Which of its account's [`OWNERS`] the key belongs to.
    owner: Option<usize>,
}

/// An owner's limits: credits (in [`Model::balances`]) and rate limits.
#[derive(Debug, Default)]
struct ModelOwner {
    credits: Option<usize>,
    limits: ModelLimits,
}

/// The limits of [`LIMIT_NAMES`], each at most so many uses per [`LIMIT_WINDOW`] (`None`: no such
/// limit), and the instants of the uses each counted. A window outlives its limit, as the
/// service's does: a limit set again finds the uses it counted.
#[derive(Debug, Clone, Default)]
struct ModelLimits([(Option<u32>, Vec<OffsetDateTime>); 2]);

impl ModelLimits {
    fn new(requests: Option<u32>, tokens: Option<u32>) -> Self {
        Self([(requests, Vec::new()), (tokens, Vec::new())])
    }

    /// Sets the limits; their windows keep the uses they counted.
    fn set(&mut self, requests: Option<u32>, tokens: Option<u32>) {
        (self.0[0].0, self.0[1].0) = (requests, tokens);
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|(limit, _)| limit.is_none())
    }

    /// The limits the service holds: `"requests"`, then `"tokens"`, where set.
    fn as_service(&self) -> crate::RateLimits {
        let named = LIMIT_NAMES.iter().zip(&self.0);
        let each = named.filter_map(|(name, (limit, _))| crate::RateLimit::new(name, (*limit)?, LIMIT_WINDOW).ok());
        crate::RateLimits::new(each).unwrap_or_default()
    }

    /// The limits a use with `checks` checks: name, limit and uses, in the key's order.
    fn checked(&mut self, checks: u8) -> impl Iterator<Item = (&'static str, u32, &mut Vec<OffsetDateTime>)> {
        let named = LIMIT_NAMES.iter().zip(&mut self.0).enumerate();
        named.filter(move |(position, _)| checks_limit(checks, *position)).filter_map(|(_, (name, (limit, uses)))| {
            let limit = (*limit)?;
            Some((*name, limit, uses))
        })
    }
}

/// Credits as the model keeps them. A roll moves them to the new key, leaving the old one an
/// empty balance of its own.
#[derive(Debug)]
struct ModelBalance {
    remaining: u64,
    as_of: OffsetDateTime,
    /// Amount, every so many seconds.
    refill: Option<(u64, i64)>,
}

impl ModelBalance {
    /// What is left at `now`: the refill's amount if a multiple of the interval since the epoch
    /// lies after `as_of` and at or before `now`.
    fn left_at(&self, now: OffsetDateTime) -> u64 {
        match self.refill {
            Some((amount, every))
                if now.unix_timestamp().div_euclid(every) > self.as_of.unix_timestamp().div_euclid(every) =>
            {
                amount
            }
            _ => self.remaining,
        }
    }

    /// How long from `now` until the next refill, if it refills enough for a use of `cost`.
    fn until_refill(&self, now: OffsetDateTime, cost: u64) -> Option<std::time::Duration> {
        let (_, every) = self.refill.filter(|&(amount, _)| amount >= cost)?;
        let next = (now.unix_timestamp().div_euclid(every) + 1) * every;
        Some(std::time::Duration::from_secs((next - now.unix_timestamp()).unsigned_abs()))
    }
}

impl ModelKey {
    fn is_active(&self, now: OffsetDateTime) -> bool {
        !self.revoked && self.expires_at.is_none_or(|expiry| now < expiry)
    }

    /// No scope `self` lacks, no later expiry: a key never grants more than it has.
    fn can_manage(&self, scopes: &Scopes, expires_at: Option<OffsetDateTime>) -> bool {
        scopes.is_within(&self.scopes)
            && match (expires_at, self.expires_at) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(theirs), Some(mine)) => theirs <= mine,
            }
    }
}

struct Model {
    accounts: Vec<AccountId>,
    keys: Vec<ModelKey>,
    balances: Vec<ModelBalance>,
    /// By account, then owner.
    owners: Vec<Vec<ModelOwner>>,
    clock: ManualClock,
}

impl Model {
    fn now(&self) -> OffsetDateTime {
        crate::Clock::now(&self.clock)
    }

    /// The account's keys that count towards its limit (active, not replaced), `except` aside.
    fn counted(&self, account: usize, except: Option<usize>) -> usize {
        let now = self.now();
        let counts = |(index, key): &(usize, &ModelKey)| {
            key.account == account && key.is_active(now) && key.replaced_by.is_none() && Some(*index) != except
        };
        self.keys.iter().enumerate().filter(counts).count()
    }

    /// Records a key the service created and checks what it returned.
    fn add(
        &mut self,
        created: &crate::CreatedKey,
        account: usize,
        name: Option<crate::KeyName>,
        rotated_from: Option<KeyId>,
    ) -> Result<(), String> {
        let token = created.key.expose_secret().to_owned();
        ensure!(token.starts_with(created.prefix.as_str()), "the prefix is not the token's");
        ensure_eq!(created.created_at, self.now());
        ensure!(!leaks(&format!("{created:?}"), &token), "Debug of a created key shows the secret");
        self.keys.push(ModelKey {
            id: created.id,
            account,
            token,
            prefix: created.prefix,
            name,
            created_at: created.created_at,
            expires_at: created.expires_at,
            revoked: false,
            last_used_at: None,
            scopes: created.scopes.clone(),
            rotated_from,
            replaced_by: None,
            credits: None,
            limits: ModelLimits::default(),
            owner: None,
        });
        Ok(())
    }

    /// The owner's limits as the service gives them at `now`; `None` for none.
    fn owner_limits(&self, account: usize, owner: usize) -> Option<crate::OwnerLimits> {
        let (owner, now) = (&self.owners[account][owner], self.now());
        let credits = owner.credits.map(|index| {
            let balance = &self.balances[index];
            let refill = balance.refill.map(|(amount, every)| refill_of(amount, every));
            crate::Balance::new(crate::Credits { remaining: balance.left_at(now), refill }, now)
        });
        let limits = crate::OwnerLimits::new(credits, owner.limits.as_service());
        limits.limits_anything().then_some(limits)
    }

    fn pick(&self, index: usize) -> Option<usize> {
        (!self.keys.is_empty()).then(|| index % self.keys.len())
    }

    fn expected_list(&self, account: usize) -> Vec<ApiKey> {
        let now = self.now();
        let mut keys: Vec<&ModelKey> =
            self.keys.iter().filter(|key| key.account == account && key.is_active(now)).collect();
        keys.sort_by_key(|key| (key.created_at, key.id));
        keys.iter()
            .map(|key| ApiKey {
                id: key.id,
                prefix: key.prefix,
                name: key.name.clone(),
                expires_at: key.expires_at,
                created_at: key.created_at,
                last_used_at: key.last_used_at,
                scopes: key.scopes.clone(),
                rotated_from: key.rotated_from,
                replaced_by: key.replaced_by,
                owner: key.owner.map(owner_id),
                meta: None,
                credits: key.credits.map(|index| {
                    let balance = &self.balances[index];
                    let refill = balance.refill.map(|(amount, every)| refill_of(amount, every));
                    crate::Credits { remaining: balance.left_at(now), refill }
                }),
                ratelimits: key.limits.as_service(),
            })
            .collect()
    }
}

/// Applies `ops` to a service over `store` and to the model, comparing every outcome and every
/// account's list after each step; the first difference is the error.
pub async fn run<S: KeyStore>(store: S, ops: &[Op]) -> Result<(), String> {
    let clock = ManualClock::new(T0);
    let service =
        KeyService::builder(store, KeyFormat::new("as", crate::Environment::LIVE).map_err(|error| error.to_string())?)
            .clock(clock.clone())
            .max_active_keys_per_account(MAX_ACTIVE)
            .max_grace(std::time::Duration::from_secs(MAX_GRACE.unsigned_abs()))
            .build();
    let accounts = (0..ACCOUNTS)
        .map(|i| AccountId::new(format!("model-{i}-{}", KeyId::generate())).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let owners = (0..ACCOUNTS).map(|_| (0..OWNERS).map(|_| ModelOwner::default()).collect()).collect();
    let mut model = Model { accounts, keys: Vec::new(), balances: Vec::new(), owners, clock };

    for op in ops {
        let expiries: Vec<Option<OffsetDateTime>> = model.keys.iter().map(|key| key.expires_at).collect();
        apply(&service, &mut model, op).await?;
        for (key, before) in model.keys.iter().zip(expiries) {
            ensure!(crate::key::expires_no_later(key.expires_at, before), "an expiry moved later after {:?}", op);
        }
        for account in 0..ACCOUNTS {
            let keys = service.list(&model.accounts[account]).await.map_err(|error| format!("list: {error}"))?;
            ensure_eq!(keys, model.expected_list(account), "list of account {} after {:?}", account, op);
            for owner in 0..OWNERS {
                let limits = service.owner_limits(&model.accounts[account], &owner_id(owner)).await;
                let limits = limits.map_err(|error| format!("owner limits: {error}"))?;
                ensure_eq!(
                    limits,
                    model.owner_limits(account, owner),
                    "owner {owner} of account {account} after {op:?}"
                );
            }
        }
    }
    for account in 0..ACCOUNTS {
        replay_audit_trail(&service, &model, account).await?;
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

/// A key as the account's audit trail tells it, replayed from its first event.
#[derive(Debug, PartialEq)]
struct Replayed {
    name: Option<String>,
    expires_at: Option<OffsetDateTime>,
    revoked: bool,
    rotated_from: Option<KeyId>,
    replaced_by: Option<KeyId>,
}

/// Reads the account's whole audit trail a few events a page, replays it oldest first, and
/// checks that it tells the keys as the model has them: every key, created, rolled, renamed and
/// revoked as it was, and no event with any part of a token.
async fn replay_audit_trail<S: KeyStore>(service: &KeyService<S>, model: &Model, account: usize) -> Result<(), String> {
    use crate::audit::Action;
    let mut events = Vec::new();
    let mut after = None;
    loop {
        let page = service.audit_log(&model.accounts[account], 7, after).await.map_err(|error| error.to_string())?;
        events.extend(page.events);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let time = |value: Option<&serde_json::Value>| {
        value.and_then(serde_json::Value::as_str).map(|text| {
            OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).map_err(|e| e.to_string())
        })
    };
    let mut keys: std::collections::BTreeMap<KeyId, Replayed> = std::collections::BTreeMap::new();
    for event in events.iter().rev() {
        ensure_eq!(event.account, model.accounts[account], "an event of another account");
        for key in &model.keys {
            ensure!(!leaks(&event.to_json().to_string(), &key.token), "an audit event shows a secret: {event:?}");
        }
        let Some(id) = event.key_id else {
            ensure_eq!(event.action, Action::OwnerUpdated, "an event of no key");
            continue;
        };
        let name = || event.detail.get("name").map(|name| name.as_str().map(str::to_owned));
        match event.action {
            Action::KeyCreated => {
                let expires_at = time(event.detail.get("expiresAt")).transpose()?;
                let created = Replayed {
                    name: name().flatten(),
                    expires_at,
                    revoked: false,
                    rotated_from: None,
                    replaced_by: None,
                };
                ensure!(keys.insert(id, created).is_none(), "a key created twice: {event:?}");
            }
            Action::KeyRolled => {
                let new: KeyId = event
                    .detail
                    .get("newKeyId")
                    .and_then(|id| id.as_str())
                    .ok_or("no new key")?
                    .parse()
                    .map_err(|_| "a bad new key id")?;
                let old = keys.get_mut(&id).ok_or("a roll of an unknown key")?;
                let (name, expires_at) = (old.name.clone(), old.expires_at);
                old.expires_at = time(event.detail.get("expiresAt")).transpose()?;
                old.replaced_by = Some(new);
                let rolled = Replayed { name, expires_at, revoked: false, rotated_from: Some(id), replaced_by: None };
                ensure!(keys.insert(new, rolled).is_none(), "a roll's new key existed: {event:?}");
            }
            Action::KeyUpdated => {
                let key = keys.get_mut(&id).ok_or("an update of an unknown key")?;
                if let Some(name) = name() {
                    key.name = name;
                }
            }
            Action::KeyRevoked => keys.get_mut(&id).ok_or("a revocation of an unknown key")?.revoked = true,
            other => return Err(format!("an action the model never takes: {other:?}")),
        }
    }
    let expected: std::collections::BTreeMap<KeyId, Replayed> = model
        .keys
        .iter()
        .filter(|key| key.account == account)
        .map(|key| {
            let replayed = Replayed {
                name: key.name.as_ref().map(ToString::to_string),
                expires_at: key.expires_at,
                revoked: key.revoked,
                rotated_from: key.rotated_from,
                replaced_by: key.replaced_by,
            };
            (key.id, replayed)
        })
        .collect();
    ensure_eq!(keys, expected, "the audit trail of account {account} replayed");
    Ok(())
}

async fn apply<S: KeyStore>(service: &KeyService<S>, model: &mut Model, op: &Op) -> Result<(), String> {
    let now = model.now();
    match op {
        Op::Create { account, name, expires_in, scopes } => {
            let expires_at = expires_in.map(|seconds| now + Duration::seconds(seconds));
            let scopes = scopes.map(scopes_of);
            // A name is checked when it is made, so an invalid one never reaches the service.
            let Ok(key_name) = name.as_deref().map(crate::KeyName::new).transpose() else {
                return Ok(());
            };
            let request = NewKey { name: key_name.clone(), expires_at, scopes: scopes.clone(), ..NewKey::default() };
            let outcome = service.create(&model.accounts[*account], request).await;
            if expires_at.is_some_and(|expiry| expiry <= now) {
                ensure!(
                    matches!(outcome, Err(Error::Invalid(crate::ValidationError::ExpiryNotInFuture))),
                    "{:?}",
                    outcome
                );
            } else if model.counted(*account, None) >= MAX_ACTIVE as usize {
                ensure!(matches!(outcome, Err(Error::KeyLimitReached { limit: MAX_ACTIVE })), "{:?}", outcome);
            } else {
                let created = outcome.map_err(|error| format!("create failed: {error}"))?;
                ensure_eq!(created.scopes, scopes.unwrap_or_default());
                ensure_eq!(created.expires_at, expires_at);
                model.add(&created, *account, key_name, None)?;
            }
        }
        Op::CreateAs { caller, expires_in, scopes } => {
            let Some(caller) = model.pick(*caller) else { return Ok(()) };
            let Some(authenticated) = verify_as_model_says(service, model, caller).await? else { return Ok(()) };
            let requested_expiry = expires_in.map(|seconds| now + Duration::seconds(seconds));
            let requested_scopes = scopes.map(scopes_of);
            let request = NewKey {
                name: None,
                expires_at: requested_expiry,
                scopes: requested_scopes.clone(),
                ..NewKey::default()
            };
            let outcome = service.create_as(&authenticated, request).await;
            let creator = &model.keys[caller];
            let scopes = requested_scopes.unwrap_or_else(|| creator.scopes.clone());
            let expires_at = requested_expiry.or(creator.expires_at);
            let account = creator.account;
            if !creator.scopes.allows(Scopes::KEYS_WRITE) {
                ensure!(matches!(outcome, Err(Error::InsufficientScope { .. })), "{:?}", outcome);
            } else if requested_expiry.is_some_and(|expiry| expiry <= now) {
                ensure!(
                    matches!(outcome, Err(Error::Invalid(crate::ValidationError::ExpiryNotInFuture))),
                    "{:?}",
                    outcome
                );
            } else if !creator.can_manage(&scopes, expires_at) {
                ensure!(matches!(outcome, Err(Error::ScopeEscalation)), "{:?}", outcome);
            } else if model.counted(account, None) >= MAX_ACTIVE as usize {
                ensure!(matches!(outcome, Err(Error::KeyLimitReached { limit: MAX_ACTIVE })), "{:?}", outcome);
            } else {
                let created = outcome.map_err(|error| format!("create through a key failed: {error}"))?;
                ensure_eq!(created.scopes, scopes);
                ensure_eq!(created.expires_at, expires_at);
                ensure!(created.scopes.is_within(&model.keys[caller].scopes), "a key made a more capable key");
                model.add(&created, account, None, None)?;
            }
        }
        Op::Roll { caller, target, grace } => {
            let (Some(caller), Some(target)) = (model.pick(*caller), model.pick(*target)) else { return Ok(()) };
            let Some(authenticated) = verify_as_model_says(service, model, caller).await? else { return Ok(()) };
            let outcome = service.roll(&authenticated, &model.keys[target].id, grace_of(*grace)).await;
            let (roller, old) = (&model.keys[caller], &model.keys[target]);
            if !roller.scopes.allows(Scopes::KEYS_WRITE) {
                ensure!(matches!(outcome, Err(Error::InsufficientScope { .. })), "{:?}", outcome);
            } else if *grace > MAX_GRACE {
                expect_invalid_grace(&outcome)?;
            } else if caller == target && *grace == 0 {
                ensure!(matches!(outcome, Err(Error::CannotExpireCurrentKey)), "{:?}", outcome);
            } else if old.account != roller.account || !old.is_active(now) {
                ensure!(matches!(outcome, Err(Error::NotFound)), "{:?}", outcome);
            } else if !roller.can_manage(&old.scopes, old.expires_at) {
                ensure!(matches!(outcome, Err(Error::ScopeEscalation)), "{:?}", outcome);
            } else {
                expect_roll(model, target, *grace, outcome)?;
            }
        }
        Op::RollAsAdmin { account, target, grace } => {
            let Some(target) = model.pick(*target) else { return Ok(()) };
            let outcome =
                service.roll_as_admin(&model.accounts[*account], &model.keys[target].id, grace_of(*grace)).await;
            let old = &model.keys[target];
            if *grace > MAX_GRACE {
                expect_invalid_grace(&outcome)?;
            } else if old.account != *account || !old.is_active(now) {
                ensure!(matches!(outcome, Err(Error::NotFound)), "{:?}", outcome);
            } else {
                expect_roll(model, target, *grace, outcome)?;
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
            let (revoker, target_key) = (&model.keys[caller], &model.keys[target]);
            let found = target_key.account == revoker.account && target_key.is_active(now);
            if !revoker.scopes.allows(Scopes::KEYS_WRITE) {
                ensure!(matches!(outcome, Err(Error::InsufficientScope { .. })), "{:?}", outcome);
            } else if caller == target {
                ensure!(matches!(outcome, Err(Error::CannotRevokeSelf)), "{:?}", outcome);
            } else if found && !revoker.can_manage(&target_key.scopes, target_key.expires_at) {
                ensure!(matches!(outcome, Err(Error::ScopeEscalation)), "{:?}", outcome);
            } else {
                expect_revocation(model, target, found, outcome)?;
            }
        }
        Op::RevokeAsAdmin { account, target } => {
            let Some(target) = model.pick(*target) else { return Ok(()) };
            let outcome = service.revoke_as_admin(&model.accounts[*account], &model.keys[target].id).await;
            let target_key = &model.keys[target];
            let revocable = target_key.account == *account && target_key.is_active(now);
            expect_revocation(model, target, revocable, outcome)?;
        }
        Op::CreateLimited { account, scopes, credits, refill, limit, tokens, owner } => {
            let scopes = scopes_of(scopes.unwrap_or(0) & !MANAGING);
            let owner = owner.map(|owner| owner % OWNERS);
            let limits = ModelLimits::new(*limit, *tokens);
            let mut request = NewKey::default().scopes(scopes.clone()).ratelimits(limits.as_service());
            let refill = refill.map(|(amount, every)| (amount, i64::from(every.max(1))));
            if let Some(remaining) = credits {
                request = request.credits(credits_of(*remaining, refill)?);
            }
            if let Some(owner) = owner {
                request = request.owner(owner_id(owner));
            }
            let outcome = service.create(&model.accounts[*account], request).await;
            if model.counted(*account, None) >= MAX_ACTIVE as usize {
                ensure!(matches!(outcome, Err(Error::KeyLimitReached { limit: MAX_ACTIVE })), "{:?}", outcome);
            } else {
                let created = outcome.map_err(|error| format!("create with limits failed: {error}"))?;
                ensure_eq!(created.scopes, scopes);
                model.add(&created, *account, None, None)?;
                let key = model.keys.last_mut().ok_or("no key added")?;
                key.limits = limits;
                key.owner = owner;
                if let Some(remaining) = credits {
                    key.credits = Some(model.balances.len());
                    let refill = if credits.is_some() { refill } else { None };
                    model.balances.push(ModelBalance { remaining: *remaining, as_of: now, refill });
                }
            }
        }
        Op::SetOwnerLimits { account, owner, credits, refill, limit, tokens } => {
            let owner = owner % OWNERS;
            let refill = refill.map(|(amount, every)| (amount, i64::from(every.max(1))));
            let given = credits.map(|remaining| credits_of(remaining, refill)).transpose()?;
            let update =
                crate::OwnerUpdate::default().credits(given).ratelimits(ModelLimits::new(*limit, *tokens).as_service());
            let outcome = service.update_owner_as_admin(&model.accounts[*account], &owner_id(owner), update).await;
            let limits = outcome.map_err(|error| format!("owner limits: {error}"))?;
            let balance = credits.map(|remaining| {
                model.balances.push(ModelBalance { remaining, as_of: now, refill });
                model.balances.len() - 1
            });
            let modelled = &mut model.owners[*account][owner];
            modelled.credits = balance;
            modelled.limits.set(*limit, *tokens);
            let expected = model.owner_limits(*account, owner);
            ensure_eq!(limits, expected, "owner limits as set");
        }
        Op::Spend { key, cost, checks } => {
            let Some(index) = model.pick(*key) else { return Ok(()) };
            use_as_model_says(service, model, index, *cost, *checks).await?;
        }
        Op::Advance { seconds } => model.clock.advance(Duration::seconds(*seconds)),
        Op::Flush => service.flush().await.map_err(|error| format!("flush: {error}"))?,
    }
    Ok(())
}

/// Verifies the token of key `index` as an authenticated request does (1 credit, the
/// `"requests"` limit) and checks the outcome against the model.
async fn verify_as_model_says<S: KeyStore>(
    service: &KeyService<S>,
    model: &mut Model,
    index: usize,
) -> Result<Option<AuthenticatedKey>, String> {
    use_as_model_says(service, model, index, 1, REQUESTS).await
}

/// Uses the key `index` for `cost` credits and the limits `checks` names (through
/// [`KeyService::verify`] for a request's use), and checks the outcome against the model:
/// refusals in order (revoked, expired, rate limited, credits), what the use reports, and when
/// to retry.
async fn use_as_model_says<S: KeyStore>(
    service: &KeyService<S>,
    model: &mut Model,
    index: usize,
    cost: u64,
    checks: u8,
) -> Result<Option<AuthenticatedKey>, String> {
    let now = model.now();
    let token = model.keys[index].token.clone();
    let outcome = match (cost, checks) {
        (1, REQUESTS) => service.verify(&token).await,
        _ => {
            let names = LIMIT_NAMES.iter().enumerate().filter(|(position, _)| checks_limit(checks, *position));
            let usage = crate::Usage::new().cost(cost).ratelimits(names.map(|(_, name)| name));
            service.verify_usage(&token, &usage).await
        }
    };
    let Model { keys, balances, accounts, owners, .. } = model;
    let key = &mut keys[index];
    if key.revoked {
        ensure!(matches!(outcome, Err(Rejection::Revoked)), "{:?}", outcome);
        return Ok(None);
    }
    if key.expires_at.is_some_and(|expiry| now >= expiry) {
        ensure!(matches!(outcome, Err(Rejection::Expired)), "{:?}", outcome);
        return Ok(None);
    }
    let owner = key.owner.map(|owner| &mut owners[key.account][owner]);
    let owner = owner.filter(|owner| owner.credits.is_some() || !owner.limits.is_empty());
    // Rate limits first, the owner's before the key's; then credits, the key's before the owner's.
    let (mut owner_limits, owner_credits) = match owner {
        Some(owner) => (Some(&mut owner.limits), owner.credits),
        None => (None, None),
    };
    if let Some(limits) = owner_limits.as_deref_mut()
        && refused_by_limit(&outcome, limits, checks, now, true)?
    {
        return Ok(None);
    }
    if refused_by_limit(&outcome, &mut key.limits, checks, now, false)? {
        return Ok(None);
    }
    for (credits, by_owner) in [(key.credits, false), (owner_credits, true)] {
        let Some(balance) = credits.map(|index| &balances[index]) else { continue };
        let left = balance.left_at(now);
        if cost > 0 && left < cost {
            let Err(Rejection::UsageExceeded(refusal)) = &outcome else {
                return Err(format!("{left} credits left, a use of {cost} was not refused: {outcome:?}"));
            };
            ensure_eq!(refusal.by_owner, by_owner, "whose credits ran out");
            ensure_eq!(refusal.retry_after, balance.until_refill(now, cost), "retry after running out");
            ensure_eq!(refusal.usage.credits, Some(left), "credits reported on a refusal");
            return Ok(None);
        }
    }
    let authenticated = outcome.map_err(|rejection| format!("a valid use was refused: {rejection}"))?;
    ensure_eq!(authenticated.id, key.id);
    ensure_eq!(&authenticated.account, &accounts[key.account]);
    ensure_eq!(&authenticated.scopes, &key.scopes);
    ensure_eq!(authenticated.expires_at, key.expires_at);
    let spend = |credits: Option<usize>, balances: &mut Vec<ModelBalance>| {
        credits.map(|index| {
            let balance = &mut balances[index];
            let left = balance.left_at(now);
            balance.remaining = left - cost.min(left);
            balance.as_of = balance.as_of.max(now);
            balance.remaining
        })
    };
    ensure_eq!(authenticated.usage.credits, spend(key.credits, balances), "credits left after the use");
    let owner_left = spend(owner_credits, balances);
    let owner_usage = authenticated.owner_usage.as_ref();
    ensure_eq!(owner_usage.is_some(), owner_limits.is_some(), "the owner's limits were used");
    ensure_eq!(owner_usage.and_then(|usage| usage.credits), owner_left, "the owner's credits left after the use");
    // A use of cost 0 only checks: it counts towards no limit.
    for (limits, usage) in [(Some(&mut key.limits), Some(&authenticated.usage)), (owner_limits, owner_usage)] {
        let (Some(limits), Some(usage)) = (limits, usage) else { continue };
        let mut left = Vec::new();
        for (name, limit, uses) in limits.checked(checks) {
            if cost > 0 {
                uses.push(now);
            }
            left.push((name.to_owned(), limit - uses.len() as u32));
        }
        let reported: Vec<_> = usage.ratelimits().map(|state| (state.name.to_string(), state.remaining)).collect();
        ensure_eq!(reported, left, "uses left in each window checked");
    }
    key.last_used_at = Some(now);
    Ok(Some(authenticated))
}

/// Forgets the uses that no longer count at `now`; whether the use is over one of the limits it
/// checks, checking that it was then refused as the model says, by the owner's limits or the
/// key's, naming the limit that frees up last (the later of two that free up together).
fn refused_by_limit(
    outcome: &Result<AuthenticatedKey, Rejection>,
    limits: &mut ModelLimits,
    checks: u8,
    now: OffsetDateTime,
    by_owner: bool,
) -> Result<bool, String> {
    // A use at a whole second counts in a slot of one second, until the window after it ends.
    let slot_window = LIMIT_WINDOW.as_secs() as i64 + 1;
    let mut reached = None;
    for (index, (name, limit, uses)) in limits.checked(checks).enumerate() {
        uses.retain(|at| (now - *at).whole_seconds() < slot_window);
        if uses.len() >= limit as usize {
            let oldest = uses[uses.len() - limit as usize];
            let retry = (oldest + Duration::seconds(slot_window) - now).unsigned_abs();
            reached = reached.max(Some((retry, index, name)));
        }
    }
    let Some((retry, _, name)) = reached else { return Ok(false) };
    let Err(Rejection::RateLimited(refusal)) = outcome else {
        return Err(format!("over its limit {name}, the use was not refused: {outcome:?}"));
    };
    ensure_eq!(refusal.by_owner, by_owner, "whose limit was reached");
    ensure_eq!(refusal.retry_after, Some(retry), "retry after a rate limit");
    let reached = refusal.limit().map(|limit| (limit.name.to_string(), limit.remaining));
    ensure_eq!(reached, Some((name.to_owned(), 0)), "the limit reached");
    Ok(true)
}

fn credits_of(remaining: u64, refill: Option<(u64, i64)>) -> Result<crate::Credits, String> {
    let mut given = crate::Credits::new(remaining).map_err(|error| error.to_string())?;
    given.refill = refill.map(|(amount, every)| refill_of(amount, every));
    Ok(given)
}

/// The name of the `index`th owner of each account.
fn owner_id(index: usize) -> OwnerId {
    OwnerId::new(format!("owner-{index}")).unwrap_or_else(|_| unreachable!("a valid owner id"))
}

fn refill_of(amount: u64, every: i64) -> crate::Refill {
    let interval = crate::RefillInterval::seconds(every.unsigned_abs()).unwrap_or(crate::RefillInterval::Daily);
    crate::Refill::new(amount.min(crate::MAX_CREDITS), interval).unwrap_or_else(|_| unreachable!("within range"))
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

fn grace_of(seconds: i64) -> std::time::Duration {
    std::time::Duration::from_secs(seconds.unsigned_abs())
}

fn expect_invalid_grace(outcome: &Result<crate::RolledKey, Error>) -> Result<(), String> {
    ensure!(matches!(outcome, Err(Error::Invalid(crate::ValidationError::GraceOutOfRange))), "{:?}", outcome);
    Ok(())
}

/// Checks a roll of key `target` the model allows, and applies it to the model: the new key
/// copies name, scopes and expiry; the old one ends at the grace period's end or its own expiry.
fn expect_roll(
    model: &mut Model,
    target: usize,
    grace: i64,
    outcome: Result<crate::RolledKey, Error>,
) -> Result<(), String> {
    let now = model.now();
    let old = &model.keys[target];
    if old.replaced_by.is_some() && model.counted(old.account, Some(target)) >= MAX_ACTIVE as usize {
        ensure!(matches!(outcome, Err(Error::KeyLimitReached { limit: MAX_ACTIVE })), "{:?}", outcome);
        return Ok(());
    }
    let rolled = outcome.map_err(|error| format!("roll failed: {error}"))?;
    let grace_ends = now + Duration::seconds(grace);
    let old_expires_at = old.expires_at.map_or(grace_ends, |expiry| expiry.min(grace_ends));
    ensure_eq!(rolled.previous.id, old.id);
    ensure_eq!(rolled.previous.expires_at, old_expires_at);
    ensure_eq!(rolled.key.scopes, old.scopes);
    ensure_eq!(rolled.key.expires_at, old.expires_at);
    ensure_eq!(rolled.key.name, old.name);
    let (account, name, old_id, credits, owner) = (old.account, old.name.clone(), old.id, old.credits, old.owner);
    // The new key's limits go on from the old key's uses (each key counts its own from then on).
    let limits = old.limits.clone();
    model.add(&rolled.key, account, name, Some(old_id))?;
    let new = model.keys.last_mut().ok_or("no key added")?;
    (new.credits, new.limits, new.owner) = (credits, limits, owner);
    // The balance moved to the new key; the old one keeps none, and no refill.
    let emptied = credits.map(|_| {
        model.balances.push(ModelBalance { remaining: 0, as_of: now, refill: None });
        model.balances.len() - 1
    });
    let old = &mut model.keys[target];
    old.expires_at = Some(old_expires_at);
    old.replaced_by = Some(rolled.key.id);
    old.credits = emptied;
    Ok(())
}
