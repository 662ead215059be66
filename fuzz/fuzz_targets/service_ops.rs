//! Operation sequences on the service over the memory store, checked against the model of
//! `apikeys::testing::model` at every step (the same model the property tests use).
#![no_main]

use apikeys::MemoryStore;
use apikeys::testing::model::{ACCOUNTS, MAX_GRACE, Op};
use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// An operation, in a form `arbitrary` can build.
#[derive(Arbitrary, Debug)]
enum Step {
    Create { account: u8, name: Option<String>, expires_in: Option<i16>, scopes: Option<u8> },
    CreateAs { caller: u8, expires_in: Option<i16>, scopes: Option<u8> },
    Roll { caller: u8, target: u8, grace: u16 },
    RollAsAdmin { account: u8, target: u8, grace: u16 },
    Verify { key: u8 },
    VerifyMutated { key: u8, position: u8, replacement: char },
    Revoke { caller: u8, target: u8 },
    RevokeAsAdmin { account: u8, target: u8 },
    Advance { seconds: u8 },
    Flush,
    CreateLimited {
        account: u8,
        scopes: Option<u8>,
        credits: Option<u8>,
        refill: Option<(u8, u16)>,
        limit: Option<u8>,
        tokens: Option<u8>,
        owner: Option<u8>,
    },
    SetOwnerLimits {
        account: u8,
        owner: u8,
        credits: Option<u8>,
        refill: Option<(u8, u16)>,
        limit: Option<u8>,
        tokens: Option<u8>,
    },
    Spend { key: u8, cost: u8, checks: u8 },
}

impl From<Step> for Op {
    fn from(step: Step) -> Self {
        let account = |account: u8| usize::from(account) % ACCOUNTS;
        // Up to just over the maximum, so that a grace period too long is tried too.
        let grace = |grace: u16| i64::from(grace) % (MAX_GRACE + 2);
        match step {
            Step::Create { account: a, name, expires_in, scopes } => {
                Op::Create { account: account(a), name, expires_in: expires_in.map(i64::from), scopes }
            }
            Step::CreateAs { caller, expires_in, scopes } => {
                Op::CreateAs { caller: caller.into(), expires_in: expires_in.map(i64::from), scopes }
            }
            Step::Roll { caller, target, grace: g } => {
                Op::Roll { caller: caller.into(), target: target.into(), grace: grace(g) }
            }
            Step::RollAsAdmin { account: a, target, grace: g } => {
                Op::RollAsAdmin { account: account(a), target: target.into(), grace: grace(g) }
            }
            Step::Verify { key } => Op::Verify { key: key.into() },
            Step::VerifyMutated { key, position, replacement } => {
                Op::VerifyMutated { key: key.into(), position: position.into(), replacement }
            }
            Step::Revoke { caller, target } => Op::Revoke { caller: caller.into(), target: target.into() },
            Step::RevokeAsAdmin { account: a, target } => {
                Op::RevokeAsAdmin { account: account(a), target: target.into() }
            }
            Step::Advance { seconds } => Op::Advance { seconds: seconds.into() },
            Step::Flush => Op::Flush,
            Step::CreateLimited { account: a, scopes, credits, refill, limit, tokens, owner } => Op::CreateLimited {
                account: account(a),
                scopes,
                credits: credits.map(u64::from),
                refill: refill.map(|(amount, every)| (u64::from(amount), u32::from(every))),
                limit: limit.map(|limit| u32::from(limit % 5)).filter(|&limit| limit > 0),
                tokens: tokens.map(|tokens| u32::from(tokens % 4)).filter(|&tokens| tokens > 0),
                owner: owner.map(usize::from),
            },
            Step::SetOwnerLimits { account: a, owner, credits, refill, limit, tokens } => Op::SetOwnerLimits {
                account: account(a),
                owner: owner.into(),
                credits: credits.map(u64::from),
                refill: refill.map(|(amount, every)| (u64::from(amount), u32::from(every))),
                limit: limit.map(|limit| u32::from(limit % 7)).filter(|&limit| limit > 0),
                tokens: tokens.map(|tokens| u32::from(tokens % 4)).filter(|&tokens| tokens > 0),
            },
            Step::Spend { key, cost, checks } => Op::Spend { key: key.into(), cost: u64::from(cost % 8), checks: checks % 4 },
        }
    }
}

fn steps(data: &[u8]) -> Result<Vec<Op>> {
    let mut input = Unstructured::new(data);
    let steps: Vec<Step> = input.arbitrary()?;
    Ok(steps.into_iter().take(64).map(Op::from).collect())
}

fuzz_target!(|data: &[u8]| {
    let Ok(ops) = steps(data) else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    if let Err(difference) = runtime.block_on(apikeys::testing::model::run(MemoryStore::new(), &ops)) {
        panic!("the service and the model disagree: {difference}\nops: {ops:?}");
    }
});
